"""Admin HTTP routes under /admin, separate from the OpenAI routes and their keys.

  GET  /admin/status                      workers, devices, groups, epoch, per-group load, imbalance
  POST /admin/scale   {"devices": N}      grow or shrink to N expert workers, live
  POST /admin/migrate {"group": g, "worker": "w1", "replicate": false}

Keys: server.admin_keys only. Without an admin key the admin routes refuse every call (403): an
OpenAI API key never opens cluster control (scale, migrate), and no key means nobody can.
Bodies are small JSON objects, limited by server.admin_max_body_bytes (cluster/serve/middleware/request_guard.py).
The routes forward to the controller actor; its refusals come back as 400 / 409, and an
unreachable controller as 503 on these routes only (serving is unaffected).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from cluster.serve.middleware.auth import ApiKeys
from cluster.serve.errors import AdminDisabled, APIError, InvalidRequest

ADMIN_PREFIX = "/admin"


class OperationInFlight(APIError):
    status = 409
    type = "conflict_error"
    code = "operation_in_flight"


class ControllerUnavailable(APIError):
    status = 503
    type = "service_unavailable"
    code = "controller_unavailable"


class ScaleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    devices: int = Field(ge=1, description="expert workers (devices) wanted")


class MigrateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    group: int = Field(ge=0)
    worker: str = Field(min_length=1, max_length=64)
    replicate: bool = False


def admin_keys(settings: Any) -> ApiKeys:
    return ApiKeys(settings.admin_keys)  # no fallback to api_keys: serving access is not cluster control


def admin_router(controller: Callable[[], Any], keys: ApiKeys, timeout_s: float = 600.0) -> APIRouter:
    """`controller()` returns the controller actor handle (looked up per call: it may restart)."""
    router = APIRouter(prefix=ADMIN_PREFIX)

    def authorise(request: Request) -> None:
        if not keys.enabled:
            raise AdminDisabled("The admin API is disabled: set server.admin_keys (--admin-key)")
        keys.check(request.headers.get("authorization"))

    async def call(method: str, *args: Any) -> Any:
        from cluster.elastic.controller import BadRequest, ControllerBusy

        try:
            handle = controller()
        except Exception as e:  # noqa: BLE001 - no controller actor (yet, or it is restarting)
            raise ControllerUnavailable(f"the elastic controller is not reachable: {e}") from e
        try:
            return await asyncio.wait_for(getattr(handle, method).remote(*args), timeout_s)
        except BadRequest as e:
            raise InvalidRequest(str(getattr(e, "cause", None) or e)) from e
        except ControllerBusy as e:
            raise OperationInFlight("another scaling or migration operation is in flight; retry later") from e
        except (asyncio.TimeoutError, TimeoutError) as e:
            raise ControllerUnavailable(f"the controller did not answer within {timeout_s}s") from e
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 - actor died / restarting
            if type(e).__module__.startswith("ray"):
                raise ControllerUnavailable(f"the elastic controller failed: {type(e).__name__}") from e
            raise

    @router.get("/status")
    async def status(request: Request) -> JSONResponse:
        authorise(request)
        return JSONResponse(await call("status"))

    @router.post("/scale")
    async def scale(request: Request) -> JSONResponse:
        authorise(request)
        body = ScaleRequest.model_validate_json(await request.body())
        return JSONResponse(await call("scale", body.devices))

    @router.post("/migrate")
    async def migrate(request: Request) -> JSONResponse:
        authorise(request)
        body = MigrateRequest.model_validate_json(await request.body())
        return JSONResponse(await call("migrate", body.group, body.worker, body.replicate))

    return router
