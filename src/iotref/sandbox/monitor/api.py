"""The monitor's JSON API for reading: the summary (devices, totals, rates, pending
approvals), one device in detail, its stored messages, and one message with its body."""

from __future__ import annotations

import dataclasses
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from iotref.sandbox.context import SandboxContext
from iotref.sandbox.http_errors import ApiError
from iotref.sandbox.monitor.access import MonitorAccess
from iotref.sandbox.monitor.params import MAX_LIMIT, SQLITE_MAX_INT, client_id_of, flag, int_param
from iotref.sandbox.monitor.sources import (
    ApprovalSource,
    TelemetrySource,
    ThingSource,
    stored_telemetry,
)
from iotref.sandbox.monitor.views import DeviceViews

RATE_SECONDS = 120
DEVICE_RATE_SECONDS = 300
SERIES_POINTS = 900
"""Speed/counter readings a device's page starts with (all its assets together; the page
keeps as many as new ones arrive)."""
LATEST_MESSAGES = 50


class MonitorApi:
    """The read endpoints under ``/monitor/api``."""

    def __init__(
        self,
        ctx: SandboxContext,
        access: MonitorAccess,
        views: DeviceViews,
        telemetry: TelemetrySource,
        approvals: ApprovalSource,
        things: ThingSource,
    ) -> None:
        self.ctx = ctx
        self.access = access
        self.views = views
        self.telemetry = telemetry
        self.approvals = approvals
        self.things = things

    async def summary(self, request: Request) -> Response:
        self.access.check(request)
        store = stored_telemetry(self.telemetry)
        now = time.time()
        counters = {c["client_id"]: c for c in store.device_list()}
        things = {t.client_id: t for t in self.things.list()}
        device = self.views.device
        devices = [device(counters.get(cid), thing, now) for cid, thing in things.items()]
        devices += [device(c, None, now) for cid, c in counters.items() if cid not in things]
        devices.sort(key=lambda d: (-(d.get("last_seen") or 0), d["client_id"]))
        return JSONResponse(
            {
                "now": now,
                "online_window": self.views.online_window,
                "limits": dataclasses.asdict(self.ctx.settings.limits),
                "ingestion": self.telemetry.status(),
                "totals": store.totals(),
                "retention": store.retention_status(),
                "rate": store.rates(None, RATE_SECONDS, now),
                "devices": devices,
                "pending_authorizations": self.approvals.pending_authorizations(),
            }
        )

    async def device(self, request: Request) -> Response:
        self.access.check(request)
        client_id = client_id_of(request)
        store = stored_telemetry(self.telemetry)
        thing = self.things.get(client_id)
        counters = store.device(client_id)
        if thing is None and counters is None:
            raise ApiError(404, "not_found", f"no device {client_id}")
        now = time.time()
        body = self.views.device(counters, thing, now)
        body["shadow"] = self.views.shadow(client_id) if thing is not None else None
        body["rate"] = store.rates(client_id, DEVICE_RATE_SECONDS, now)
        body["series"] = store.series(client_id, limit=SERIES_POINTS)
        body["messages"] = store.messages(client_id, limit=LATEST_MESSAGES)
        return JSONResponse(body)

    async def device_messages(self, request: Request) -> Response:
        self.access.check(request)
        client_id = client_id_of(request)
        limit = int_param(request, "limit", LATEST_MESSAGES, 1, MAX_LIMIT) or LATEST_MESSAGES
        before = int_param(request, "before", None, 1, SQLITE_MAX_INT)
        invalid = flag(request, "invalid")
        store = stored_telemetry(self.telemetry)
        rows = store.messages(client_id, limit=limit, before=before, invalid_only=invalid)
        return JSONResponse({"messages": rows})

    async def message(self, request: Request) -> Response:
        self.access.check(request)
        message_id = int(request.path_params["message_id"])
        found = None
        if 0 < message_id <= SQLITE_MAX_INT:
            found = stored_telemetry(self.telemetry).message(message_id)
        if found is None:
            raise ApiError(404, "not_found", "no such message")
        return JSONResponse(found)
