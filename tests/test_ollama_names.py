"""Model names as Ollama clients see them: tagged (``tiny-llama:latest``) in
/api/tags, /api/ps and /api/show, either form accepted everywhere, and
aliases listed as running when the model behind them is loaded.

Judges: the official ``ollama`` client, and LangChain's
``validate_model_on_init`` replayed on the wire (langchain-ollama's
``_utils.validate_model``: ``Client.list()``, then the requested name must equal
a listed ``model`` or be one followed by ``:tag``).  langchain-ollama itself
is not installed for the suite: it brings langchain-core and langsmith.
"""

from __future__ import annotations

import asyncio

import ollama
import pytest

from backends.routing import Router
from backends.service import start_inference_service
from gateway.app import create_app, start_http
from mlxgate.config import Config, ServerConfig
from mlxgate.names import has_tag, same_model, tagged, untagged
from tests.mlx_fixtures import TEST_MODEL

ALIAS = "chat"


@pytest.fixture(scope="module")
async def aliased(mlx_backend):
    """A front and service over the session's MLX backend, with an alias."""
    cfg = Config(aliases={ALIAS: [f"mlx:{TEST_MODEL}"]})
    service = await start_inference_service(Router([mlx_backend], cfg.router, cfg.aliases), port=0)
    http = await start_http(create_app(ServerConfig(port=0), service.target), "127.0.0.1", 0)
    yield http.url
    await http.stop()
    await service.stop(grace=1.0)


def langchain_validate_model(host: str, model_name: str) -> None:
    """langchain-ollama's ``validate_model`` (what ``validate_model_on_init=True`` runs)."""
    response = ollama.Client(host=host, timeout=60).list()
    model_names = [model["model"] for model in response["models"]]
    if not any(model_name == m or m.startswith(f"{model_name}:") for m in model_names):
        raise ValueError(f"Model `{model_name}` not found in Ollama. Please pull the model (using `ollama pull "
                         f"{model_name}`) or specify a valid model name. Available local models: "
                         f"{', '.join(model_names)}")


def test_tag_rules() -> None:
    assert tagged("tiny-llama") == "tiny-llama:latest"
    assert tagged("qwen3:8b") == "qwen3:8b" and tagged("x:latest") == "x:latest"
    assert tagged("mlx-community/Llama-3.2-3B-4bit") == "mlx-community/Llama-3.2-3B-4bit:latest"
    assert tagged("org/name:q4") == "org/name:q4"
    assert tagged("host:5000/name") == "host:5000/name:latest"  # a port is not a tag
    assert not has_tag("host:5000/name") and has_tag("host:5000/name:v1")
    assert untagged("org/name:latest") == "org/name" and untagged("org/name:q4") == "org/name:q4"
    assert untagged("host:5000/latest") == "host:5000/latest"
    assert same_model("x", "x:latest") and not same_model("x", "x:q4")


async def test_official_client_sees_tagged_names(aliased) -> None:
    listed = await asyncio.to_thread(lambda: ollama.Client(host=aliased, timeout=60).list())
    names = [m.model for m in listed.models]
    assert names and all(n.endswith(":latest") for n in names)
    assert f"{TEST_MODEL}:latest" in names and f"{ALIAS}:latest" in names
    client = ollama.AsyncClient(host=aliased, timeout=60)
    for name in (f"{TEST_MODEL}:latest", TEST_MODEL, f"{ALIAS}:latest"):
        show = await client.show(name)
        assert "completion" in show.capabilities
        assert f"FROM {TEST_MODEL}:latest\n" in show.modelfile
    r = await client.generate(model=f"{TEST_MODEL}:latest", prompt="hi", options={"num_predict": 2})
    assert r.done and r.eval_count == 2 and r.model == f"{TEST_MODEL}:latest"  # echoes the name asked


async def test_langchain_validate_model_on_init(aliased) -> None:
    for name in (f"{TEST_MODEL}:latest", TEST_MODEL, f"{ALIAS}:latest", ALIAS):
        await asyncio.to_thread(langchain_validate_model, aliased, name)
    with pytest.raises(ValueError, match="not found"):
        await asyncio.to_thread(langchain_validate_model, aliased, "no-such-model")


async def test_ps_lists_the_alias_while_its_model_is_loaded(aliased) -> None:
    client = ollama.AsyncClient(host=aliased, timeout=60)
    await client.generate(model=f"{ALIAS}:latest", prompt="", keep_alive="5m")  # load through the alias
    running = {m.model: m for m in (await client.ps()).models}
    assert {f"{TEST_MODEL}:latest", f"{ALIAS}:latest"} <= set(running)
    assert running[f"{ALIAS}:latest"].size == running[f"{TEST_MODEL}:latest"].size > 0
    # Unload by the tagged alias: both entries go.
    await client.generate(model=f"{ALIAS}:latest", prompt="", keep_alive=0)
    names = [m.model for m in (await client.ps()).models]
    assert f"{TEST_MODEL}:latest" not in names and f"{ALIAS}:latest" not in names
    await client.generate(model=f"{TEST_MODEL}:latest", prompt="", keep_alive="5m")  # load by the tagged name
    names = [m.model for m in (await client.ps()).models]
    assert f"{TEST_MODEL}:latest" in names and f"{ALIAS}:latest" in names
