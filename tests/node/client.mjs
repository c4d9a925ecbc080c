// Node.js conformance client for the mlxgate gRPC contract.
//
// Uses only the official @grpc/grpc-js and @grpc/proto-loader: the contract is
// loaded from proto/mlxgate/v1/inference.proto at run time (no generated
// code), exactly as a Node application would.  Run by
// tests/test_polyglot_node.py; also usable by hand:
//
//   npm ci --prefix tests/node && node tests/node/client.mjs 127.0.0.1:50051
//
// Prints one JSON object with what it saw to stdout.  Progress goes to stderr.
//
// Options:
//   --model NAME          model to generate with (default tiny-llama)
//   --pause-before-cancel after the first chunk of the call that is about to
//                         be cancelled, print "READY-TO-CANCEL" to stderr and
//                         wait for a line on stdin before calling cancel(), so
//                         the caller can look at the server while the
//                         sequence is in flight.
//   --deadline-ms N       deadline for each call (default 15000)

import { once } from 'node:events';
import { createRequire } from 'node:module';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, '..', '..');
const SERVICE_NAME = 'mlxgate.v1.InferenceService';

const LOADER_OPTIONS = {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
  // google/protobuf/{duration,timestamp}.proto: protobufjs (under
  // proto-loader) carries these well-known types itself, so they resolve
  // without any extra directory.
  includeDirs: [path.join(REPO, 'proto'), path.join(HERE, 'protos')],
};

function parseArgs(argv) {
  const opts = { target: null, model: 'tiny-llama', pauseBeforeCancel: false, deadlineMs: 15000 };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--model') opts.model = argv[++i];
    else if (a === '--pause-before-cancel') opts.pauseBeforeCancel = true;
    else if (a === '--deadline-ms') opts.deadlineMs = Number(argv[++i]);
    else if (!a.startsWith('--') && opts.target === null) opts.target = a;
    else throw new Error(`unknown argument: ${a}`);
  }
  if (!opts.target) throw new Error('usage: node client.mjs HOST:PORT [--model NAME] [--pause-before-cancel]');
  return opts;
}

function log(msg) {
  process.stderr.write(`[node-client] ${msg}\n`);
}

function deadline(ms) {
  return new Date(Date.now() + ms);
}

function statusOf(err) {
  return { code: err.code, code_name: grpc.status[err.code], details: err.details };
}

function unary(client, method, request, ms) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: deadline(ms) }, (err, resp) => (err ? reject(err) : resolve(resp)));
  });
}

// Reads a server stream to its end: resolves with {events, status, error}.
// A non-OK status is reported, not thrown, so callers can assert on it.
function drain(call) {
  return new Promise((resolve) => {
    const events = [];
    let error = null;
    call.on('data', (ev) => events.push(ev));
    call.on('error', (err) => {
      error = err;
    });
    call.on('status', (status) => {
      // 'status' comes after 'end' / 'error'; it is the final word.
      resolve({ events, status: { code: status.code, code_name: grpc.status[status.code], details: status.details }, error });
    });
  });
}

function chatRequest(model, text, sampling) {
  return {
    model,
    chat: { messages: [{ role: 'ROLE_USER', content: text }] },
    sampling,
  };
}

function waitForStdinLine() {
  const rl = readline.createInterface({ input: process.stdin });
  return once(rl, 'line').finally(() => rl.close());
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const require = createRequire(import.meta.url);
  const result = {
    target: opts.target,
    versions: {
      node: process.version,
      'grpc-js': require('@grpc/grpc-js/package.json').version,
      'proto-loader': require('@grpc/proto-loader/package.json').version,
    },
  };

  const contract = grpc.loadPackageDefinition(protoLoader.loadSync('mlxgate/v1/inference.proto', LOADER_OPTIONS));
  const healthPkg = grpc.loadPackageDefinition(protoLoader.loadSync('grpc/health/v1/health.proto', LOADER_OPTIONS));
  const creds = grpc.credentials.createInsecure();
  const inference = new contract.mlxgate.v1.InferenceService(opts.target, creds);
  const health = new healthPkg.grpc.health.v1.Health(opts.target, creds);

  try {
    await new Promise((resolve, reject) =>
      inference.waitForReady(deadline(opts.deadlineMs), (err) => (err ? reject(err) : resolve())),
    );

    // 1. Health/Check, for the whole server and for the service by name.
    result.health = {};
    for (const name of ['', SERVICE_NAME]) {
      const resp = await unary(health, 'Check', { service: name }, opts.deadlineMs);
      result.health[name] = resp.status;
    }
    log(`health: ${JSON.stringify(result.health)}`);

    // 2. ListModels.
    const models = await unary(inference, 'ListModels', {}, opts.deadlineMs);
    result.models = models.models.map((m) => ({
      name: m.name,
      backend: m.backend,
      size_bytes: m.size_bytes,
      modified_at: m.modified_at,
    }));
    log(`models: ${result.models.map((m) => m.name).join(', ')}`);

    // 3. Generate as a server stream: chunks, then exactly one done.
    {
      const call = inference.Generate(chatRequest(opts.model, 'Hello there', { max_tokens: 6, temperature: 0 }), {
        deadline: deadline(opts.deadlineMs),
      });
      const { events, status } = await drain(call);
      result.generate = {
        status,
        kinds: events.map((e) => e.event),
        chunks: events.filter((e) => e.event === 'chunk').map((e) => ({ text: e.chunk.text, token_ids: e.chunk.token_ids })),
        done: events.filter((e) => e.event === 'done').map((e) => e.done),
      };
      log(`generate: ${result.generate.kinds.length} events, status ${status.code_name}`);
    }

    // 4. Generate for a model nobody serves: NOT_FOUND (5), details name the known models.
    {
      const call = inference.Generate(chatRequest('no-such-model', 'hi', { max_tokens: 4 }), {
        deadline: deadline(opts.deadlineMs),
      });
      const { events, status } = await drain(call);
      result.not_found = { status, events: events.length };
      log(`unknown model: ${status.code_name} ${JSON.stringify(status.details)}`);
    }

    // 5. A long generation cancelled by the client after its first chunk.
    {
      const call = inference.Generate(
        chatRequest(opts.model, 'Tell me a long story', { max_tokens: 2000, temperature: 0.7 }),
        { deadline: deadline(opts.deadlineMs) },
      );
      const finished = drain(call);
      const [first] = await once(call, 'data');
      if (opts.pauseBeforeCancel) {
        log('READY-TO-CANCEL');
        await waitForStdinLine();
      }
      call.cancel();
      const { events, status } = await finished;
      result.cancel = {
        first_event: first.event,
        status,
        events_after_first: events.length - 1,
        saw_done: events.some((e) => e.event === 'done'),
      };
      log(`cancel: ${status.code_name} after ${events.length} events`);
    }
  } catch (err) {
    result.error = { message: String(err && err.message ? err.message : err), ...(err && err.code !== undefined ? statusOf(err) : {}) };
    log(`error: ${result.error.message}`);
  } finally {
    inference.close();
    health.close();
  }

  process.stdout.write(`${JSON.stringify(result)}\n`);
  process.exitCode = result.error ? 1 : 0;
}

main().catch((err) => {
  process.stderr.write(`[node-client] fatal: ${err && err.stack ? err.stack : err}\n`);
  process.exitCode = 2;
});
