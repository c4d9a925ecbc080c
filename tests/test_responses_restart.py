"""Stored responses survive a restart: a real ``python -m mlxgate_cli serve``
with its own data folder (MLXGATE_DATA_DIR), stopped with SIGTERM and
started again; the openai SDK continues the conversation across it."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.test_cli_serve import clean_env, start, stop

pytestmark = pytest.mark.timeout(240)


def test_a_conversation_continues_across_a_restart(tmp_path: Path, test_model_dir: Path) -> None:
    env = clean_env(tmp_path)  # MLXGATE_DATA_DIR=tmp_path/data
    args = ["--port", "0", "--grpc-port", "0", "--models-dir", str(test_model_dir)]

    proc, http, _ = start(args, env)
    try:
        with openai.OpenAI(base_url=f"{http}/v1", api_key="x", max_retries=0, timeout=120) as oai:
            first = oai.responses.create(model="tiny-llama", instructions="Be brief.", input="Remember: blue.",
                                         max_output_tokens=4, temperature=0, metadata={"turn": "1"})
        stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (tmp_path / "data" / "responses.sqlite3").is_file()

    proc, http, _ = start(args, env)
    try:
        with openai.OpenAI(base_url=f"{http}/v1", api_key="x", max_retries=0, timeout=120) as oai:
            again = oai.responses.retrieve(first.id)
            assert again.model_dump() == first.model_dump()
            assert [i.content[0].text for i in oai.responses.input_items.list(first.id).data] == ["Remember: blue."]
            second = oai.responses.create(model="tiny-llama", instructions="Be brief.", input="Which colour?",
                                          previous_response_id=first.id, max_output_tokens=4, temperature=0)
            assert second.previous_response_id == first.id and second.output_text
            # The first turn came back from the database: the prompt holds it.
            assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
            third = oai.responses.create(model="tiny-llama", instructions="Be brief.", input="Sure?",
                                         previous_response_id=second.id, max_output_tokens=4, temperature=0)
            # Within this process the engine's prompt cache serves the conversation so far.
            assert third.usage.input_tokens_details.cached_tokens >= second.usage.input_tokens
        stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
