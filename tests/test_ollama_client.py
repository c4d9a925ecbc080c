"""The official ``ollama`` package against the real stack: the conformance judge."""

from __future__ import annotations

import base64

import pytest
from ollama import AsyncClient, ResponseError

from tests.images import png


@pytest.fixture
def client(stack) -> AsyncClient:
    return AsyncClient(host=stack.base, timeout=60)


OPTS = {"num_predict": 8, "seed": 2}


async def test_generate(client, stack):
    r = await client.generate(model=stack.model, prompt="Why is the sky blue?", options=OPTS)
    assert r.done is True and r.done_reason == "length"
    assert r.model == stack.model and r.response
    assert r.eval_count == 8 and r.prompt_eval_count > 0
    assert r.total_duration > 0 and r.eval_duration > 0


async def test_generate_stream(client, stack):
    parts = [p async for p in await client.generate(model=stack.model, prompt="Hi", options=OPTS, stream=True)]
    assert [p.done for p in parts].count(True) == 1 and parts[-1].done
    assert parts[-1].eval_count == 8
    assert "".join(p.response for p in parts)


async def test_generate_with_system_keep_alive_and_format(client, stack):
    r = await client.generate(model=stack.model, prompt="Hi", system="Be terse.", keep_alive="1m",
                              options={"num_predict": 4, "temperature": 0})
    assert r.eval_count == 4
    j = await client.generate(model=stack.model, prompt="JSON please", format="json",
                              options={"num_predict": 200, "seed": 0})
    assert j.response.lstrip().startswith("{")


async def test_chat(client, stack):
    msgs = [{"role": "user", "content": "Hello!"}]
    r = await client.chat(model=stack.model, messages=msgs, options=OPTS)
    assert r.message.role == "assistant" and r.message.content
    assert r.done_reason == "length" and r.eval_count == 8
    parts = [p async for p in await client.chat(model=stack.model, messages=msgs, options=OPTS, stream=True)]
    assert parts[-1].done and all(p.message.role == "assistant" for p in parts)
    assert "".join(p.message.content for p in parts)


async def test_chat_with_tools_and_tool_history(client, stack):
    def get_weather(city: str) -> str:
        """Get the weather.

        Args:
          city: the city
        """
        return "sunny"

    msgs = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
    ]
    r = await client.chat(model=stack.model, messages=msgs, tools=[get_weather], options={"num_predict": 4})
    assert r.done and r.message.role == "assistant"
    assert r.prompt_eval_count > 0


async def test_images_reach_the_backend(client, stack):
    # The test model has no vision: the backend's 400 proves the image arrived decoded.
    img = base64.b64encode(png()).decode()
    with pytest.raises(ResponseError) as e:
        await client.chat(model=stack.model, messages=[{"role": "user", "content": "what?", "images": [img]}])
    assert e.value.status_code == 400 and e.value.error == f"model {stack.model} does not take images"


async def test_embed(client, stack):
    r = await client.embed(model=stack.model, input=["a", "b", "c"])
    assert len(r.embeddings) == 3 and len(r.embeddings[0]) > 8
    assert r.prompt_eval_count > 0
    one = await client.embeddings(model=stack.model, prompt="a")
    assert one.embedding == pytest.approx(r.embeddings[0], abs=1e-4)


async def test_list_show_ps(client, stack):
    lst = await client.list()
    m = next(m for m in lst.models if m.model == f"{stack.model}:latest")  # Ollama's names carry a tag
    assert m.size > 0 and m.modified_at is not None and m.details.family
    show = await client.show(stack.model)
    assert "completion" in show.capabilities and show.modelinfo and show.template
    await client.generate(model=stack.model, prompt="", keep_alive="5m")  # load
    ps = await client.ps()
    running = next(p for p in ps.models if p.model == f"{stack.model}:latest")
    assert running.size > 0 and running.expires_at is not None and running.context_length > 0


async def test_unknown_model_raises_404(client, stack):
    with pytest.raises(ResponseError) as e:
        await client.generate(model="no-such-model", prompt="x")
    assert e.value.status_code == 404 and "no-such-model" in e.value.error
    with pytest.raises(ResponseError) as e:
        await client.chat(model="no-such-model", messages=[{"role": "user", "content": "x"}], stream=False)
    assert e.value.status_code == 404
    with pytest.raises(ResponseError) as e:
        [p async for p in await client.chat(model="no-such-model", messages=[{"role": "user", "content": "x"}],
                                            stream=True)]
    assert e.value.status_code == 404
    with pytest.raises(ResponseError) as e:
        await client.show("no-such-model")
    assert e.value.status_code == 404


async def test_pulling_a_model_the_hub_lacks_is_404(client, stack):
    # The session's hub is an empty fake (tests/stack.py); pulls that succeed:
    # tests/test_pull_serve.py.
    with pytest.raises(ResponseError) as e:
        await client.pull("llama3.2")
    assert e.value.status_code == 404 and "not found" in e.value.error
    assert "mlx-community/Llama-3.2-3B-Instruct-4bit" in e.value.error
