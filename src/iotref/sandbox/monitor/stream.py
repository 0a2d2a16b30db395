"""The monitor's live stream (server-sent events): ``message`` for each stored message,
``stats`` once a second, ``dropped`` when a slow reader missed messages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from iotref.sandbox.http_errors import ApiError
from iotref.sandbox.monitor.access import MonitorAccess
from iotref.sandbox.monitor.params import CLIENT_ID, flag
from iotref.sandbox.monitor.sources import TelemetrySource, stored_telemetry
from iotref.sandbox.monitor.views import DeviceViews
from iotref.sandbox.telemetry.feed import Subscription

STATS_INTERVAL = 1.0
SSE_BATCH = 200
KEEPALIVE_SECONDS = 15.0


def sse_event(event: str, data: Any, event_id: str | None = None) -> str:
    """One server-sent event; ``json.dumps`` never emits a raw newline."""
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class MonitorStream:
    """``GET /monitor/api/stream?device=&invalid_only=1&stats=0``; every stream ends when
    the monitor stops."""

    def __init__(
        self, access: MonitorAccess, views: DeviceViews, telemetry: TelemetrySource
    ) -> None:
        self.access = access
        self.views = views
        self.telemetry = telemetry
        self._stopping = asyncio.Event()

    def open(self) -> None:
        self._stopping.clear()

    def close(self) -> None:
        self._stopping.set()

    async def stream(self, request: Request) -> Response:
        self.access.check(request)
        device = request.query_params.get("device") or None
        if device is not None and not CLIENT_ID.fullmatch(device):
            raise ApiError(400, "invalid_request", "malformed device")
        invalid_only = flag(request, "invalid_only")
        stats = request.query_params.get("stats", "1") != "0"
        stored_telemetry(self.telemetry)
        sub = self.telemetry.feed.subscribe(device, invalid_only)
        return StreamingResponse(
            self._events(sub, device, stats),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    def _stats(self, device: str | None) -> dict[str, Any]:
        store = stored_telemetry(self.telemetry)
        now = time.time()
        quotas = self.views.meter.snapshots(now)
        devices: dict[str, dict[str, Any]] = {
            c["client_id"]: {
                "received": c["received"],
                "valid": c["valid"],
                "invalid": c["invalid"],
                "duplicates": c["duplicates"],
                "last_seen": c["last_seen"],
                "online": self.views.online(c["last_seen"], now),
            }
            for c in store.device_list()
        }
        for client_id, quota in quotas.items():
            devices.setdefault(client_id, {})["quota"] = quota
        data: dict[str, Any] = {
            "now": now,
            "totals": store.totals(),
            "rate": store.rates(None, 1, now - 1)[0][1],
            "devices": devices,
        }
        if device is not None:
            data["device_rate"] = store.rates(device, 1, now - 1)[0][1]
        return data

    async def _events(
        self, sub: Subscription, device: str | None, stats: bool
    ) -> AsyncIterator[str]:
        feed = self.telemetry.feed
        loop = asyncio.get_running_loop()
        reported_drops = 0
        next_stats = loop.time()
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            yield "retry: 2000\n\n"
            while not self._stopping.is_set():
                timeout = max(0.0, next_stats - loop.time()) if stats else KEEPALIVE_SECONDS
                getter = asyncio.ensure_future(sub.queue.get())
                done, _ = await asyncio.wait(
                    {getter, stopping}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if getter not in done:
                    getter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await getter
                    if stopping in done:
                        break
                    if not stats:
                        yield ": keepalive\n\n"
                else:
                    first = getter.result()
                    if first is None:
                        break
                    events = [first]
                    while len(events) < SSE_BATCH and not sub.queue.empty():
                        item = sub.queue.get_nowait()
                        if item is None:
                            break
                        events.append(item)
                    yield "".join(
                        sse_event("message", e, str(e["id"]) if e["id"] is not None else None)
                        for e in events
                    )
                if sub.dropped != reported_drops:
                    reported_drops = sub.dropped
                    yield sse_event("dropped", {"dropped": reported_drops})
                if stats and loop.time() >= next_stats:
                    next_stats = loop.time() + STATS_INTERVAL
                    yield sse_event("stats", self._stats(device))
        finally:
            stopping.cancel()
            feed.unsubscribe(sub)
