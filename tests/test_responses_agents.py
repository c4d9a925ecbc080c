"""The OpenAI Agents SDK (``openai-agents``) running a one-tool agent against
mlxgate's /v1/responses on the generated model.

The model has random weights, so the first turn forces the call
(``tool_choice="required"``: the MLX engine's grammar makes the answer one
valid call); the Agents SDK then resets tool_choice (its default
``reset_tool_choice``) and the model answers.  The agent has a structured
``output_type``, so its answer follows a JSON schema (the engine's grammar)
and ends: free text from random weights would run to the token limit, a
``response.incomplete`` the Agents SDK treats as a failure.
Runs twice: with the whole history sent each turn (the SDK's default), and
with ``auto_previous_response_id`` (mlxgate's store keeps the conversation).
"""

from __future__ import annotations

import pytest

agents = pytest.importorskip("agents")

from agents import (  # noqa: E402
    Agent,
    ModelSettings,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from typing import Literal  # noqa: E402

from openai import AsyncOpenAI  # noqa: E402
from pydantic import BaseModel  # noqa: E402

pytestmark = pytest.mark.timeout(180)


class Forecast(BaseModel):
    sunny: bool


@pytest.mark.parametrize("chained", [False, True], ids=["history", "previous_response_id"])
async def test_a_one_tool_agent_calls_its_tool_and_answers(stack, chained):
    set_tracing_disabled(True)  # nothing leaves this machine
    calls: list[str] = []

    @function_tool
    def get_weather(city: Literal["Paris", "Oslo"]) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"It is sunny in {city}."

    client = AsyncOpenAI(base_url=f"{stack.base}/v1", api_key="x", max_retries=0, timeout=120)
    try:
        agent = Agent(
            name="weather",
            instructions="Answer weather questions with the tool.",
            tools=[get_weather],
            model=OpenAIResponsesModel(model=stack.model, openai_client=client),
            output_type=Forecast,
            model_settings=ModelSettings(tool_choice="required", max_tokens=200, temperature=0),
        )
        result = await Runner.run(agent, "What's the weather in Paris?", max_turns=4,
                                  auto_previous_response_id=chained)
    finally:
        await client.close()
    assert calls in (["Paris"], ["Oslo"])
    assert isinstance(result.final_output, Forecast)
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"] and kinds[-1] == "message_output_item"
    assert len(result.raw_responses) == 2 and all(r.response_id.startswith("resp_") for r in result.raw_responses)
