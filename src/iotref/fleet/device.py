"""One simulated machine of a fleet: a real library device (its own connection, shadow sync
and telemetry) sending generated ``Status`` messages, and what it needs of the run it
belongs to (:class:`DeviceRun`)."""

from __future__ import annotations

import contextlib
import time
from typing import Final, Protocol

from awscrt import io

from iotref.device.connection.connection import Connection
from iotref.device.connection.rate_limit import ConnectGate
from iotref.device.connection.settings import ConnectionSettings
from iotref.device.connection.state import ConnectionEvent, ConnectionState
from iotref.device.onboarding.certificate_store import (
    CERTIFICATE_FILE,
    PRIVATE_KEY_FILE,
    ROOT_CA_FILE,
)
from iotref.device.shadow.sync import ShadowSync
from iotref.device.telemetry.messages import Asset, AssetType, Sender, SenderType, build_message
from iotref.device.telemetry.permission import ShadowPermission
from iotref.device.telemetry.publisher import Telemetry
from iotref.device.telemetry.seams import MessageValidatorLike
from iotref.fleet.memory_outbox import MemoryOutbox, OutboxTotals
from iotref.fleet.options import FleetOptions
from iotref.fleet.status_generator import StatusGenerator
from iotref.fleet.stores import MANUFACTURER, FleetDeviceIdentity, FleetStores
from iotref.protocol.topics import telemetry_topic

SOFTWARE_VERSION: Final = "1.0"
TELEMETRY_WINDOW: Final = 32


class DeviceRun(Protocol):
    """What a device needs of its run (:class:`~iotref.fleet.run.FleetRun`): the options,
    the stores, what every device shares, and where it counts connections and errors."""

    options: FleetOptions
    stores: FleetStores
    validator: MessageValidatorLike
    outbox_totals: OutboxTotals
    connect_gate: ConnectGate | None
    connected_now: int

    def error(self, kind: str) -> None: ...


class FleetDevice:
    """One simulated machine: its connection, shadow sync and telemetry."""

    __slots__ = (
        "_up_since",
        "asset",
        "connect_started",
        "connected_at",
        "connection",
        "ever_connected",
        "failed",
        "generated",
        "generator",
        "identity",
        "outbox",
        "run",
        "sender",
        "shadow",
        "synced_at",
        "telemetry",
        "tls_context",
    )

    def __init__(self, identity: FleetDeviceIdentity, run: DeviceRun) -> None:
        self.identity = identity
        self.run = run
        self.tls_context: io.ClientTlsContext | None = None
        self.connection: Connection | None = None
        self.shadow: ShadowSync | None = None
        self.telemetry: Telemetry | None = None
        self.outbox = MemoryOutbox(run.outbox_totals)
        self.sender = Sender(
            SenderType.PRESS, identity.name, SOFTWARE_VERSION, identity.properties.site_id
        )
        self.asset = Asset(
            assetid=identity.properties.machine_id,
            assetserial=run.stores.machine(identity.index).serial_number,
            assettype=AssetType.SHEETFED_PRESS,
            assetname=identity.name,
            assetmanufacturername=MANUFACTURER,
        )
        self.generator = StatusGenerator(identity.index)
        self.connect_started: float | None = None
        self.connected_at: float | None = None
        self.synced_at: float | None = None
        self.generated = 0
        self.ever_connected = False
        self.failed: str | None = None
        self._up_since: float | None = None

    @property
    def client_id(self) -> str:
        return self.identity.client_id

    def settings(self) -> ConnectionSettings:
        props = self.identity.properties
        store = self.identity.store_path
        return ConnectionSettings(
            endpoint=props.mqtt_endpoint,
            port=props.mqtt_port,
            client_id=props.client_id,
            cert_path=store / CERTIFICATE_FILE,
            key_path=store / PRIVATE_KEY_FILE,
            ca_path=store / ROOT_CA_FILE,
            keepalive_s=self.run.options.keepalive_s,
            min_backoff_s=1.0,
            max_backoff_s=10.0,
            connect_timeout_s=self.run.options.connect_timeout_s,
            fail_fast=False,
            publish_rate_limit=self.run.options.publish_rate_limit,
            throughput_limit=self.run.options.throughput_limit,
        )

    async def connect(self) -> None:
        """Set up and connect; the shadow subscriptions ride on the first CONNACK."""
        run = self.run
        tls_context, self.tls_context = self.tls_context, None  # the client keeps it
        connection = Connection(
            self.settings(),
            on_event=self._on_event,
            tls_context=tls_context,
            connect_gate=run.connect_gate,
        )
        shadow = ShadowSync(connection, self.client_id, timeout_s=run.options.shadow_timeout_s)
        await shadow.client.subscribe()  # registered now, one SUBSCRIBE on connect
        await shadow.start(wait=False)
        props = self.identity.properties
        telemetry = Telemetry(
            connection,
            self.outbox,
            telemetry_topic(props.telemetry_topic, props.org_id, props.client_id),
            validator=run.validator,
            permission=ShadowPermission(shadow),
            window=TELEMETRY_WINDOW,
            batch=TELEMETRY_WINDOW,
        )
        await telemetry.start()
        self.connection, self.shadow, self.telemetry = connection, shadow, telemetry
        self.connect_started = time.monotonic()
        await connection.start()
        self.connected_at = time.monotonic()
        self.ever_connected = True

    async def wait_synced(self, timeout_s: float) -> None:
        assert self.shadow is not None
        await self.shadow.wait_synced(timeout_s)
        self.synced_at = time.monotonic()

    def _on_event(self, event: ConnectionEvent) -> None:
        run = self.run
        state = event.state
        if state is ConnectionState.CONNECTED:
            if self._up_since is not None or self.connected_at is not None:
                run.error("reconnected")
            if self._up_since is None:
                run.connected_now += 1
            self._up_since = event.at
            return
        if state is ConnectionState.DISCONNECTED:
            run.error("disconnected" if self._up_since is not None else "connect_attempt_failed")
        elif state is ConnectionState.TAKEN_OVER:
            run.error("taken_over")
        elif state is not ConnectionState.STOPPED:
            return
        if self._up_since is not None:
            run.connected_now -= 1
            self._up_since = None

    async def send_next(self) -> None:
        """Build, validate, queue and (by the drainer) publish one status message."""
        assert self.telemetry is not None
        message = build_message(self.sender, self.asset, self.generator.next())
        await self.telemetry.send(message)
        self.generated += 1

    async def stop(self) -> None:
        """Stop telemetry, shadow sync and the connection, then let them go: what the
        report needs (messages generated, connect and sync times) stays on the device, and
        the memory of a stopped device is reused by the next ones stopping."""
        with contextlib.suppress(Exception):
            if self.telemetry is not None:
                await self.telemetry.close(0.5)
        with contextlib.suppress(Exception):
            if self.shadow is not None:
                await self.shadow.stop()
        with contextlib.suppress(Exception):
            if self.connection is not None:
                await self.connection.stop()
        self.telemetry = self.shadow = self.connection = None
        self.tls_context = None
