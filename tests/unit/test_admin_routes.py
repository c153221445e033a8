"""The admin routes as an elastic replica mounts them beside the OpenAI routes, over a scripted
controller handle (no Ray): their own keys, 400/409/503 mapping, and the CLI's serve flags. The real
controller behind real HTTP is tests/integration/test_elastic_http.py."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from cluster.serve.admin_api import admin_keys, admin_router
from cluster.config import MogeConfig
from cluster.elastic.controller import BadRequest, ControllerBusy
from cluster.serve.metrics.replica import ReplicaMetrics
from cluster.serve.ingress.http_app import build_http_app
from cluster.serve.openai_server import OpenAIServer, ServedModel

API_KEY, ADMIN_KEY = "sk-api", "sk-admin"


class _Method:
    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args):
        async def answer():
            return self.fn(*args)

        return answer()


class ScriptedController:
    """Answers like ElasticController: status with a device count, scale/migrate refusals."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.status = _Method(lambda: {"epoch": 3, "devices": 2, "workers": {"w0": {}, "w1": {}}})
        self.scale = _Method(self._scale)
        self.migrate = _Method(self._migrate)

    def _scale(self, devices: int) -> dict:
        self.calls.append(("scale", devices))
        if devices > 4:
            raise BadRequest("devices must be an integer in [1, 4]")
        if devices == 3:
            raise ControllerBusy("another operation is in flight")
        return {"phase": "done", "epoch": 4}

    def _migrate(self, group: int, worker: str, replicate: bool) -> dict:
        self.calls.append(("migrate", group, worker, replicate))
        raise BadRequest(f"unknown worker {worker!r}")


def make_app(controller, **server):
    cfg = MogeConfig.load(env={}, server=server)
    model = ServedModel(name="m", tokenizer=None, max_model_len=64)
    front = OpenAIServer(engine=None, model=model, settings=cfg.server, metrics=ReplicaMetrics("m"))
    return build_http_app(front, admin=admin_router(controller, admin_keys(cfg.server)))


def request(app, method: str, path: str, key: str | None, **kwargs) -> httpx.Response:
    async def go():
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        headers.update(kwargs.pop("headers", {}))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.request(method, path, headers=headers, **kwargs)

    return asyncio.run(go())


def test_admin_routes_take_admin_keys_only():
    ctl = ScriptedController()
    app = make_app(lambda: ctl, api_keys=[API_KEY], admin_keys=[ADMIN_KEY])
    assert request(app, "GET", "/admin/status", None).status_code == 401
    assert request(app, "GET", "/admin/status", API_KEY).status_code == 401  # an API key is not an admin key
    ok = request(app, "GET", "/admin/status", ADMIN_KEY)
    assert ok.status_code == 200 and ok.json()["devices"] == 2
    assert request(app, "GET", "/v1/models", ADMIN_KEY).status_code == 401  # nor the other way round
    assert request(app, "GET", "/v1/models", API_KEY).status_code == 200
    # the admin keys guard the whole prefix, before any body is read: unknown paths too
    assert request(app, "GET", "/admin/nothing", None).status_code == 401
    assert request(app, "GET", "/admin/nothing", ADMIN_KEY).status_code == 404


def test_admin_is_off_without_an_admin_key_even_with_api_keys():
    ctl = ScriptedController()
    off = request(make_app(lambda: ctl, api_keys=[API_KEY]), "GET", "/admin/status", API_KEY)
    assert off.status_code == 403 and off.json()["error"]["code"] == "admin_disabled"
    scale = request(make_app(lambda: ctl, api_keys=[API_KEY]), "POST", "/admin/scale", API_KEY, json={"devices": 2})
    assert scale.status_code == 403 and ctl.calls == []
    assert request(make_app(lambda: ctl), "GET", "/admin/status", None).status_code == 403


def test_admin_bodies_are_limited():
    ctl = ScriptedController()
    big = b'{"devices": 2, "pad": "' + b"x" * (32 << 10) + b'"}'
    r = request(make_app(lambda: ctl, admin_keys=[ADMIN_KEY]), "POST", "/admin/scale", ADMIN_KEY, content=big,
                headers={"Content-Type": "application/json"})
    assert r.status_code == 413


@pytest.mark.parametrize("path, body, status", [
    ("/admin/scale", {"devices": 0}, 400),
    ("/admin/scale", {"devices": "two"}, 400),
    ("/admin/scale", {"devices": 2, "extra": 1}, 400),
    ("/admin/scale", {"devices": 9}, 400),       # the controller's bounds
    ("/admin/scale", {"devices": 3}, 409),       # another operation in flight
    ("/admin/scale", {"devices": 2}, 200),
    ("/admin/migrate", {"group": -1, "worker": "w0"}, 400),
    ("/admin/migrate", {"group": 0, "worker": "w9"}, 400),
])
def test_admin_errors_map_to_4xx(path, body, status):
    ctl = ScriptedController()
    r = request(make_app(lambda: ctl, admin_keys=[ADMIN_KEY]), "POST", path, ADMIN_KEY, json=body)
    assert r.status_code == status, r.text
    if status >= 400:
        assert r.json()["error"]["message"]


def test_unreachable_controller_is_503_on_admin_routes_only():
    def gone():
        raise ValueError("Failed to look up actor 'moge-controller'")

    r = request(make_app(gone, admin_keys=[ADMIN_KEY]), "GET", "/admin/status", ADMIN_KEY)
    assert r.status_code == 503 and r.json()["error"]["code"] == "controller_unavailable"


def test_serve_flags_for_expert_workers():
    from cluster.cli.main import build_parser, check_topology, overrides_from_args

    def parse(*argv):
        args = build_parser().parse_args(["serve", *argv])
        return args, MogeConfig.load(env={}, **overrides_from_args(args))

    args, cfg = parse("--elastic", "--workers", "2", "--admin-key", "k")
    assert (cfg.data_plane.transport, cfg.data_plane.num_workers, cfg.server.admin_keys) == ("grpc", 2, ["k"])
    assert check_topology(args, cfg) is None
    args, cfg = parse("--transport", "collective")
    assert cfg.data_plane.transport == "collective" and check_topology(args, cfg) is None
    assert "inprocess" in check_topology(*parse("--elastic", "--transport", "inprocess"))
    assert "--workers" in check_topology(*parse("--workers", "2"))
    assert "max_devices" in check_topology(*parse("--elastic", "--workers", "9"))
    assert build_parser().parse_args(["status"]).func.__name__ == "status_command"
