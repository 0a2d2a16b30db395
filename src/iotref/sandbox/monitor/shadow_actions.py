"""The monitor's shadow actions: show a provisioned device's shadow, merge into its desired
state, check such a change without making it, and switch ``sendTelemetryData``; changes go
through the shadow service's update path, checked first by its own rules."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from iotref.protocol import shadow_document as sd
from iotref.sandbox.context import SandboxContext
from iotref.sandbox.http_errors import ApiError, read_json_object
from iotref.sandbox.monitor.access import MonitorAccess
from iotref.sandbox.monitor.params import client_id_of
from iotref.sandbox.monitor.sources import ShadowSource, ThingSource
from iotref.sandbox.monitor.views import DeviceViews


async def json_body(request: Request) -> dict[str, Any]:
    """The body as a JSON object; 400 for anything else, including absurd nesting."""
    try:
        return await read_json_object(request)
    except RecursionError:
        raise ApiError(400, "invalid_request", "body is nested too deeply") from None


def desired_update(body: dict[str, Any], limits: sd.ShadowLimits = sd.DEFAULT_LIMITS) -> bytes:
    """``{"desired": {...}, "version": n?}`` as a shadow update, checked by the shadow
    service's own rules; 400/413 JSON if it would be rejected."""
    if "desired" not in body:
        raise ApiError(400, "invalid_request", "desired (a JSON object) is required")
    desired = body["desired"]
    if not isinstance(desired, dict):
        raise ApiError(400, "invalid_request", "desired must be a JSON object")
    update: dict[str, Any] = {"state": {"desired": desired}}
    if "version" in body:
        update["version"] = body["version"]
    try:
        payload = sd.to_json(update)
    except RecursionError:
        # json.loads took it, but with the two levels added here it is too deep to dump.
        raise ApiError(400, "invalid_request", "desired is nested too deeply") from None
    try:
        sd.parse_update(payload, limits)
    except sd.ShadowError as exc:
        raise ApiError(
            exc.code if 400 <= exc.code < 500 else 400,
            "invalid_shadow_update",
            exc.message,
            body={"error": "invalid_shadow_update", "code": exc.code, "message": exc.message},
        ) from None
    return payload


class ShadowActions:
    """``/monitor/api/devices/{client_id}/shadow``, ``.../shadow/validate`` and
    ``.../send-telemetry``."""

    def __init__(
        self,
        ctx: SandboxContext,
        access: MonitorAccess,
        views: DeviceViews,
        shadows: ShadowSource,
        things: ThingSource,
    ) -> None:
        self.ctx = ctx
        self.access = access
        self.views = views
        self.shadows = shadows
        self.things = things

    @property
    def _limits(self) -> sd.ShadowLimits:
        return self.ctx.settings.limits.shadow_document

    def _known_thing(self, client_id: str) -> None:
        if self.things.get(client_id) is None:
            raise ApiError(404, "not_found", f"no provisioned device {client_id}")

    async def shadow(self, request: Request) -> Response:
        if request.method == "GET":
            self.access.check(request)
            client_id = client_id_of(request)
            self._known_thing(client_id)
            shadow = self.views.shadow(client_id)
            if shadow is None:
                raise ApiError(404, "not_found", f"{client_id} has no shadow")
            return JSONResponse(shadow)
        self.access.check_write(request)
        client_id = client_id_of(request)
        self._known_thing(client_id)
        payload = desired_update(await json_body(request), self._limits)
        return await self._update(client_id, payload)

    async def validate(self, request: Request) -> Response:
        self.access.check_write(request)
        client_id_of(request)
        payload = desired_update(await json_body(request), self._limits)
        return JSONResponse({"ok": True, "update": json.loads(payload)})

    async def send_telemetry(self, request: Request) -> Response:
        self.access.check_write(request)
        client_id = client_id_of(request)
        self._known_thing(client_id)
        body = await json_body(request)
        enabled = body.get("enabled")
        if not isinstance(enabled, bool):
            raise ApiError(400, "invalid_request", "enabled must be true or false")
        payload = sd.to_json({"state": {"desired": {"sendTelemetryData": enabled}}})
        return await self._update(client_id, payload)

    async def _update(self, client_id: str, payload: bytes) -> Response:
        try:
            accepted = await self.shadows.update(client_id, None, payload)
        except sd.ShadowError as exc:
            status = exc.code if 400 <= exc.code < 500 else 503
            raise ApiError(
                status,
                "shadow_update_rejected",
                exc.message,
                body={"error": "shadow_update_rejected", "code": exc.code, "message": exc.message},
            ) from None
        return JSONResponse({"accepted": accepted, "shadow": self.views.shadow(client_id)})
