"""What the monitor's answers show of a device: its counters and whether it is online,
its thing, its ``sendTelemetryData`` permission, its quota and its shadow."""

from __future__ import annotations

import time
from typing import Any

from iotref.protocol import shadow_document as sd
from iotref.sandbox.monitor.sources import ShadowSource
from iotref.sandbox.provisioning.things import Thing
from iotref.sandbox.quota_meter import QuotaMeter

ONLINE_WINDOW_SECONDS = 30.0
"""A device is *online* when it sent telemetry this recently: the broker's ``$SYS`` tree
has no per-client connection state."""


class DeviceViews:
    """The JSON the API and the stream build for devices."""

    def __init__(self, shadows: ShadowSource, meter: QuotaMeter, online_window: float) -> None:
        self.shadows = shadows
        self.meter = meter
        self.online_window = online_window

    def online(self, last_seen: float | None, now: float) -> bool:
        return last_seen is not None and now - float(last_seen) <= self.online_window

    def permission(self, client_id: str) -> dict[str, Any]:
        document = self.shadows.store.get(client_id, None)
        if document is None:
            return {"shadow": False, "desired": None, "reported": None}
        desired = document.state.get("desired") or {}
        reported = document.state.get("reported") or {}
        return {
            "shadow": True,
            "desired": desired.get("sendTelemetryData"),
            "reported": reported.get("sendTelemetryData"),
            "version": document.version,
        }

    def device(
        self, counters: dict[str, Any] | None, thing: Thing | None, now: float
    ) -> dict[str, Any]:
        """A device with its counters (none yet: zeros) and, when known, its thing."""
        client_id = counters["client_id"] if counters else thing.client_id if thing else "?"
        out: dict[str, Any] = {
            "client_id": client_id,
            "received": 0,
            "valid": 0,
            "invalid": 0,
            "duplicates": 0,
            "last_seen": None,
            **(counters or {}),
        }
        out["known"] = thing is not None
        if thing is not None:
            out["org_id"] = thing.org_id
            out["site_id"] = thing.site_id
            out["machine_id"] = thing.machine_id
            out["revoked"] = thing.revoked
            out["provisioned_at"] = thing.to_json()["createdAt"]
        out["online"] = self.online(out.get("last_seen"), now)
        out["send_telemetry"] = self.permission(client_id) if thing is not None else None
        out["quota"] = self.meter.snapshot(client_id, now)
        return out

    def shadow(self, client_id: str) -> dict[str, Any] | None:
        """The classic shadow as the page shows it; None if there is none."""
        document = self.shadows.store.get(client_id, None)
        if document is None:
            return None
        response = sd.get_response(document, int(time.time()))
        state = response.get("state", {})
        return {
            "desired": state.get("desired"),
            "reported": state.get("reported"),
            "delta": state.get("delta"),
            "version": response.get("version"),
            "metadata": response.get("metadata"),
            "timestamp": response.get("timestamp"),
        }
