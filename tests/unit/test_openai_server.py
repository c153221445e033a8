"""The HTTP front in one process over a scripted engine (no Ray): request checks that need the
server's configuration, auth, body limit, n-way merging, stream cleanup, metrics, Serve options,
and the CLI's argument handling. The real engine over real HTTP is tests/integration."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import httpx
import pytest

from actors.engine.sampling_params import SamplingParams
from cluster.serve.middleware.auth import ApiKeys
from cluster.config import MogeConfig
from cluster.serve.errors import AuthenticationFailed
from cluster.serve.metrics.replica import ReplicaMetrics
from cluster.serve.ingress.http_app import build_http_app
from cluster.serve.streaming import ClosingStreamingResponse, _merge
from cluster.serve.openai_server import OpenAIServer, ServedModel

KEY = "sk-unit"


@dataclass
class Out:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    cached_tokens: int = 0


class LetterTokenizer:
    """One token per character, ids = code points; 'a' + k decodes as k."""

    vocab_size = 1000
    bos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        return "".join(f"{m['role']}:{m['content']}\n" for m in messages)


class ScriptedEngine:
    """Answers every request with tokens 'a', 'b', ... up to max_tokens; remembers what it was
    asked and which requests were abandoned before finishing."""

    def __init__(self) -> None:
        self.requests: dict[str, tuple[list[int], SamplingParams]] = {}
        self.aborted: list[str] = []
        self.running = 0
        self.cached: dict[int, int] = {}  # choice index -> prompt tokens it reports as cached

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams):
        self.requests[request_id] = (prompt_ids, params)

        async def stream():
            self.running += 1
            finished = False
            try:
                n = params.max_tokens or 1
                for k in range(n):
                    await asyncio.sleep(0)
                    finished = k == n - 1
                    cached = self.cached.get(int(request_id.rsplit("-", 1)[1]), 0)
                    yield Out(request_id, [97 + k], chr(97 + k), finished, "length" if finished else None, cached)
            finally:
                self.running -= 1
                if not finished:
                    self.aborted.append(request_id)

        return stream()

    def stats(self):
        return {"waiting": 0, "running": self.running, "kv_usage": 0.0, "prefix_cache_queried_tokens": 8,
                "prefix_cache_hit_tokens": 2}


def make_app(**server):
    cfg = MogeConfig.load(env={}, server={"api_keys": [KEY], "max_n": 4, "max_body_bytes": 2048, **server})
    engine = ScriptedEngine()
    model = ServedModel(name="m", tokenizer=LetterTokenizer(), max_model_len=64)
    metrics = ReplicaMetrics("m", engine.stats)
    return build_http_app(OpenAIServer(engine, model, cfg.server, metrics)), engine, metrics


async def call(app, method: str, path: str, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if "content" in kwargs:  # raw bodies in these tests are JSON (or meant to be)
        headers["Content-Type"] = "application/json"
    headers.update(kwargs.pop("headers", {}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        return await client.request(method, path, headers=headers, **kwargs)


def run(coro):
    return asyncio.run(coro)


def test_completion_maps_the_request_onto_engine_params():
    app, engine, _ = make_app()
    r = run(call(app, "POST", "/v1/completions", json={
        "model": "m", "prompt": "hey", "max_tokens": 3, "temperature": 0.5, "top_p": 0.9, "top_k": 5,
        "seed": 11, "stop": "zz", "return_token_ids": True,
    }))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == "abc" and body["choices"][0]["token_ids"] == [97, 98, 99]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    (ids, params), = engine.requests.values()
    assert ids == [104, 101, 121]
    assert (params.temperature, params.top_p, params.top_k, params.seed, params.max_tokens, params.stop) == (
        0.5, 0.9, 5, 11, 3, ["zz"]
    )


def test_default_max_tokens_is_clamped_to_the_room_left_in_the_context():
    app, engine, _ = make_app(max_tokens_default=256)
    r = run(call(app, "POST", "/v1/completions", json={"model": "m", "prompt": "x" * 60}))
    assert r.status_code == 200
    (_, params), = engine.requests.values()
    assert params.max_tokens == 4  # 64 - 60


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": "m", "prompt": "x" * 64}, 400, "prompt"),  # fills the whole context
        ({"model": "m", "prompt": "x" * 60, "max_tokens": 5}, 400, "max_tokens"),
        ({"model": "m", "prompt": [5000]}, 400, "prompt"),  # outside the vocabulary
        ({"model": "m", "prompt": "", "max_tokens": 1}, 400, "prompt"),
        ({"model": "m", "prompt": "x", "n": 5}, 400, "n"),  # max_n = 4
        ({"model": "m", "prompt": ["a", "b", "c"], "n": 2}, 400, "n"),  # 6 choices
        ({"model": "other", "prompt": "x"}, 404, "model"),
    ],
)
def test_checks_that_need_the_server_configuration(body, status, param):
    app, engine, _ = make_app()
    r = run(call(app, "POST", "/v1/completions", json=body))
    assert r.status_code == status and r.json()["error"]["param"] == param
    assert engine.requests == {}  # refused before any engine work


def test_n_times_prompts_choices_are_indexed_prompt_major():
    app, engine, _ = make_app()
    r = run(call(app, "POST", "/v1/completions", json={"model": "m", "prompt": ["ab", "c"], "n": 2, "max_tokens": 1,
                                                       "seed": 3}))
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]
    assert r.json()["usage"]["prompt_tokens"] == 3  # each prompt counted once, not per choice
    by_id = dict(sorted(engine.requests.items()))
    assert [ids for ids, _ in by_id.values()] == [[97, 98], [97, 98], [99], [99]]
    assert [p.seed for _, p in by_id.values()] == [3, 4, 3, 4]


def test_chat_stream_frames_role_deltas_finish_usage_and_done():
    app, _, _ = make_app()
    r = run(call(app, "POST", "/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "q"}], "max_tokens": 2, "stream": True,
        "stream_options": {"include_usage": True},
    }))
    events = [e[len("data: "):] for e in r.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:3]] == ["a", "b"]
    assert [c["choices"][0]["finish_reason"] for c in chunks[1:3]] == [None, "length"]
    assert chunks[3]["choices"] == [] and chunks[3]["usage"]["completion_tokens"] == 2
    assert r.headers["content-type"].startswith("text/event-stream")


def test_auth_checks_every_route_but_health():
    app, _, _ = make_app()
    assert run(call(app, "GET", "/health", key=None)).status_code == 200
    for path in ("/v1/models", "/metrics", "/nowhere"):
        r = run(call(app, "GET", path, key=None))
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert run(call(app, "GET", "/v1/models", key="nope")).status_code == 401
    assert run(call(app, "GET", "/nowhere")).status_code == 404


def test_api_keys_check():
    keys = ApiKeys(["k1", "k2"])
    keys.check("Bearer k2")
    keys.check("bearer k1")
    for header in (None, "", "k1", "Bearer", "Bearer k3", "Basic k1", "Bearer k1x"):
        with pytest.raises(AuthenticationFailed):
            keys.check(header)
    ApiKeys([]).check(None)  # no keys configured: open


def test_body_limit_is_applied_before_parsing():
    app, engine, _ = make_app()
    big = b"[" + b" " * 4096 + b"]"
    r = run(call(app, "POST", "/v1/completions", content=big))
    assert r.status_code == 413

    async def chunked():
        for _ in range(10):
            yield b" " * 512

    r = run(call(app, "POST", "/v1/completions", content=chunked()))
    assert r.status_code == 413 and engine.requests == {}


def test_validation_errors_are_400_not_422_and_unknown_method_is_405():
    app, _, _ = make_app()
    r = run(call(app, "POST", "/v1/chat/completions", json={"model": "m", "messages": [{"role": "bot", "content": "x"}]}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"
    r = run(call(app, "DELETE", "/v1/models"))
    assert r.status_code == 405 and r.json()["error"]["message"]


def test_route_counters_and_engine_gauges():
    app, _, metrics = make_app()
    run(call(app, "POST", "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2}))
    run(call(app, "GET", "/v1/models", key="bad"))
    text = run(call(app, "GET", "/metrics")).text
    assert 'moge_requests_total{route="/v1/completions",status="200"} 1.0' in text
    assert 'moge_requests_total{route="/v1/models",status="401"} 1.0' in text
    assert "moge_completion_tokens_total 2.0" in text and "moge_prompt_tokens_total 1.0" in text
    assert "moge_num_requests_running 0.0" in text
    assert "moge_prefix_cache_hit_ratio 0.25" in text


def test_cached_tokens_are_reported_once_per_prompt_whole_and_streamed():
    app, engine, _ = make_app()
    # prompts "abcd" (choices 0, 1) and "xy" (choices 2, 3): a prompt's cached tokens are those all
    # of its choices found cached, each prompt counted once
    engine.cached = {0: 4, 1: 2, 2: 1, 3: 2}
    body = {"model": "m", "prompt": ["abcd", "xy"], "n": 2, "max_tokens": 2}
    r = run(call(app, "POST", "/v1/completions", json=body))
    assert r.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}
    r = run(call(app, "POST", "/v1/completions", json={**body, "stream": True,
                                                       "stream_options": {"include_usage": True}}))
    usage = json.loads([e for e in r.text.split("\n\n") if e][-2][len("data: "):])["usage"]
    assert usage == {"prompt_tokens": 6, "completion_tokens": 8, "total_tokens": 14,
                     "prompt_tokens_details": {"cached_tokens": 3}}
    engine.cached = {0: 5}
    chat = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1}
    assert run(call(app, "POST", "/v1/chat/completions", json=chat)).json()["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 5}


def test_merge_interleaves_and_closing_it_cancels_every_source():
    closed = []

    def source(name: str, n: int):
        async def gen():
            try:
                for k in range(n):
                    await asyncio.sleep(0)
                    yield f"{name}{k}"
            finally:
                closed.append(name)

        return gen()

    async def scenario():
        merged = _merge([source("a", 100), source("b", 100)])
        got = [await anext(merged) for _ in range(4)]
        assert closed == []
        await merged.aclose()
        assert sorted(closed) == ["a", "b"]  # inside the loop: asyncio.run would close leftovers
        return got

    got = run(scenario())
    assert {i for i, _ in got} == {0, 1}


def test_merge_folds_what_waits_for_a_slow_consumer_into_one_output_per_choice():
    def source(rid: str, n: int):
        async def gen():  # never suspends: everything is queued before the consumer looks
            for k in range(n):
                yield Out(rid, [97 + k], chr(97 + k), k == n - 1, "length" if k == n - 1 else None)

        return gen()

    async def scenario():
        return [item async for item in _merge([source("x", 3), source("y", 2)])]

    got = run(scenario())
    assert [(i, o.new_token_ids, o.new_text, o.finished) for i, o in got] == [
        (0, [97, 98, 99], "abc", True), (1, [97, 98], "ab", True)]


def test_closing_streaming_response_closes_its_body_when_the_client_is_gone():
    state = {"closed": False}

    async def body():
        try:
            while True:
                yield b"data: x\n\n"
        finally:
            state["closed"] = True

    async def scenario():
        gen = body()  # the test keeps a reference: nothing is collected behind our back
        response = ClosingStreamingResponse(gen, media_type="text/event-stream")
        sent = []

        async def send(message):
            sent.append(message)
            if len(sent) == 3:
                raise OSError("client went away")

        async def receive():
            await asyncio.Event().wait()

        scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
        with pytest.raises(Exception):
            await response(scope, receive, send)
        # checked inside the loop: asyncio.run's shutdown would close any generator left open
        assert state["closed"], gen

    run(scenario())


def test_serve_options_follow_the_server_section():
    from cluster.serve.app import deployment_options

    fixed = deployment_options(MogeConfig.load(env={}, server={"num_replicas": 2, "replica_num_cpus": 0.5}))
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"]["num_cpus"] == 0.5
    auto = deployment_options(MogeConfig.load(env={}, server={
        "num_replicas": "auto", "min_replicas": 2, "max_replicas": 6, "target_ongoing_requests": 40,
    }))
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"] == {
        "min_replicas": 2, "max_replicas": 6, "initial_replicas": 2, "target_ongoing_requests": 40,
    }
    assert auto["max_ongoing_requests"] >= 80  # the target must be reachable per replica


def test_cli_flags_override_config_and_bad_model_dirs_are_named(tmp_path):
    from cluster.cli.main import build_parser, check_model_dir, example_curl, overrides_from_args

    args = build_parser().parse_args(["serve", "--model", str(tmp_path), "--port", "9001", "--api-key", "a",
                                      "--api-key", "b"])
    over = overrides_from_args(args)
    assert over == {"model": {"source": str(tmp_path.resolve())}, "server": {"port": 9001, "api_keys": ["a", "b"]}}
    assert overrides_from_args(build_parser().parse_args(["serve"])) == {}
    assert "config.json" in check_model_dir(str(tmp_path))
    assert "does not exist" in check_model_dir(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text("{}")
    assert check_model_dir(str(tmp_path)) is None and check_model_dir("preset:tiny-moge") is None
    assert "Authorization: Bearer k" in example_curl("http://h:1", "m", "k")
