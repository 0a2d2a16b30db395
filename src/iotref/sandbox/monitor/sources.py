"""What the monitor reads and acts on, as Protocols: the ingestion's store, live feed and
status, the shadow service's store and update path, the directory's pending approvals and
the thing registry."""

from __future__ import annotations

from typing import Any, Protocol

from iotref.protocol import shadow_document as sd
from iotref.sandbox.http_errors import ApiError
from iotref.sandbox.provisioning.things import Thing
from iotref.sandbox.shadow.store import ShadowStore
from iotref.sandbox.telemetry.feed import TelemetryFeed
from iotref.sandbox.telemetry.store import TelemetryStore


class TelemetrySource(Protocol):
    """The ingestion (:class:`~iotref.sandbox.telemetry.ingestion.Ingestion`)."""

    @property
    def store(self) -> TelemetryStore | None:
        """None until the ingestion has started."""

    @property
    def feed(self) -> TelemetryFeed: ...

    def status(self) -> dict[str, Any]: ...


class ShadowSource(Protocol):
    """The shadow service (:class:`~iotref.sandbox.shadow.service.ShadowService`)."""

    @property
    def store(self) -> ShadowStore: ...

    async def update(self, thing: str, shadow: str | None, payload: bytes) -> sd.JsonObject:
        """As a device's update, through the service's rules and limits."""


class ApprovalSource(Protocol):
    """The directory (:class:`~iotref.sandbox.directory.service.Directory`)."""

    def pending_authorizations(self) -> list[dict[str, Any]]: ...


class ThingSource(Protocol):
    """The thing registry (:class:`~iotref.sandbox.provisioning.things.ThingRegistry`)."""

    def get(self, client_id: str) -> Thing | None: ...

    def list(self, org_id: str | None = None) -> list[Thing]: ...


def stored_telemetry(telemetry: TelemetrySource) -> TelemetryStore:
    """The telemetry store; 409 while the ingestion has not started."""
    store = telemetry.store
    if store is None:
        raise ApiError(409, "not_ready", "ingestion has not started")
    return store
