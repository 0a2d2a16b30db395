"""The sandbox's telemetry ingestion (a component): it receives every telemetry message as
the platform would, checks it and stores it for the monitor.

It runs the receiving side (:mod:`~iotref.sandbox.telemetry.receiver`, which runs the
:mod:`~iotref.sandbox.telemetry.receiving_process`), checks each message
(:mod:`~iotref.sandbox.telemetry.record_builder`), stores it
(:mod:`~iotref.sandbox.telemetry.writer`, :mod:`~iotref.sandbox.telemetry.store`), feeds
the quota meter and the monitor's live streams (:mod:`~iotref.sandbox.telemetry.feed`), and
announces :data:`~iotref.sandbox.context.INGESTION_SUBSCRIBED`. docs/architecture.md
("Telemetry ingestion") describes the design, docs/benchmarks.md its figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from iotref.protocol.message_schemas import MessageValidator
from iotref.sandbox.broker.config import TELEMETRY_TOPIC
from iotref.sandbox.context import INGESTION_SUBSCRIBED, LOOPBACK, THING_REGISTERED, SandboxContext
from iotref.sandbox.quota_meter import QuotaMeter
from iotref.sandbox.telemetry.connection_options import ReceiverSettings
from iotref.sandbox.telemetry.feed import TelemetryFeed
from iotref.sandbox.telemetry.receiver import Receiver
from iotref.sandbox.telemetry.receiving_process import STOP_WAIT_SECONDS
from iotref.sandbox.telemetry.record_builder import RecordBuilder, ThingDirectory
from iotref.sandbox.telemetry.store import Retention, TelemetryStore
from iotref.sandbox.telemetry.writer import BatchWriter

log = logging.getLogger(__name__)

SHARE_GROUP = "iotref-ingest"
DEFAULT_CONNECTIONS = 16  # each adds room for a burst in Mosquitto's per-connection queue
CONNECT_WAIT_SECONDS = 15.0


class Ingestion:
    """Sandbox component: receives, checks and stores all telemetry."""

    def __init__(
        self,
        ctx: SandboxContext,
        cas: Any,
        things: Any,
        *,
        connections: int | None = None,
        telemetry_topic: str = TELEMETRY_TOPIC,
        meter: QuotaMeter | None = None,
    ) -> None:
        self.ctx = ctx
        self.cas = cas
        self.things = things
        self.meter = meter
        env_connections = os.environ.get("IOTREF_INGEST_CONNECTIONS", "")
        self.connections = connections or (
            int(env_connections) if env_connections.isdigit() else DEFAULT_CONNECTIONS
        )
        self.connections = max(1, min(self.connections, 16))
        self.telemetry_topic = telemetry_topic.rstrip("/")
        self.feed = TelemetryFeed()
        self.store: TelemetryStore | None = None
        self.directory = ThingDirectory(self._lookup_org)
        self._receivers: list[Receiver] = []
        self._writer: BatchWriter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._announcing: set[asyncio.Future[None]] = set()
        ctx.events.subscribe(THING_REGISTERED, self._on_thing_registered)

    @property
    def database_path(self) -> Path:
        return self.ctx.paths.data_dir / "telemetry.db"

    def routes(self) -> list[Any]:
        return []

    def _lookup_org(self, client_id: str) -> str | None:
        thing = self.things.get(client_id)
        return None if thing is None else str(thing.org_id)

    def _on_thing_registered(self, thing: Any = None, **_: Any) -> None:
        client_id = getattr(thing, "client_id", None)
        org_id = getattr(thing, "org_id", None)
        if client_id and org_id:
            self.directory.remember(str(client_id), str(org_id))

    def receiver_settings(self) -> ReceiverSettings:
        return ReceiverSettings(
            host=LOOPBACK,
            port=self.ctx.platform_mqtt_port,
            ca_path=str(self.cas.server_root_ca_path),
            cert_path=str(self.cas.platform_cert_path),
            key_path=str(self.cas.platform_key_path),
            topic_filter=self.topic_filter,
            # Stable across restarts (the sessions persist), one set per connection count.
            client_ids=tuple(
                f"iotref-platform-ingest-{self.connections}-{index}"
                for index in range(self.connections)
            ),
        )

    @property
    def topic_filter(self) -> str:
        base = f"{self.telemetry_topic}/#"
        # A group per connection count: the sessions of another count (an earlier run)
        # must not take a share of the messages of this one.
        group = f"{SHARE_GROUP}-{self.connections}"
        return f"$share/{group}/{base}" if self.connections > 1 else base

    @property
    def subscribed(self) -> bool:
        return bool(self._receivers) and all(r.subscribed.is_set() for r in self._receivers)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        settings = self.ctx.settings
        retention = Retention(
            max_messages=settings.telemetry_max_messages or None,
            max_age_seconds=settings.telemetry_max_age or None,
        )
        self.store = await asyncio.to_thread(TelemetryStore, self.database_path, retention)
        builder = RecordBuilder(MessageValidator(), self.directory, self.telemetry_topic)
        self._writer = BatchWriter(self.store, self._deliver, lambda: self.feed.active)
        receiver = Receiver(
            self.receiver_settings(),
            builder,
            self._writer,
            self._writer.housekeeping,
            on_subscribed=self._announce_subscribed,
            meter=self.meter,
        )
        receiver.start()
        self._receivers.append(receiver)
        deadline = time.monotonic() + CONNECT_WAIT_SECONDS
        for receiver in self._receivers:
            left = deadline - time.monotonic()
            if left > 0:
                await asyncio.to_thread(receiver.subscribed.wait, left)
        if not self.subscribed:
            log.warning(
                "ingestion: not subscribed after %.0f s; still trying", CONNECT_WAIT_SECONDS
            )

    def _announce_subscribed(self) -> None:
        """From the receiver's thread: tell the other components (the broker saves its
        database then: docs/architecture.md, "Telemetry ingestion")."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        def emit() -> None:
            task = asyncio.ensure_future(self.ctx.events.emit(INGESTION_SUBSCRIBED))
            self._announcing.add(task)
            task.add_done_callback(self._announcing.discard)

        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(emit)

    def _deliver(self, events: list[dict[str, Any]]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self.feed.publish, events)

    async def stop(self) -> None:
        self.feed.close()
        for receiver in self._receivers:
            receiver.stop()
        for receiver in self._receivers:
            await asyncio.to_thread(receiver.join, STOP_WAIT_SECONDS + 5)
        self._receivers.clear()
        if self.store is not None:
            self.store.close()
        self._loop = None

    def status(self) -> dict[str, Any]:
        totals = self.store.totals() if self.store is not None else {}
        return {
            "subscribed": self.subscribed,
            "connections": self.connections,
            "topic_filter": self.topic_filter,
            "batches": self._writer.batches if self._writer is not None else 0,
            **totals,
        }
