"""LangChain's ChatOpenAI, unmodified, against the real server (Ray + Serve on 127.0.0.1): invoke,
stream, bind_tools with a required choice, with_structured_output. Random weights: the grammar makes
the tool call and the structured answer valid."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.integration

langchain_openai = pytest.importorskip("langchain_openai", reason="langchain-openai is in the dev extra")


class Forecast(BaseModel):
    """A weather forecast."""

    city: str = Field(max_length=10)
    sky: Literal["sunny", "rainy", "cloudy"]
    high: int = Field(ge=-40, le=50)


class GetWeather(BaseModel):
    """Look up the weather in a city."""

    city: str = Field(max_length=10)


def chat_model(server, max_tokens: int):
    return langchain_openai.ChatOpenAI(
        model=server.model, base_url=f"{server.base_url}/v1", api_key=server.api_key,
        max_retries=0, timeout=60, temperature=0, max_tokens=max_tokens,
    )


@pytest.fixture(scope="module")
def llm(moge_server):
    return chat_model(moge_server, 24)


def test_invoke_and_stream(llm):
    msg = llm.invoke("Say hello")
    assert isinstance(msg.content, str) and msg.response_metadata["finish_reason"] in ("stop", "length")
    pieces = [chunk.content for chunk in llm.stream("Say hello")]
    assert "".join(pieces) == msg.content  # greedy: the stream spells the same answer


def test_bind_tools_with_a_required_choice(moge_server):
    bound = chat_model(moge_server, 200).bind_tools([GetWeather], tool_choice="required")
    msg = bound.invoke("What is the weather in Oslo?")
    assert len(msg.tool_calls) >= 1
    for call in msg.tool_calls:
        assert call["name"] == "GetWeather"
        GetWeather.model_validate(call["args"])


def test_with_structured_output(moge_server):
    structured = chat_model(moge_server, 200).with_structured_output(Forecast)
    result = structured.invoke("Forecast for Oslo")
    assert isinstance(result, Forecast)
