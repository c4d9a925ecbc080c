"""The client verbs against a real ``mlxgate serve`` (a process on ephemeral
ports, an API key, the generated test model): list, ps, show, run with a
prompt and as a chat read from stdin, stop, and the errors a user meets (a
missing model, a refused key, no server) as one line and a non-zero exit."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cli_verbs import Result, client_env, one_error_line, run_cli
from tests.test_cli_serve import clean_env, start, stop

KEY = "cli-test-key"
MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, test_model_dir: Path) -> Iterator[str]:
    """``mlxgate serve`` on the generated model, answers cut at 8 tokens, one API key; its HTTP URL."""
    tmp = tmp_path_factory.mktemp("cli-verbs")
    env = clean_env(tmp, MLXGATE_API_KEYS=KEY, MLXGATE_DEFAULT_MAX_TOKENS="8")
    proc, http, _ = start(["--port", "0", "--grpc-port", "0", "--models-dir", str(test_model_dir)], env)
    try:
        yield http
        stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def api(url: str, path: str, body: Any = None) -> Any:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    req = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        text = r.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and labels.items() <= s.labels.items())


def cli(server: str, *args: str, stdin: str | None = None, key: str | None = KEY) -> Result:
    return run_cli(*args, env=client_env(server, key=key), stdin=stdin)


def test_list_prints_the_models_as_ollama_does(server: str) -> None:
    r = cli(server, "list")
    assert r.rc == 0 and r.err == ""
    header, *rows = r.out.splitlines()
    assert header.split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    (tag,) = api(server, "/api/tags")["models"]
    (row,) = rows
    name, ident, size, unit, *modified = row.split()
    assert (name, ident) == ("tiny-llama:latest", tag["digest"][:12])
    assert f"{size} {unit}" == f"{tag['size'] // 1000} KB"
    assert " ".join(modified).endswith("ago")
    # The alias and a prefix that matches nothing.
    assert [line.split()[:4] for line in cli(server, "ls", "tiny").out.splitlines()] == [
        header.split(), [name, ident, size, unit]]
    assert cli(server, "ls", "zzz").out == "NAME    ID    SIZE    MODIFIED\n"


def test_run_with_a_prompt_streams_one_answer_and_ps_and_stop_follow_it(server: str) -> None:
    chats = metric(server, "mlxgate_http_requests_total", route="/api/chat", status="200")
    r = cli(server, "run", MODEL, "Why", "is", "the", "sky", "blue?")
    assert r.rc == 0 and r.err == "", r.err
    assert r.out.strip() and r.out.endswith("\n")
    assert metric(server, "mlxgate_http_requests_total", route="/api/chat", status="200") == chats + 1

    ps = cli(server, "ps")
    assert ps.rc == 0
    header, row = ps.out.splitlines()
    assert header.split() == ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
    assert row.startswith("tiny-llama:latest") and "2048" in row.split() and row.endswith("from now")

    assert cli(server, "stop", MODEL).rc == 0
    assert api(server, "/api/ps")["models"] == []
    assert one_error_line(cli(server, "stop", "no-such-model")) == 'Error: couldn\'t find model "no-such-model" to stop'


def test_the_chat_loop_reads_stdin_keeps_the_history_and_ends_at_bye(server: str) -> None:
    def tokens() -> float:
        return metric(server, "mlxgate_prompt_tokens_total")

    def chats() -> float:
        return metric(server, "mlxgate_http_requests_total", route="/api/chat", status="200")

    before_tokens, before_chats = tokens(), chats()
    separate = [cli(server, "run", MODEL, line) for line in ("first", "second")]
    assert all(r.rc == 0 for r in separate)
    alone = tokens() - before_tokens

    before_tokens = tokens()
    r = cli(server, "run", MODEL, stdin="first\n\nsecond\n/bye\nthird\n")
    assert r.rc == 0 and r.err == "", r.err
    assert r.out.strip() and r.out.endswith("\n")
    assert chats() == before_chats + 4  # two alone, two in the chat; nothing after /bye, nothing for the blank line
    # The second turn carried the first and its answer: more prompt than the same two lines alone.
    assert tokens() - before_tokens > alone

    eof = cli(server, "run", MODEL, stdin="only\n")  # the end of input ends the chat too
    assert eof.rc == 0 and chats() == before_chats + 5


def test_show_prints_the_summary_and_single_fields(server: str) -> None:
    summary = cli(server, "show", MODEL)
    assert summary.rc == 0
    lines = [line.split() for line in summary.out.splitlines()]
    assert ["Model"] in lines and ["architecture", "llama"] in lines and ["context", "length", "2048"] in lines
    assert ["Capabilities"] in lines and ["completion"] in lines
    assert ["Parameters"] in lines and ["num_ctx", "2048"] in lines
    shown = api(server, "/api/show", {"model": MODEL})
    assert cli(server, "show", MODEL, "--parameters").out == shown["parameters"] + "\n"
    assert cli(server, "show", MODEL, "--template").out == shown["template"]
    assert cli(server, "show", MODEL, "--modelfile").out == shown["modelfile"] + "\n"
    assert cli(server, "show", MODEL, "--license").out == "\n"


def test_a_missing_model_is_one_line(server: str) -> None:
    expected = f"Error: model 'no-such-model' not found; available models: {MODEL}"
    assert one_error_line(cli(server, "show", "no-such-model")) == expected
    # run asks the server to pull it first (as Ollama does); a server that cannot pull leaves "not found".
    assert one_error_line(cli(server, "run", "no-such-model", "hi")) == expected


def test_a_refused_or_missing_key_is_one_line(server: str) -> None:
    wrong = one_error_line(cli(server, "list", key="not-the-key"))
    assert wrong == "Error: invalid API key (the key is read from MLXGATE_API_KEY)"
    missing = one_error_line(cli(server, "run", MODEL, "hi", key=None))
    assert missing.startswith("Error: API key required") and missing.endswith("(the key is read from MLXGATE_API_KEY)")


def test_no_server_is_one_line_saying_how_to_start_one() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    for var in ("MLXGATE_HOST", "OLLAMA_HOST"):
        r = run_cli("list", env=client_env(f"127.0.0.1:{port}", var=var))
        assert one_error_line(r) == (f"Error: could not connect to mlxgate at http://127.0.0.1:{port} — is it "
                                     "running? (mlxgate serve)")
    bad = run_cli("ps", env=client_env("gopher://x"))
    assert one_error_line(bad) == "Error: MLXGATE_HOST: 'gopher://x': the scheme must be http or https"
