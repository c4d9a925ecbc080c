"""The client verbs against a fake of Ollama's wire: what they send and how
they draw what comes back.

``OllamaWireFake`` is an aiohttp server in the test that records every
request and replays the answers Ollama's docs/api.md documents for pull
(NDJSON progress), create, the blob routes (HEAD 200/404, POST 201, 400 when
the bytes do not match the digest), copy, delete, show, generate (load and
unload) and chat.  The verbs must work against a real Ollama, so this stands
in for one; the same verbs against a real ``mlxgate serve`` are in
test_cli_verbs.py and test_cli_models.py.  Each verb runs as a subprocess.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from aiohttp import web

from mlxgate_cli.client.progress import Progress
from tests.cli_verbs import client_env, finish, last_error_line, one_error_line, run_cli_async, start_cli
from tests.fakes.loopback import LoopbackServer, hold

DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64

#: docs/api.md, "Pull a Model": the manifest, then each layer (announced with
#: no ``completed``, then growing), then the final statuses.
PULL_LINES: list[dict[str, Any]] = [
    {"status": "pulling manifest"},
    {"status": f"pulling {DIGEST_A[7:19]}", "digest": DIGEST_A, "total": 2142590208},
    {"status": f"pulling {DIGEST_A[7:19]}", "digest": DIGEST_A, "total": 2142590208, "completed": 241970},
    {"status": f"pulling {DIGEST_A[7:19]}", "digest": DIGEST_A, "total": 2142590208, "completed": 2142590208},
    {"status": f"pulling {DIGEST_B[7:19]}", "digest": DIGEST_B, "total": 7711, "completed": 7711},
    {"status": "verifying sha256 digest"},
    {"status": "writing manifest"},
    {"status": "removing any unused layers"},
    {"status": "success"},
]


@dataclass
class OllamaWireFake(LoopbackServer):
    """Ollama's model routes, recording each request as (method, path, JSON body or None)."""

    models: set[str] = field(default_factory=lambda: {"llama3.2:latest"})
    blobs: dict[str, int] = field(default_factory=dict)  # digest -> size held
    pull_lines: list[dict[str, Any]] = field(default_factory=lambda: list(PULL_LINES))
    #: After this many pull lines: an ``{"error"}`` line (``pull_error``) or a wait (``pull_hold`` seconds).
    pull_stop_after: Optional[int] = None
    pull_error: str = ""
    pull_hold: float = 0.0
    chat_hold: float = 0.0
    #: A bad key is 401 with Ollama's error body, when set.
    key: Optional[str] = None

    def __post_init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.uploads: dict[str, bytes] = {}
        self.auth: list[Optional[str]] = []
        self.disconnected = asyncio.Event()
        self.holding = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record], client_max_size=64 * 1024 * 1024)
        app.router.add_post("/api/pull", self.pull)
        app.router.add_post("/api/create", self.create)
        app.router.add_route("HEAD", "/api/blobs/{digest}", self.blob_head)
        app.router.add_post("/api/blobs/{digest}", self.blob_post)
        app.router.add_post("/api/copy", self.copy)
        app.router.add_delete("/api/delete", self.delete)
        app.router.add_post("/api/show", self.show)
        app.router.add_post("/api/generate", self.generate)
        app.router.add_post("/api/chat", self.chat)
        return app

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self) -> list[str]:
        return [f"{m} {p}" for m, p, _ in self.requests]

    def bodies(self, path: str) -> list[Any]:
        return [b for _, p, b in self.requests if p == path]

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = None
        if request.can_read_body and not request.path.startswith("/api/blobs/"):
            body = await request.json()
        self.requests.append((request.method, request.path, body))
        self.auth.append(request.headers.get("Authorization"))
        if self.key is not None and request.headers.get("Authorization") != f"Bearer {self.key}":
            return web.json_response({"error": "unauthorized"}, status=401)
        return await handler(request)

    @staticmethod
    def _name(body: dict[str, Any], key: str = "model") -> str:
        name = str(body.get(key) or body.get("name") or "")
        return name if ":" in name else f"{name}:latest"

    def _missing(self, name: str) -> web.Response:
        return web.json_response({"error": f"model '{name.removesuffix(':latest')}' not found"}, status=404)

    async def _ndjson(self, request: web.Request, lines: list[dict[str, Any]]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        for line in lines:
            await resp.write(json.dumps(line).encode() + b"\n")
        return resp

    async def pull(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        name = self._name(body)
        if name.startswith("no-such-model"):
            return web.json_response({"error": "pull model manifest: file does not exist"}, status=404)
        lines = self.pull_lines if self.pull_stop_after is None else self.pull_lines[: self.pull_stop_after]
        resp = await self._ndjson(request, lines)
        if self.pull_stop_after is not None:
            if self.pull_error:
                await resp.write(json.dumps({"error": self.pull_error}).encode() + b"\n")
                return resp
            self.holding.set()
            if not await hold(request, self.pull_hold):
                self.disconnected.set()
                return resp
        self.models.add(name)
        return resp

    async def create(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("from") and self._name(body, "from") not in self.models:
            return self._missing(self._name(body, "from"))
        named = {**(body.get("files") or {}), **(body.get("adapters") or {})}
        for name, digest in named.items():
            if digest not in self.blobs:
                return web.json_response({"error": f"blob {digest} for {name} not found"}, status=400)
        self.models.add(self._name(body))
        layers = [{"status": f"using existing layer {d}"} for d in sorted(set(named.values()))]
        return await self._ndjson(request, [{"status": "parsing model"}, *layers, {"status": "writing manifest"},
                                            {"status": "success"}])

    async def blob_head(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if request.match_info["digest"] in self.blobs else 404)

    async def blob_post(self, request: web.Request) -> web.Response:
        digest = request.match_info["digest"]
        data = await request.read()
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            return web.json_response({"error": "digest mismatch"}, status=400)
        self.uploads[digest] = data
        self.blobs[digest] = len(data)
        return web.Response(status=201)

    async def copy(self, request: web.Request) -> web.Response:
        body = await request.json()
        source = self._name(body, "source")
        if source not in self.models:
            return self._missing(source)
        self.models.add(self._name(body, "destination"))
        return web.Response(status=200)

    async def delete(self, request: web.Request) -> web.Response:
        name = self._name(await request.json())
        if name not in self.models:
            return self._missing(name)
        self.models.discard(name)
        return web.Response(status=200)

    async def show(self, request: web.Request) -> web.Response:
        name = self._name(await request.json())
        if name not in self.models:
            return self._missing(name)
        return web.json_response({"modelfile": f"FROM {name}\n", "parameters": "", "template": "{{ .Prompt }}",
                                  "details": {"family": "llama", "parameter_size": "3.2B",
                                              "quantization_level": "Q4_K_M"}, "capabilities": ["completion"]})

    async def generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        name = self._name(body)
        if name not in self.models:
            return self._missing(name)
        reason = "unload" if body.get("keep_alive") == 0 else "load"
        return web.json_response({"model": name, "response": "", "done": True, "done_reason": reason})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        name = self._name(body)
        if name not in self.models:
            return self._missing(name)
        asked = body["messages"][-1]["content"]
        pieces = [{"model": name, "message": {"role": "assistant", "content": p}, "done": False}
                  for p in ("you said: ", asked)]
        resp = await self._ndjson(request, pieces)
        if self.chat_hold:
            self.holding.set()
            if not await hold(request, self.chat_hold):
                self.disconnected.set()
                return resp
        await resp.write(json.dumps({"model": name, "message": {"role": "assistant", "content": ""},
                                     "done": True, "done_reason": "stop"}).encode() + b"\n")
        return resp


async def started(**kw: Any) -> OllamaWireFake:
    fake = OllamaWireFake(**kw)
    await fake.serve()
    return fake


# ------------------------------------------------------------------ pull


async def test_pull_draws_a_line_per_status_when_not_a_terminal_and_sends_the_key() -> None:
    fake = await started()
    try:
        r = await run_cli_async("pull", "llama3.2", "--insecure", env=client_env(fake.url, key="k1"))
    finally:
        await fake.stop()
    assert r.rc == 0, r.err
    assert r.err_lines == ["pulling manifest", "pulling aaaaaaaaaaaa", "pulling bbbbbbbbbbbb",
                           "verifying sha256 digest", "writing manifest", "removing any unused layers", "success"]
    assert r.out == ""
    assert fake.requests == [("POST", "/api/pull", {"model": "llama3.2"})]
    assert fake.auth == ["Bearer k1"]


def test_pull_draws_bars_on_a_terminal() -> None:
    out = io.StringIO()
    progress = Progress(out, bars=True)
    for line in PULL_LINES:
        progress.update(line)
    progress.close()
    text = out.getvalue()
    assert "pulling manifest" in text and "success" in text
    assert "pulling aaaaaaaaaaaa:   0%" in text and "242kB/2.14GB" in text  # a file on its way
    assert "pulling aaaaaaaaaaaa: 100%" in text and "pulling bbbbbbbbbbbb: 100%" in text
    assert "2.14GB/2.14GB" in text  # the layer's size, in decimal units as Ollama counts
    assert "0.00B/2.14GB" not in text  # the announcement (no ``completed``) draws no bar


async def test_pull_errors_before_and_after_output_are_one_line_each() -> None:
    fake = await started(pull_stop_after=3, pull_error="digest mismatch: file sha256-aaaa is corrupt")
    try:
        env = client_env(fake.url, var="OLLAMA_HOST")
        missing = await run_cli_async("pull", "no-such-model", env=env)
        broken = await run_cli_async("pull", "llama3.2:3b", env=env)
    finally:
        await fake.stop()
    assert one_error_line(missing) == "Error: pull model manifest: file does not exist"
    assert last_error_line(broken) == "Error: digest mismatch: file sha256-aaaa is corrupt"
    assert broken.err_lines[:-1] == ["pulling manifest", "pulling aaaaaaaaaaaa"]


async def test_ctrl_c_during_a_pull_is_one_line_and_status_130() -> None:
    fake = await started(pull_stop_after=3, pull_hold=60.0)
    try:
        proc = await start_cli("pull", "llama3.2", env=client_env(fake.url))
        await asyncio.wait_for(fake.holding.wait(), 60)
        assert proc.stderr is not None
        assert (await asyncio.wait_for(proc.stderr.readline(), 60)).decode().strip() == "pulling manifest"
        proc.send_signal(signal.SIGINT)
        r = await finish(proc)
        await asyncio.wait_for(fake.disconnected.wait(), 30)  # the download request was closed
    finally:
        await fake.stop()
    assert last_error_line(r, rc=130) == "interrupted"
    assert "llama3.2:latest" in fake.models  # (present from the start; the held pull added nothing)


# ------------------------------------------------------------------ create


def _model_folder(root: Path) -> dict[str, bytes]:
    contents = {
        "config.json": b'{"model_type": "llama", "hidden_size": 64}',
        "model.safetensors": bytes(range(256)) * 4096,  # 1 MiB, several reads
        "tokenizer.json": b'{"version": "1.0"}',
        "tokenizer_config.json": b'{"chat_template": "{{ messages }}"}',
    }
    root.mkdir(parents=True)
    for name, data in contents.items():
        (root / name).write_bytes(data)
    (root / "pytorch_model.bin").write_bytes(b"pickle")  # never sent
    return contents


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_create_from_a_folder_uploads_the_missing_blobs_then_names_them(tmp_path: Path) -> None:
    contents = _model_folder(tmp_path / "work" / "weights")
    adapter = tmp_path / "work" / "lora"
    adapter.mkdir()
    (adapter / "adapters.safetensors").write_bytes(b"lora weights")
    (adapter / "adapter_config.json").write_bytes(b'{"rank": 8}')
    (tmp_path / "work" / "Modelfile").write_text(
        'FROM ./weights\nADAPTER ./lora\nSYSTEM """\nYou are terse.\n"""\nPARAMETER temperature 0.3\n'
        "PARAMETER stop <|eot_id|>\nMESSAGE user hi\nMESSAGE assistant hello\nLICENSE MIT\n")
    already = _sha(contents["tokenizer.json"])
    fake = await started(blobs={already: len(contents["tokenizer.json"])})
    try:
        r = await run_cli_async("create", "mine", "-f", "work/Modelfile", "-q", "q4_K_M",
                                env=client_env(fake.url), cwd=str(tmp_path))
    finally:
        await fake.stop()
    assert r.rc == 0, r.err
    files = {name: _sha(data) for name, data in contents.items()}
    adapters = {"adapters.safetensors": _sha(b"lora weights"), "adapter_config.json": _sha(b'{"rank": 8}')}
    (create,) = fake.bodies("/api/create")
    assert create == {
        "model": "mine", "files": files, "adapters": adapters, "quantize": "q4_K_M",
        "system": "\nYou are terse.\n", "parameters": {"temperature": 0.3, "stop": ["<|eot_id|>"]},
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        "license": ["MIT"],
    }
    every = set(files.values()) | set(adapters.values())
    heads = {p.removeprefix("HEAD /api/blobs/") for p in fake.paths() if p.startswith("HEAD")}
    posts = [p.removeprefix("POST /api/blobs/") for p in fake.paths() if p.startswith("POST /api/blobs/")]
    assert heads == every  # each asked for
    assert sorted(posts) == sorted(every - {already})  # each missing one sent once, the held one not
    assert {d: _sha(data) for d, data in fake.uploads.items()} == {d: d for d in every - {already}}
    assert fake.paths()[-1] == "POST /api/create"  # after every blob
    assert "writing manifest" in r.err_lines and r.err_lines[-1] == "success"


async def test_create_from_a_model_name_sends_from_and_no_blobs(tmp_path: Path) -> None:
    (tmp_path / "Modelfile").write_text("FROM llama3.2\nSYSTEM You are Mario from Super Mario Bros.\n")
    fake = await started()
    try:
        ok = await run_cli_async("create", "mario", env=client_env(fake.url), cwd=str(tmp_path))
        (tmp_path / "Modelfile").write_text("FROM no-such-base\n")
        missing = await run_cli_async("create", "x", env=client_env(fake.url), cwd=str(tmp_path))
        (tmp_path / "Modelfile").write_text("FROM llama3.2\nPARAMETER temprature 0.1\n")
        typo = await run_cli_async("create", "x", env=client_env(fake.url), cwd=str(tmp_path))
    finally:
        await fake.stop()
    assert ok.rc == 0, ok.err
    assert fake.bodies("/api/create")[0] == {"model": "mario", "from": "llama3.2",
                                              "system": "You are Mario from Super Mario Bros."}
    assert one_error_line(missing) == "Error: model 'no-such-base' not found"
    assert one_error_line(typo) == "Error: unknown parameter 'temprature'"
    assert not any(p.startswith(("HEAD", "POST /api/blobs")) for p in fake.paths())
    assert len(fake.bodies("/api/create")) == 2  # the bad Modelfile sent nothing


async def test_an_upload_the_server_refuses_stops_the_create(tmp_path: Path) -> None:
    _model_folder(tmp_path / "weights")
    (tmp_path / "Modelfile").write_text("FROM ./weights\n")

    class Refusing(OllamaWireFake):
        async def blob_post(self, request: web.Request) -> web.Response:
            await request.read()
            return web.json_response({"error": "digest mismatch"}, status=400)

    fake = Refusing()
    await fake.serve()
    try:
        r = await run_cli_async("create", "x", env=client_env(fake.url), cwd=str(tmp_path))
    finally:
        await fake.stop()
    assert last_error_line(r) == "Error: digest mismatch"
    assert fake.bodies("/api/create") == []


# ------------------------------------------------------------------ cp, rm, show, run


async def test_cp_and_rm_send_ollamas_requests_and_print_its_lines() -> None:
    fake = await started()
    try:
        env = client_env(fake.url)
        cp = await run_cli_async("cp", "llama3.2", "backup", env=env)
        rm = await run_cli_async("rm", "backup", "llama3.2", env=env)
        again = await run_cli_async("rm", "backup", env=env)
        cp_missing = await run_cli_async("cp", "nothing", "other", env=env)
    finally:
        await fake.stop()
    assert (cp.rc, cp.out) == (0, "copied 'llama3.2' to 'backup'\n")
    assert (rm.rc, rm.out) == (0, "deleted 'backup'\ndeleted 'llama3.2'\n")
    assert fake.bodies("/api/copy")[0] == {"source": "llama3.2", "destination": "backup"}
    assert fake.bodies("/api/delete")[:2] == [{"model": "backup"}, {"model": "llama3.2"}]
    # Each is unloaded first (keep_alive 0), as Ollama's rm does.
    assert fake.bodies("/api/generate")[0] == {"model": "backup", "keep_alive": 0}
    assert one_error_line(again) == "Error: model 'backup' not found"
    assert one_error_line(cp_missing) == "Error: model 'nothing' not found"


async def test_show_prints_one_field_or_the_summary() -> None:
    fake = await started()
    try:
        env = client_env(fake.url)
        summary = await run_cli_async("show", "llama3.2", env=env)
        modelfile = await run_cli_async("show", "llama3.2", "--modelfile", env=env)
        template = await run_cli_async("show", "llama3.2", "--template", env=env)
        both = await run_cli_async("show", "llama3.2", "--template", "--system", env=env)
    finally:
        await fake.stop()
    assert summary.rc == 0 and summary.out.splitlines()[:2] == ["  Model", "    architecture    llama"]
    assert "quantization    Q4_K_M" in summary.out and "  Capabilities" in summary.out
    assert modelfile.out == "FROM llama3.2:latest\n\n"
    assert template.out == "{{ .Prompt }}"
    assert both.rc == 2 and "not allowed with argument" in both.err  # argparse: one field at a time


async def test_run_pulls_a_missing_model_first_then_chats() -> None:
    fake = await started(models=set())
    try:
        r = await run_cli_async("run", "llama3.2", "why", "is", "the", "sky", "blue?", env=client_env(fake.url))
    finally:
        await fake.stop()
    assert r.rc == 0, r.err
    assert fake.paths() == ["POST /api/show", "POST /api/pull", "POST /api/chat"]
    assert fake.bodies("/api/chat") == [{"model": "llama3.2",
                                         "messages": [{"role": "user", "content": "why is the sky blue?"}]}]
    assert r.out == "you said: why is the sky blue?\n"
    assert r.err_lines[0] == "pulling manifest" and r.err_lines[-1] == "success"  # progress on stderr


async def test_the_chat_loop_keeps_the_history_until_bye() -> None:
    fake = await started()
    try:
        r = await run_cli_async("run", "llama3.2", env=client_env(fake.url), stdin="first\n\nsecond\n/bye\nthird\n")
    finally:
        await fake.stop()
    assert r.rc == 0, r.err
    assert r.out == "you said: first\nyou said: second\n"
    first, second = fake.bodies("/api/chat")
    assert first["messages"] == [{"role": "user", "content": "first"}]
    assert second["messages"] == [{"role": "user", "content": "first"},
                                  {"role": "assistant", "content": "you said: first"},
                                  {"role": "user", "content": "second"}]


async def test_ctrl_c_during_an_answer_is_one_line_and_status_130() -> None:
    fake = await started(chat_hold=60.0)
    try:
        proc = await start_cli("run", "llama3.2", "hello", env=client_env(fake.url))
        await asyncio.wait_for(fake.holding.wait(), 60)
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readexactly(len("you said: hello")), 60) == b"you said: hello"
        proc.send_signal(signal.SIGINT)
        r = await finish(proc)
        await asyncio.wait_for(fake.disconnected.wait(), 30)
    finally:
        await fake.stop()
    assert one_error_line(r, rc=130) == "interrupted"


async def test_a_refused_key_is_one_line_naming_the_variable() -> None:
    fake = await started(key="right")
    try:
        r = await run_cli_async("show", "llama3.2", env=client_env(fake.url, key="wrong"))
    finally:
        await fake.stop()
    assert one_error_line(r) == "Error: unauthorized (the key is read from MLXGATE_API_KEY)"
