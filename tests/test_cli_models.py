"""pull, cp, rm and create from the command line against a real ``mlxgate
serve``.

The server pulls from the fake of the Hugging Face Hub's HTTP API
(``tests/fakes/hf_hub_fake.py``, HF_ENDPOINT; itself judged by
``huggingface_hub`` in tests/test_model_pull.py) serving the generated test
model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest

from tests.cli_verbs import Result, client_env, last_error_line, one_error_line, run_cli_async
from tests.fakes.hf_hub_fake import FakeHub
from tests.test_cli_serve import clean_env, start, stop

#: The verbs' tests; the hub fake's own test (last) passes today.
MODEL = "tiny-llama"
REPO = "mlx-test/tiny-llama"


@pytest.fixture(scope="module")
async def hub(test_model_dir: Path) -> AsyncIterator[FakeHub]:
    fake = await FakeHub().start()
    fake.add_folder(REPO, test_model_dir / MODEL)
    yield fake
    await fake.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, test_model_dir: Path, hub: FakeHub) -> Iterator[str]:
    """``mlxgate serve`` over a models folder of its own holding the generated model, pulling from the hub fake."""
    tmp = tmp_path_factory.mktemp("cli-models")
    models = tmp / "models"
    shutil.copytree(test_model_dir / MODEL, models / MODEL)
    env = clean_env(tmp, MLXGATE_DEFAULT_MAX_TOKENS="8", HF_ENDPOINT=hub.base)
    proc, http, _ = start(["--port", "0", "--grpc-port", "0", "--models-dir", str(models)], env)
    try:
        yield http
        stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def cli(server: str, *args: str, **kw: Any) -> Result:
    return await run_cli_async(*args, env=client_env(server), **kw)


async def names(server: str) -> list[str]:
    r = await cli(server, "list")
    assert r.rc == 0, r.err
    return [line.split()[0] for line in r.out.splitlines()[1:]]


async def test_pull_from_the_hub_draws_ollamas_progress_then_the_model_runs(server: str, hub: FakeHub) -> None:
    weights = hub.repos[REPO].files["model.safetensors"].sha256
    r = await cli(server, "pull", f"hf.co/{REPO}")
    assert r.rc == 0, r.err
    assert r.err_lines[0] == "pulling manifest"
    assert f"pulling {weights[:12]}" in r.err_lines
    assert r.err_lines[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    assert f"hf.co/{REPO}:latest" in await names(server)
    answer = await cli(server, "run", f"hf.co/{REPO}", "hello")
    assert answer.rc == 0 and answer.out.strip(), answer.err
    again = await cli(server, "pull", f"hf.co/{REPO}")  # present: nothing downloaded again
    assert again.rc == 0 and again.err_lines[-1] == "success", again.err
    missing = await cli(server, "pull", "hf.co/mlx-test/no-such-repo")
    assert "not found" in one_error_line(missing)


async def test_run_pulls_a_model_the_server_lacks(server: str, hub: FakeHub) -> None:
    r = await cli(server, "run", f"{REPO}:main", "hi")
    assert r.rc == 0, r.err
    assert r.err_lines[0] == "pulling manifest" and r.err_lines[-1] == "success"
    assert r.out.strip()


async def test_cp_gives_a_second_name_and_rm_removes_it(server: str) -> None:
    cp = await cli(server, "cp", MODEL, "backup")
    assert (cp.rc, cp.out) == (0, f"copied '{MODEL}' to 'backup'\n"), cp.err
    assert "backup:latest" in await names(server)
    assert (await cli(server, "run", "backup", "hi")).rc == 0
    rm = await cli(server, "rm", "backup")
    assert (rm.rc, rm.out) == (0, "deleted 'backup'\n"), rm.err
    assert "backup:latest" not in await names(server) and f"{MODEL}:latest" in await names(server)
    assert "not found" in one_error_line(await cli(server, "rm", "backup"))
    assert "not found" in one_error_line(await cli(server, "cp", "no-such-model", "x"))


async def test_create_from_a_model_keeps_system_and_parameters(server: str, tmp_path: Path) -> None:
    (tmp_path / "Modelfile").write_text(
        f'FROM {MODEL}\nSYSTEM """You are terse.\nAnswer in one word."""\nPARAMETER temperature 0\n'
        "PARAMETER num_predict 4\nLICENSE MIT\n")
    r = await cli(server, "create", "terse", "-f", str(tmp_path / "Modelfile"))
    assert r.rc == 0, r.err
    assert r.err_lines[-1] == "success"
    assert "terse:latest" in await names(server)
    assert (await cli(server, "show", "terse", "--system")).out == "You are terse.\nAnswer in one word."
    params = (await cli(server, "show", "terse", "--parameters")).out.split()
    assert "temperature" in params and "num_predict" in params
    assert (await cli(server, "show", "terse", "--license")).out == "MIT\n"
    answer = await cli(server, "run", "terse", "hi")
    assert answer.rc == 0 and answer.out.strip(), answer.err
    missing = await cli(server, "create", "x", "-f", str(tmp_path / "Modelfile2"))
    assert "cannot read the Modelfile" in one_error_line(missing)
    (tmp_path / "Modelfile3").write_text("FROM no-such-model\n")
    assert "not found" in last_error_line(await cli(server, "create", "x", "-f", str(tmp_path / "Modelfile3")))


async def test_create_from_a_local_folder_uploads_it_and_serves_it(server: str, tmp_path: Path,
                                                                   test_model_dir: Path) -> None:
    shutil.copytree(test_model_dir / MODEL, tmp_path / "weights")
    (tmp_path / "Modelfile").write_text("FROM ./weights\nPARAMETER temperature 0.5\n")
    r = await cli(server, "create", "uploaded", cwd=str(tmp_path))  # ./Modelfile, as Ollama's default
    assert r.rc == 0, r.err
    assert any(line.startswith("copying file model.safetensors") for line in r.err_lines)
    assert r.err_lines[-1] == "success"
    assert "uploaded:latest" in await names(server)
    answer = await cli(server, "run", "uploaded", "hi")
    assert answer.rc == 0 and answer.out.strip(), answer.err
    again = await cli(server, "create", "uploaded2", cwd=str(tmp_path))  # the blobs are there: none sent again
    assert again.rc == 0 and not any(line.startswith("copying file") for line in again.err_lines), again.err
