"""Model management through a real `mlxgate serve`: create, copy, delete, blobs,
show and push, judged by the official `ollama` client (and the OpenAI SDK for
"a created model's settings apply in every dialect"); admin keys over HTTP and
gRPC; names that are paths or too long; a restart keeps what was made.

One server process per module (plus one with keys, and the restart), over a
models directory holding the generated test model; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest
from ollama import Client, ResponseError

from backends.mlx.testmodel import write_test_model
from backends.models.store import STORE_DIRNAME
from mlxgate.v1 import inference_pb2 as pb
from mlxgate.v1 import inference_pb2_grpc as pb_grpc
from tests.test_cli_serve import clean_env, start, stop

BASE = "tiny-llama"


class Server:
    def __init__(self, root: Path, **env: str) -> None:
        self.root = root
        self.models = root / "models"
        self.env = clean_env(root, **env)
        self.proc, self.url, self.target = start(
            ["--port", "0", "--grpc-port", "0", "--models-dir", str(self.models)], self.env)

    def client(self, key: str = "") -> Client:
        return Client(host=self.url, headers={"Authorization": f"Bearer {key}"} if key else None)

    def stop(self) -> str:
        return stop(self.proc)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("manage")
    write_test_model(root / "models", BASE, seed=0)
    return root


@pytest.fixture(scope="module")
def server(root):
    s = Server(root)
    yield s
    s.stop()


def names(c: Client) -> set[str]:
    return {m.model for m in c.list().models}


def request(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_copy_links_a_users_folder_and_delete_removes_only_the_copy(server):
    c = server.client()
    c.copy(BASE, "tiny-copy:v1")
    assert "tiny-copy:v1" in names(c)
    answer = c.chat("tiny-copy:v1", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 2})
    assert answer.done
    user_weights = server.models / BASE / "model.safetensors"
    store = server.models / STORE_DIRNAME / "snapshots"
    linked = [p for p in store.rglob("model.safetensors") if p.stat().st_ino == user_weights.stat().st_ino]
    assert linked, "the copy's weights are hard links to the user's file, not copies"
    c.delete("tiny-copy:v1")
    assert "tiny-copy:v1" not in names(c)
    assert user_weights.is_file() and user_weights.stat().st_nlink == 1, "only the store's link went"
    with pytest.raises(ResponseError) as e:
        c.delete("tiny-copy:v1")
    assert e.value.status_code == 404
    with pytest.raises(ResponseError) as e:
        c.delete(BASE)  # a folder the user placed is never deleted
    assert e.value.status_code == 400 and "never deletes" in e.value.error
    assert user_weights.is_file()


def test_create_applies_system_parameters_and_messages_in_every_dialect(server):
    c = server.client()
    steps = [p.status for p in c.create(
        "mario", from_=BASE, system="You are Mario from Super Mario Bros.",
        parameters={"num_predict": 3, "temperature": 0, "stop": ["<|nothing|>"]},
        messages=[{"role": "user", "content": "who are you?"}, {"role": "assistant", "content": "It's a me!"}],
        license="MIT", stream=True)]
    assert steps[-2:] == ["writing manifest", "success"]
    assert any(s.startswith("using existing layer sha256:") for s in steps)
    assert any(s.startswith("creating new layer sha256:") for s in steps)

    shown = c.show("mario")
    assert shown.license == "MIT"
    assert "temperature" in shown.parameters and "num_predict" in shown.parameters
    assert 'SYSTEM """You are Mario from Super Mario Bros."""' in shown.modelfile
    assert f"FROM {BASE}:latest" in shown.modelfile and "MESSAGE assistant" in shown.modelfile
    raw = json.loads(request("POST", server.url + "/api/show", json.dumps({"model": "mario"}).encode())[1])
    assert raw["system"] == "You are Mario from Super Mario Bros."
    assert raw["details"]["parent_model"] == BASE

    msgs = [{"role": "user", "content": "hello"}]
    base, mario = (c.chat(m, messages=msgs, options={"num_predict": 8}) for m in (BASE, "mario"))
    assert mario.prompt_eval_count > base.prompt_eval_count, "system and messages went before the chat"
    assert c.chat("mario", messages=msgs).eval_count <= 3, "num_predict 3 applied when the request sets none"
    assert c.generate("mario", "hello").eval_count <= 3

    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    done = oai.chat.completions.create(model="mario", messages=msgs)
    assert done.usage.completion_tokens <= 3
    assert done.usage.prompt_tokens > oai.chat.completions.create(
        model=BASE, messages=msgs, max_tokens=3).usage.prompt_tokens
    own = oai.chat.completions.create(model="mario", messages=msgs, max_tokens=6, stop=None)
    assert own.usage.completion_tokens > 3 or own.choices[0].finish_reason == "stop", "the request's own value wins"


def test_a_model_created_from_a_deleted_one_keeps_working(server):
    c = server.client()
    c.copy(BASE, "base2")
    c.create("child", from_="base2", system="Be brief.")
    c.delete("base2")
    assert "base2" not in {n.removesuffix(":latest") for n in names(c)}
    assert c.chat("child", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 2}).done


def test_blobs_and_create_from_files(server, tmp_path):
    c = server.client()
    folder = server.models / BASE
    files = {}
    for f in sorted(folder.iterdir()):
        if f.is_file():
            files[f.name] = c.create_blob(f)
    digest = files["config.json"]
    assert request("HEAD", f"{server.url}/api/blobs/{digest}")[0] == 200
    assert request("HEAD", f"{server.url}/api/blobs/sha256:{'0' * 64}")[0] == 404
    assert request("HEAD", f"{server.url}/api/blobs/sha256:nothex")[0] == 400
    assert request("POST", f"{server.url}/api/blobs/{digest}", folder.joinpath("config.json").read_bytes())[0] == 200

    wrong = "sha256:" + hashlib.sha256(b"other bytes").hexdigest()
    status, body = request("POST", f"{server.url}/api/blobs/{wrong}", b"these bytes")
    assert status == 400 and "digest mismatch" in json.loads(body)["error"]
    assert request("HEAD", f"{server.url}/api/blobs/{wrong}")[0] == 404, "nothing kept"
    assert not list((server.models / STORE_DIRNAME / "partial").glob("upload-*"))

    assert c.create("from-files", files=files).status == "success"
    assert c.generate("from-files", "hi", options={"num_predict": 2}).done
    with pytest.raises(ResponseError) as e:
        c.create("no-weights", files={"config.json": digest})
    assert e.value.status_code == 400 and "safetensors" in e.value.error


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../b", "x" * 257, "a b", "x:../../y", "C:\\models"])
def test_names_that_are_paths_or_too_long_are_400(server, bad):
    c = server.client()
    with pytest.raises(ResponseError) as e:
        c.copy(BASE, bad)
    assert e.value.status_code == 400
    with pytest.raises(ResponseError) as e:
        c.create(bad, from_=BASE)
    assert e.value.status_code == 400
    store = server.models / STORE_DIRNAME
    assert not any(p.name in ("x", "passwd", "y", "b") for p in server.root.rglob("*") if store not in p.parents
                   and p.is_relative_to(server.root / "models")), "nothing written outside the store"


def test_missing_models_push_and_bad_templates(server):
    c = server.client()
    for call in (lambda: c.create("x", from_="no-such-model"), lambda: c.copy("no-such-model", "y")):
        with pytest.raises(ResponseError) as e:
            call()
        assert e.value.status_code == 404
    with pytest.raises(ResponseError) as e:
        c.create("go-tpl", from_=BASE, template="{{ .System }} {{ .Prompt }}")
    assert e.value.status_code == 400 and "Jinja" in e.value.error
    status, body = request("POST", server.url + "/api/push", json.dumps({"model": BASE}).encode())
    assert status == 501 and "does not push" in json.loads(body)["error"]


def test_created_and_copied_models_survive_a_restart(root, server):
    c = server.client()
    c.copy("mario", "mario-copy")
    server.stop()
    again = Server(root)
    # The module's later tests (and its fixture's stop) use the new process.
    server.proc, server.url, server.target = again.proc, again.url, again.target
    c2 = again.client()
    listed = names(c2)
    assert {"mario:latest", "mario-copy:latest", "child:latest", "from-files:latest"} <= listed
    assert c2.show("mario-copy").license == "MIT"
    assert 'SYSTEM """You are Mario from Super Mario Bros."""' in c2.show("mario").modelfile
    assert c2.chat("mario-copy", messages=[{"role": "user", "content": "hi"}]).eval_count <= 3


# ---------------------------------------------------------------- admin keys


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    root = tmp_path_factory.mktemp("keyed")
    write_test_model(root / "models", BASE, seed=0)
    s = Server(root, MLXGATE_API_KEYS="user-key-1", MLXGATE_ADMIN_KEYS="admin-key-1")
    yield s
    s.stop()


def test_model_management_needs_an_admin_key(keyed):
    user, admin = keyed.client("user-key-1"), keyed.client("admin-key-1")
    for call in (lambda c: c.copy(BASE, "k-copy"), lambda c: c.delete(BASE),
                 lambda c: c.create("k2", from_=BASE)):
        with pytest.raises(ResponseError) as e:
            call(user)
        assert e.value.status_code == 403 and "admin key" in e.value.error
    assert BASE + ":latest" in names(user), "listing needs only a key"
    assert user.show(BASE).details.family
    admin.copy(BASE, "k-copy")
    assert "k-copy:latest" in names(user)
    assert admin.chat("k-copy", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 1}).done
    status, _ = request("HEAD", f"{keyed.url}/api/blobs/sha256:{'0' * 64}",
                        headers={"Authorization": "Bearer user-key-1"})
    assert status == 403
    status, body = request("POST", keyed.url + "/v1/chat/completions", b"{}",
                           headers={"Authorization": "Bearer nope"})
    assert status == 401


async def test_grpc_management_needs_an_admin_key(keyed):
    async with grpc.aio.insecure_channel(keyed.target) as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        req = pb.CopyModelRequest(source=BASE, destination="g-copy")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.CopyModel(req, metadata=(("authorization", "Bearer user-key-1"),))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        await stub.CopyModel(req, metadata=(("authorization", "Bearer admin-key-1"),))
        listed = await stub.ListModels(pb.ListModelsRequest(), metadata=(("authorization", "Bearer admin-key-1"),))
        assert "g-copy" in {m.name for m in listed.models}
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.DeleteModel(pb.DeleteModelRequest(model="../../etc"),
                                   metadata=(("authorization", "Bearer admin-key-1"),))
        assert e.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    assert os.path.isdir(keyed.models / BASE)


# ---------------------------------------------------------------- quantize, adapters


def test_quantize_with_mlx_lm(server):
    c = server.client()
    progress = list(c.create("tiny-q8", from_=BASE, quantize="q8_0", stream=True))
    quantizing = [p for p in progress if p.status == "quantizing model to Q8_0"]
    assert quantizing and quantizing[-1].completed == quantizing[-1].total > 0
    assert [p.status for p in progress][-3:] == ["verifying conversion", "writing manifest", "success"]
    assert c.show("tiny-q8").details.quantization_level == "Q8_0"
    config = json.loads(next((server.models / STORE_DIRNAME / "snapshots").glob("quant-*/config.json")).read_text())
    assert config["quantization"]["bits"] == 8
    assert c.generate("tiny-q8", "hi", options={"num_predict": 2}).done
    with pytest.raises(ResponseError) as e:
        c.create("tiny-q2", from_=BASE, quantize="q2_K")
    assert e.value.status_code == 400 and "q4_K_M" in e.value.error


def _lora_adapter(model_dir: Path, out: Path) -> None:
    """A LoRA adapter as mlx-lm's fine-tuning saves one (random B, so it changes the answers)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    model, _ = load(str(model_dir))
    model.freeze()
    cfg = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 20.0, "dropout": 0.0}}
    linear_to_lora_layers(model, cfg["num_layers"], cfg["lora_parameters"])
    mx.random.seed(0)
    weights = {k: (mx.random.normal(v.shape) if k.endswith("lora_b") else v)
               for k, v in tree_flatten(model.trainable_parameters())}
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(json.dumps(cfg))


def test_lora_adapters_are_applied_at_load(server, tmp_path):
    c = server.client()
    _lora_adapter(server.models / BASE, tmp_path / "adapter")
    adapters = {f.name: c.create_blob(f) for f in sorted((tmp_path / "adapter").iterdir())}
    assert c.create("tiny-lora", from_=BASE, adapters=adapters).status == "success"
    opts = {"num_predict": 8, "temperature": 0, "seed": 1}
    base = c.generate(BASE, "hello there", options=opts).response
    adapted = c.generate("tiny-lora", "hello there", options=opts).response
    assert adapted != base, "the adapter changes the greedy answer"
    with pytest.raises(ResponseError) as e:
        c.create("bad-lora", from_=BASE, adapters={"adapters.safetensors": adapters["adapters.safetensors"]})
    assert e.value.status_code == 400 and "adapter_config.json" in e.value.error
