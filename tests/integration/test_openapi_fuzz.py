"""Schemathesis over the server's own /openapi.json: no generated request may get a 5xx.

Real Ray + Serve app on 127.0.0.1. Bounded: a fixed number of examples per operation and a wall-clock
budget (~60 s on 2 cores); generation lengths are capped so valid bodies stay cheap to serve.
"""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.integration

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402  (schemathesis brings hypothesis)

BUDGET_S = 60.0
EXAMPLES = 25
CAPS = {"max_tokens": 4, "max_completion_tokens": 4, "max_output_tokens": 4, "n": 2, "best_of": 2, "top_logprobs": 2, "logprobs": 2}


def cap(body):
    """Keep fuzzed generation requests small (the fuzzing is about validation, not long outputs)."""
    if isinstance(body, dict):
        for key, limit in CAPS.items():
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > limit:
                body[key] = limit
    return body


def test_no_generated_request_gets_a_5xx(moge_server):
    schema = schemathesis.openapi.from_url(
        f"{moge_server.base_url}/openapi.json", headers={"Authorization": f"Bearer {moge_server.api_key}"}
    )
    deadline = time.monotonic() + BUDGET_S
    failures: list[str] = []
    ran = 0
    with moge_server.http(timeout=30) as client:
        for result in schema.get_all_operations():
            operation = result.ok()
            method, path = operation.method.upper(), operation.path
            strategy = operation.as_strategy()

            @given(case=strategy)
            @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def run_case(case):
                nonlocal ran
                if time.monotonic() > deadline:
                    return
                ran += 1
                url = path
                for name, value in (case.path_parameters or {}).items():
                    url = url.replace("{" + name + "}", str(value))
                kwargs = {"params": case.query} if case.query else {}
                if method == "POST" and type(case.body).__name__ != "NotSet":  # bodiless POSTs (cancel) send none
                    kwargs["json"] = cap(case.body)
                r = client.request(method, url, **kwargs)
                if r.status_code >= 500:
                    failures.append(f"{method} {url} {str(case.body)[:300]} -> {r.status_code} {r.text[:300]}")

            run_case()
    assert ran > 50
    assert not failures, "\n".join(failures[:10])
