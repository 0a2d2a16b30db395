"""The sandbox's debug monitor (a component): a web page, its JSON API and a live stream,
all under ``/monitor`` and all behind the admin token (``access.py``). Its routes:

* ``GET /monitor`` the page; ``GET /monitor/assets/{name}`` its static files (``page.py``).
* ``GET /monitor/api/summary``, ``.../devices/{clientId}``, ``.../devices/{clientId}/messages``
  and ``.../messages/{id}``: devices, totals, rates, pending approvals, stored messages
  (``api.py``).
* ``GET|POST .../devices/{clientId}/shadow``, ``POST .../shadow/validate`` and
  ``POST .../send-telemetry``: the shadow and its desired state (``shadow_actions.py``).
* ``GET /monitor/api/stream``: server-sent events (``stream.py``).

:meth:`Monitor.openapi` describes them (``openapi.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from starlette.routing import BaseRoute, Route

from iotref.sandbox.context import SandboxContext
from iotref.sandbox.monitor.access import MonitorAccess
from iotref.sandbox.monitor.api import MonitorApi
from iotref.sandbox.monitor.openapi import monitor_fragment
from iotref.sandbox.monitor.page import MonitorPage
from iotref.sandbox.monitor.shadow_actions import ShadowActions
from iotref.sandbox.monitor.sources import (
    ApprovalSource,
    ShadowSource,
    TelemetrySource,
    ThingSource,
)
from iotref.sandbox.monitor.stream import MonitorStream
from iotref.sandbox.monitor.views import ONLINE_WINDOW_SECONDS, DeviceViews
from iotref.sandbox.quota_meter import QuotaMeter

API = "/monitor/api"


class Monitor:
    """Sandbox component: the monitor's page, API and live stream."""

    def __init__(
        self,
        ctx: SandboxContext,
        ingestion: TelemetrySource,
        shadows: ShadowSource,
        directory: ApprovalSource,
        things: ThingSource,
        *,
        online_window: float = ONLINE_WINDOW_SECONDS,
        meter: QuotaMeter | None = None,
    ) -> None:
        self.ctx = ctx
        limits = ctx.settings.limits
        self.meter = meter or QuotaMeter(limits.publish_rate, limits.throughput)
        self.access = MonitorAccess(ctx)
        views = DeviceViews(shadows, self.meter, online_window)
        self.page = MonitorPage(self.access)
        self.api = MonitorApi(ctx, self.access, views, ingestion, directory, things)
        self.shadow_actions = ShadowActions(ctx, self.access, views, shadows, things)
        self.stream = MonitorStream(self.access, views, ingestion)

    def routes(self) -> Sequence[BaseRoute]:
        api, actions = self.api, self.shadow_actions
        device = f"{API}/devices/{{client_id}}"
        return [
            Route("/monitor", self.page.page, methods=["GET"]),
            Route("/monitor/assets/{name}", self.page.asset, methods=["GET"]),
            Route(f"{API}/summary", api.summary, methods=["GET"]),
            Route(f"{API}/stream", self.stream.stream, methods=["GET"]),
            Route(f"{API}/messages/{{message_id:int}}", api.message, methods=["GET"]),
            Route(device, api.device, methods=["GET"]),
            Route(f"{device}/messages", api.device_messages, methods=["GET"]),
            Route(f"{device}/shadow", actions.shadow, methods=["GET", "POST"]),
            Route(f"{device}/shadow/validate", actions.validate, methods=["POST"]),
            Route(f"{device}/send-telemetry", actions.send_telemetry, methods=["POST"]),
        ]

    async def start(self) -> None:
        self.stream.open()

    async def stop(self) -> None:
        self.stream.close()

    def describe(self) -> dict[str, Any]:
        return {"monitor_url": f"{self.ctx.http_url}/monitor"}

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI fragment of the routes above (merged into ``/openapi.json``)."""
        return monitor_fragment()
