"""The fault campaign's bad-input list against the real server (Ray Serve ingress + replica, HTTP over
loopback), while four greedy streams run: nesting 1,000 and 100,000 deep in every field of both
generation routes and as the whole body, tool-call arguments nested 100,000 deep, Unicode digits as
logit_bias keys, huge n / best_of. Every one is a 4xx (400 naming the limit where one applies, never
a 429 for a request that can never run), no 5xx is counted, and the streams keep their tokens."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest

from actors.model.reference import greedy_reference

pytestmark = pytest.mark.integration

PROMPTS = ["The quick brown fox", "Elastic experts", "one two three", "MoGE groups"]
COMPLETION_FIELDS = ["prompt", "stop", "logit_bias", "response_format", "stream_options", "user", "seed", "n",
                     "stop_token_ids", "unknown_field"]
CHAT_FIELDS = ["messages", "tools", "tool_choice", "response_format", "logit_bias", "stop", "unknown_field"]


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def with_raw(base: dict, field: str, raw: str) -> bytes:
    """`base` as JSON with `field` set to the raw JSON text `raw` (too deep for json.dumps)."""
    body = {k: v for k, v in base.items() if k != field}
    text = json.dumps({**body, field: "@@"})
    return text.replace('"@@"', raw).encode()


def bad_bodies(model: str) -> list[tuple[str, str, bytes]]:
    completion = {"model": model, "prompt": "x", "max_tokens": 2}
    chat = {"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    out = []
    for depth in (1_000, 100_000):
        for field in COMPLETION_FIELDS:
            out.append((f"completions {field} nested {depth}", "/v1/completions", with_raw(completion, field, nested(depth))))
        for field in CHAT_FIELDS:
            out.append((f"chat {field} nested {depth}", "/v1/chat/completions", with_raw(chat, field, nested(depth))))
        out.append((f"whole body nested {depth}", "/v1/completions", nested(depth).encode()))
        deep_object = '{"a":' * depth + "1" + "}" * depth
        out.append((f"completions prompt object nested {depth}", "/v1/completions", with_raw(completion, "prompt", deep_object)))
    deep_args = json.dumps({"model": model, "max_tokens": 2, "messages": [
        {"role": "user", "content": "call it"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "f", "arguments": nested(100_000)}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}).encode()
    out.append(("tool-call arguments nested 100000", "/v1/chat/completions", deep_args))
    for key in ("²", "١", "٣٤", "1²", "-1", " 1", "1e3"):
        out.append((f"logit_bias key {key!r}", "/v1/completions",
                    json.dumps({**completion, "logit_bias": {key: 1}}).encode()))
    for name, value in (("n", 2**63), ("n", 1000), ("n", 0), ("n", -1), ("best_of", 1000), ("best_of", 2**64),
                        ("n", 1.5), ("n", "2")):
        out.append((f"{name}={value!r}", "/v1/completions", json.dumps({**completion, name: value}).encode()))
        if name == "n":
            out.append((f"chat {name}={value!r}", "/v1/chat/completions", json.dumps({**chat, name: value}).encode()))
    return out


def five_xx(text: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(r'^moge_requests_total\{[^}]*status="5\d\d"[^}]*\} (\S+)$', text, re.M))


def test_every_bad_body_is_a_4xx_and_streams_keep_their_tokens(moge_server, reference_model):
    tok = reference_model.tokenizer
    expected = [greedy_reference(reference_model, tok.encode(p), 32, stop_at_eos=False) for p in PROMPTS]
    headers = {"Authorization": f"Bearer {moge_server.api_key}"}
    cases = bad_bodies(moge_server.model)

    async def stream(c: httpx.AsyncClient, prompt: str) -> list[int]:
        body = {"model": moge_server.model, "prompt": prompt, "max_tokens": 32, "temperature": 0, "stream": True,
                "return_token_ids": True, "ignore_eos": True}
        ids: list[int] = []
        async with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    assert "error" not in event, event
                    for choice in event["choices"]:
                        ids += choice.get("token_ids") or []
        return ids

    async def main():
        async with httpx.AsyncClient(base_url=moge_server.base_url, headers=headers, timeout=120) as c:
            before = five_xx((await c.get("/metrics")).text)
            streams = [asyncio.create_task(stream(c, p)) for p in PROMPTS]
            answers = []
            for name, path, body in cases:
                r = await c.post(path, content=body, headers={"Content-Type": "application/json"})
                answers.append((name, r.status_code, r.json()["error"]))
            tokens = await asyncio.wait_for(asyncio.gather(*streams), 300)
            after = five_xx((await c.get("/metrics")).text)
            return answers, tokens, after - before

    answers, tokens, new_5xx = asyncio.run(main())
    not_4xx = [(n, s) for n, s, _ in answers if not 400 <= s < 500 or s == 429]
    assert not not_4xx, not_4xx
    assert new_5xx == 0
    assert tokens == expected
    deep = [e for n, s, e in answers if "nested 100000" in n and n != "tool-call arguments nested 100000"]
    assert all("nested deeper than the limit of 64 levels" in e["message"] for e in deep), deep[:3]
    assert [e["code"] for n, _, e in answers if n == "tool-call arguments nested 100000"] == ["json_too_deep"]
    assert all(e["param"] == "logit_bias" for n, _, e in answers if n.startswith("logit_bias key"))
