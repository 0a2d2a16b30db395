"""The library's front door: :class:`AsyncClient` and its blocking twin :class:`Client`.

Owns putting the device runtime together for one sender (contract section 9: one sender,
one MQTT connection), from a certificate store (contract section 5):

1. the durable outbox in the store's folder (opened first: a second process with the same
   store is refused before it could take the MQTT session over),
2. the connection with mutual TLS (:mod:`iotref.device.connection`),
3. the classic shadow kept in sync (desired -> local -> reported, after every reconnect;
   :mod:`iotref.device.shadow`), whose ``sendTelemetryData`` is the permission to send,
4. the permission-gated publisher draining the outbox (:mod:`iotref.device.telemetry`).

Starting needs no platform: when it cannot be reached, the client starts anyway ("waiting
for the platform", with the last reason, in :meth:`AsyncClient.stats`), accepts and queues
messages, and connects, syncs the shadow and publishes when it can (``fail_fast=True``
makes an unreachable platform an error of :meth:`AsyncClient.start` instead).

Sending builds the message (:func:`iotref.device.messages.build_message`), validates it
against the platform schemas and commits it to the outbox before returning; publishing
happens in the background. Closing is bounded by the close timeout: until then it keeps
publishing until the outbox is empty (reconnecting on the way if the connection is down),
then disconnects; whatever is not acknowledged by then stays in the outbox and is
published by the next run. Nothing accepted is thrown away, unless the caller chose
``overflow="drop_oldest"`` or ``policy="drop"``.

Another process running with the same identity (a copied store) takes the MQTT session
over again and again; the connection notices and stops, and the client's ``send()`` then
raises :class:`~iotref.device.connection.ConnectionTakenOver`.

:class:`Client` runs an :class:`AsyncClient` on an event loop in a private daemon thread
and offers the same methods, blocking and thread-safe, for scripts.

Example::

    async with AsyncClient.from_store("certificate_store/local") as client:
        press = client.asset(Asset("press-1", "SN-1", AssetType.SHEETFED_PRESS))
        await press.send(StatusV2(status="Production", speed=12000, totalproductioncounter=1))

Logging (logger ``iotref.client``): start, stop and what was left in the outbox; never key
material or tokens.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Final, TypedDict, TypeVar

from iotref._version import __version__
from iotref.device.connection import (
    Connection,
    ConnectionEvent,
    ConnectionFailed,
    ConnectionSettings,
    ConnectionState,
    ConnectionTakenOver,
)
from iotref.device.errors import IotrefError
from iotref.device.messages import Asset, Payload, Sender, SenderType, build_message
from iotref.device.onboarding.certificate_store import (
    CertificateStore,
    DeviceIdentity,
    DeviceProperties,
)
from iotref.device.outbox import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_MESSAGES,
    OUTBOX_FILE_NAME,
    Durability,
    Outbox,
    OutboxError,
    OutboxFull,
    OutboxLocked,
    OverflowPolicy,
)
from iotref.device.outbox_salvage import OutboxRecovery
from iotref.device.shadow import DesiredHandler, ShadowSync
from iotref.device.stdlib_compat import Unpack
from iotref.device.telemetry import (
    DEFAULT_WINDOW,
    MessageTooLarge,
    PermissionPolicy,
    SendResult,
    SendStatus,
    ShadowPermission,
    Telemetry,
    TelemetryClosed,
)
from iotref.protocol import limits
from iotref.protocol.message_schemas import InvalidMessage, MessageValidator, ValidationIssue
from iotref.protocol.topics import telemetry_topic

__all__ = [
    "AssetChannel",
    "AsyncClient",
    "BlockingAssetChannel",
    "BlockingShadow",
    "Client",
    "ClientClosed",
    "ClientError",
    "ClientOptions",
    "ClientOptionsArgs",
    "ClientStats",
    "InvalidMessageError",
    "MessageTooLargeError",
    "OutboxBusy",
    "OutboxFullError",
    "RawPayload",
    "SendRefused",
    "SendResult",
    "SendStatus",
    "raw_payload",
]

log = logging.getLogger("iotref.client")

T = TypeVar("T")

DEFAULT_SENDER: Final = Sender(SenderType.SYSTEM, "iotref", __version__)
"""The sender used when none is given: an iotref gateway."""
_POLL_S: Final = 0.02
_STOP_SHADOW_MIN_S: Final = 0.25
_STOP_CONNECTION_MIN_S: Final = 1.0
CLOSE_GRACE_S: Final = 2.0
"""The most a close may take beyond its timeout: unsubscribing and disconnecting."""


async def _bounded(step: Coroutine[Any, Any, Any], max_wait_s: float, what: str) -> None:
    """Run ``step`` for at most ``max_wait_s`` seconds (then cancel it); log its error."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=max_wait_s)
    if not done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        log.warning("%s took more than %.1f s; left behind", what, max_wait_s)
        return
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed", what, exc_info=task.exception())


async def _first_outcome(connection: Connection, max_wait_s: float) -> None:
    """Until the first attempt of a starting connection succeeded or failed (at most
    ``max_wait_s`` seconds)."""
    if connection.connected or connection.stats.failures or connection.state.terminal:
        return
    stream = connection.events()

    async def first() -> None:
        async for event in stream:
            if event.state is not ConnectionState.CONNECTING:
                return

    waiting = asyncio.ensure_future(first())
    try:
        await asyncio.wait({waiting}, timeout=max_wait_s)
    finally:
        if not waiting.done():
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()


# --------------------------------------------------------------------------- errors


class ClientError(IotrefError):
    """Base class of the facade's own errors. (Connecting raises
    :class:`~iotref.device.connection.ConnectionFailed`, a broken store
    :class:`~iotref.device.errors.StoreError`, a refused shadow
    :class:`~iotref.device.shadow.ShadowRejected`: all :class:`IotrefError` too.)"""


class ClientClosed(ClientError):
    """The client is not started, or closed: nothing can be sent."""


class OutboxBusy(ClientError):
    """Another process (or client) holds this store's outbox, i.e. runs as this machine."""


class SendRefused(ClientError):
    """A message was not accepted; nothing was queued and the caller still has it."""


class InvalidMessageError(SendRefused, ValueError):
    """The message is not valid against the platform schemas. ``issues`` lists every
    problem (JSON path and reason); the first is in the message."""

    def __init__(self, issues: Sequence[ValidationIssue]) -> None:
        self.issues: tuple[ValidationIssue, ...] = tuple(issues)
        first = str(self.issues[0]) if self.issues else "invalid message"
        more = len(self.issues) - 1
        super().__init__(
            f"invalid message: {first}" + (f" (and {more} more)" if more > 0 else ""),
            "fix the message; nothing was queued",
        )


class MessageTooLargeError(SendRefused, ValueError):
    """The encoded message is over the platform's payload limit (``size`` and ``limit``
    in bytes); it was not queued."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"message too large: {size:,} bytes encoded, over the platform's limit of "
            f"{limit:,} bytes",
            "send less in one message (split it); nothing was queued",
        )
        self.size = size
        self.limit = limit


class OutboxFullError(SendRefused):
    """The outbox is full and its overflow policy is ``reject_new``."""

    def __init__(self, reason: str, *, depth: int) -> None:
        super().__init__(
            reason,
            "wait until the platform acknowledged more, or raise max_messages / max_bytes",
        )
        self.depth = depth


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class ClientOptions:
    """How a client behaves. Every field has a default that suits a machine's gateway."""

    policy: PermissionPolicy = "hold"
    """While ``sendTelemetryData`` is not true: ``"hold"`` queues messages in the outbox
    and publishes them once permission returns; ``"drop"`` validates and discards them
    (``SendResult.status == "dropped_no_permission"``)."""
    max_messages: int = DEFAULT_MAX_MESSAGES
    """Outbox bound: most messages kept (100,000)."""
    max_bytes: int = DEFAULT_MAX_BYTES
    """Outbox bound: most bytes kept (256 MiB)."""
    overflow: OverflowPolicy = "reject_new"
    """When the outbox is full: ``"reject_new"`` raises :class:`OutboxFullError` (nothing
    accepted is ever lost); ``"drop_oldest"`` evicts the oldest (counted)."""
    durability: Durability = "process"
    """``"process"``: accepted messages survive a crash of the process; ``"power"``: also a
    power cut (one fsync per send)."""
    outbox_path: Path | None = None
    """The outbox database (default: ``outbox.sqlite3`` in the certificate store)."""
    port: int | None = None
    """Override the store's ``mqtt_port``, e.g. 443 with ``alpn=True``."""
    alpn: bool = False
    """Offer ALPN ``x-amzn-mqtt-ca`` (AWS IoT Core on port 443)."""
    min_backoff_s: float = 0.5
    """Reconnect backoff: first cap (full jitter)."""
    max_backoff_s: float = 30.0
    """Reconnect backoff: largest delay."""
    connect_timeout_s: float = 10.0
    """How long starting the client waits for the first connection (and one attempt may
    take); without one by then the client starts offline (see ``fail_fast``)."""
    fail_fast: bool = False
    """``True``: starting raises :class:`~iotref.device.connection.ConnectionFailed` when
    the platform cannot be reached within ``connect_timeout_s`` (at once for errors that
    retrying cannot fix: certificate refused, not authorized). ``False`` (default): the
    client starts offline, queues what is sent, and connects when it can."""
    keepalive_s: int = 30
    shadow_timeout_s: float = 10.0
    """How long entering the client waits for the first shadow sync (it goes on in the
    background after that; until then the permission is unknown, i.e. not granted)."""
    close_timeout_s: float = 10.0
    """The longest a close takes: it waits for PUBACKs (and, with ``drain_on_close``, for
    the outbox to drain) until then; the rest stays in the outbox for the next run."""
    drain_on_close: bool = True
    """On close, keep publishing until the outbox is empty (within ``close_timeout_s``),
    reconnecting on the way if the connection is down; it stops early only when nothing
    more can be sent (the permission known to be withdrawn, the session taken over)."""
    window: int = DEFAULT_WINDOW
    """Most messages in flight (published, not yet acknowledged)."""
    strict_validation: bool = False
    """Also check the contract's rules the schemas do not express (millisecond
    timestamps, UUID ``sendereventuuid``)."""
    initial_reported: Mapping[str, Any] | None = None
    """Local state reported to the shadow at the first sync."""
    publish_rate_limit: float | None = float(limits.PUBLISH_REQUESTS_PER_SECOND_PER_CONNECTION)
    """The platform's quota of publishes a second on the connection (AWS IoT Core: 100, not
    adjustable). Every publish (telemetry and shadow requests) is paced a little below it,
    so that no second the platform counts holds more (:mod:`iotref.device.rate_limit`); a
    backlog drains at that pace. ``None`` or 0: not paced."""
    throughput_limit: int | None = limits.THROUGHPUT_BYTES_PER_SECOND_PER_CONNECTION
    """The platform's quota of bytes a second on the connection (topic plus payload; AWS IoT
    Core: 512 KiB), paced the same way. ``None`` or 0: not paced."""

    def __post_init__(self) -> None:
        problems = []
        if self.policy not in ("hold", "drop"):
            problems.append(f"policy must be 'hold' or 'drop', not {self.policy!r}")
        if self.overflow not in ("reject_new", "drop_oldest"):
            problems.append(
                f"overflow must be 'reject_new' or 'drop_oldest', not {self.overflow!r}"
            )
        if self.durability not in ("process", "power"):
            problems.append(f"durability must be 'process' or 'power', not {self.durability!r}")
        if self.max_messages < 1 or self.max_bytes < 1 or self.window < 1:
            problems.append("max_messages, max_bytes and window must be positive")
        if self.port is not None and not 0 < self.port < 65536:
            problems.append(f"port {self.port} is not a TCP port")
        for name in ("connect_timeout_s", "shadow_timeout_s", "min_backoff_s"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0")
        if self.close_timeout_s < 0:
            problems.append("close_timeout_s must be >= 0")
        if self.max_backoff_s < self.min_backoff_s:
            problems.append("max_backoff_s must be >= min_backoff_s")
        for name in ("publish_rate_limit", "throughput_limit"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                problems.append(f"{name} must be 0 (off) or more")
        if problems:
            raise ValueError("invalid client options: " + "; ".join(problems))


class ClientOptionsArgs(TypedDict, total=False):
    """The fields of :class:`ClientOptions` as keyword arguments."""

    policy: PermissionPolicy
    max_messages: int
    max_bytes: int
    overflow: OverflowPolicy
    durability: Durability
    outbox_path: Path | None
    port: int | None
    alpn: bool
    min_backoff_s: float
    max_backoff_s: float
    connect_timeout_s: float
    fail_fast: bool
    keepalive_s: int
    shadow_timeout_s: float
    close_timeout_s: float
    drain_on_close: bool
    window: int
    strict_validation: bool
    initial_reported: Mapping[str, Any] | None
    publish_rate_limit: float | None
    throughput_limit: int | None


def _options(options: ClientOptions | None, overrides: Mapping[str, Any]) -> ClientOptions:
    base = options or ClientOptions()
    return dataclasses.replace(base, **overrides) if overrides else base


# --------------------------------------------------------------------------- stats


@dataclass(frozen=True)
class ClientStats:
    """A snapshot of one client. Counters count since the client started; ``queued``,
    ``held`` and ``oldest_age_s`` describe the outbox now (earlier runs included).

    The outbox's counts add up: ``carried_over + accepted == acked + queued +
    dropped_overflow + refused`` (messages left by earlier runs and taken in by this one
    are either delivered, still in the outbox, evicted by ``overflow="drop_oldest"``, or
    refused for good by the platform and moved to the outbox's ``refused`` table).

    After :meth:`AsyncClient.close` the state is ``STOPPED`` (``TAKEN_OVER`` if another
    process took the session over), ``connected`` and ``waiting_for_platform`` are false."""

    state: ConnectionState
    connected: bool
    permission: bool
    """``sendTelemetryData`` as last seen in the shadow (False until known)."""
    policy: PermissionPolicy
    shadow_synced: bool
    accepted: int
    """Messages this client took into the outbox (``send()`` returned ``queued``)."""
    dropped_no_permission: int
    """Valid messages discarded because of ``policy="drop"``."""
    published: int
    """Publishes, re-publications included."""
    republished: int
    acked: int
    """Messages delivered: acknowledged by the platform (PUBACK) and so removed from the
    outbox, each counted once (messages of earlier runs included; see ``pubacks``)."""
    queued: int
    """Messages in the outbox, not yet acknowledged (earlier runs' included)."""
    held: int
    """Of ``queued``, held back for want of permission (``queued`` while not permitted)."""
    in_flight: int
    dropped_overflow: int
    """Messages evicted from the outbox to make room (``overflow="drop_oldest"``)."""
    rejected_full: int
    """``send()`` calls refused because the outbox was full (``overflow="reject_new"``)."""
    rejected_invalid: int
    """``send()`` calls refused because the message is not valid against the schemas."""
    oldest_age_s: float | None
    ack_rate: float
    """Acknowledged messages per second, last ten seconds."""
    connects: int
    disconnects: int
    last_error: str | None
    waiting_for_platform: bool = False
    """Started but not connected: the platform is out of reach for now (messages are
    queued); ``connection_error`` says why."""
    connection_error: str | None = None
    """Why the last connection attempt failed or the last connection ended."""
    carried_over: int = 0
    """Messages in the outbox when the client started: left by earlier runs."""
    pubacks: int = 0
    """PUBACKs received; a message published again after a reconnect may be acknowledged
    twice, so this can exceed ``acked``."""
    rejected_too_large: int = 0
    """``send()`` calls refused because the message is over the platform's payload limit."""
    refused: int = 0
    """Messages the platform refused for good (e.g. PUBACK 0x87), moved out of the queue
    into the outbox's ``refused`` table, this run."""
    refused_kept: int = 0
    """Messages kept in the outbox's ``refused`` table (earlier runs included)."""
    throttled: int = 0
    """Publishes the platform answered with "quota exceeded" (PUBACK 0x97) this run; each
    was published again, and the pace slowed down for a few seconds."""
    pace: float | None = None
    """Publishes a second the connection is paced at now (``None``: not paced); below the
    usual pace for a few seconds after the platform throttled a publish."""
    slowed: bool = False
    """Whether the pace is still below its usual value after a "quota exceeded" answer."""

    @property
    def connection_status(self) -> str:
        """``"connected"``, ``"waiting for the platform (<reason>)"``, ``"taken_over"``..."""
        if self.connected:
            return "connected"
        if self.waiting_for_platform:
            reason = f" ({self.connection_error})" if self.connection_error else ""
            return f"waiting for the platform{reason}"
        return self.state.value


# --------------------------------------------------------------------------- raw payloads


class RawPayload:
    """A payload given as a plain JSON object, for :meth:`AsyncClient.send`. Use
    :func:`raw_payload` to get one of the right kind."""

    eventtype: ClassVar[str] = "generic.signal"
    eventsubtype: ClassVar[str] = "Status"
    payloadversion: ClassVar[int] = 2

    def __init__(self, body: Mapping[str, Any]) -> None:
        if not isinstance(body, Mapping):
            raise TypeError("a raw payload is a JSON object (a mapping)")
        self.body = dict(body)

    def to_payload(self) -> dict[str, Any]:
        return dict(self.body)


@functools.cache
def _raw_payload_class(eventtype: str, eventsubtype: str, payloadversion: int) -> type[RawPayload]:
    attrs = {
        "eventtype": eventtype,
        "eventsubtype": eventsubtype,
        "payloadversion": payloadversion,
    }
    return type(f"RawPayload_{eventsubtype}_{payloadversion}", (RawPayload,), attrs)


def raw_payload(
    body: Mapping[str, Any],
    *,
    eventtype: str = "generic.signal",
    eventsubtype: str = "Status",
    payloadversion: int = 2,
) -> RawPayload:
    """``body`` (e.g. ``{"signalstatus": {...}}``) as a payload of the given kind."""
    return _raw_payload_class(eventtype, eventsubtype, payloadversion)(body)


PayloadLike = Payload | Mapping[str, Any]
"""A typed payload (``StatusV2(...)``) or a plain JSON object (a Status v2 payload unless
``payloadversion`` says otherwise)."""


def _as_payload(payload: PayloadLike, payloadversion: int | None) -> Payload:
    if isinstance(payload, Mapping):
        return raw_payload(payload, payloadversion=payloadversion or 2)
    if payloadversion is not None and payloadversion != payload.payloadversion:
        raise ValueError(
            f"payloadversion={payloadversion} given with a version {payload.payloadversion} payload"
        )
    return payload


# --------------------------------------------------------------------------- async client


class AssetChannel:
    """One asset bound to a client: ``await press.send(StatusV2(...))``."""

    def __init__(self, client: AsyncClient, asset: Asset) -> None:
        self.client = client
        self.asset = asset

    async def send(
        self,
        payload: PayloadLike,
        *,
        payloadversion: int | None = None,
        asset_time: datetime | None = None,
    ) -> SendResult:
        return await self.client.send(
            self.asset, payload, payloadversion=payloadversion, asset_time=asset_time
        )


class AsyncClient:
    """One sender's connection to the platform. ``async with`` connects, syncs the shadow
    and starts publishing; leaving it closes cleanly (see the module docstring).

    Build it with :meth:`from_store`; options are :class:`ClientOptions` fields, given as
    keyword arguments or as ``options=``. Use it from one event loop (the one that entered
    it); :class:`Client` is the thread-safe blocking variant.
    """

    def __init__(
        self,
        identity: DeviceIdentity,
        *,
        sender: Sender | None = None,
        options: ClientOptions | None = None,
        **overrides: Unpack[ClientOptionsArgs],
    ) -> None:
        self.identity = identity
        self.options = _options(options, overrides)
        props = identity.properties
        sender = sender or DEFAULT_SENDER
        if sender.siteid is None and props.site_id:
            sender = dataclasses.replace(sender, siteid=props.site_id)
        self.sender = sender
        self.topic = telemetry_topic(props.telemetry_topic, props.org_id, props.client_id)
        self.outbox_path = self.options.outbox_path or identity.store_path / OUTBOX_FILE_NAME
        o = self.options
        conn_overrides: dict[str, Any] = {
            "alpn": o.alpn,
            "min_backoff_s": o.min_backoff_s,
            "max_backoff_s": o.max_backoff_s,
            "connect_timeout_s": o.connect_timeout_s,
            "keepalive_s": o.keepalive_s,
            "fail_fast": True,  # errors retrying cannot fix end a waiting start at once
            "publish_rate_limit": o.publish_rate_limit or None,
            "throughput_limit": o.throughput_limit or None,
        }
        if o.port is not None:
            conn_overrides["port"] = o.port
        self.settings = ConnectionSettings.from_store(identity.store_path, **conn_overrides)
        self._outbox: Outbox | None = None
        self._connection: Connection | None = None
        self._shadow: ShadowSync | None = None
        self._telemetry: Telemetry | None = None
        self._named: dict[str, ShadowSync] = {}
        self._channels: dict[int, AssetChannel] = {}
        self._started = False
        self._closed = False
        self._final: ClientStats | None = None
        self._carried_over = 0

    @classmethod
    def from_store(
        cls,
        path: Path | str,
        *,
        sender: Sender | None = None,
        options: ClientOptions | None = None,
        **overrides: Unpack[ClientOptionsArgs],
    ) -> AsyncClient:
        """A client for the certificate store at ``path`` (contract section 5). Raises
        :class:`~iotref.device.errors.StoreError` (with a next step) if it is missing or
        incomplete; options are checked here too (``ValueError``)."""
        identity = CertificateStore(Path(path)).load()
        return cls(identity, sender=sender, options=options, **overrides)

    # ------------------------------------------------------------------ views

    @property
    def properties(self) -> DeviceProperties:
        return self.identity.properties

    @property
    def client_id(self) -> str:
        return self.identity.properties.client_id

    @property
    def connection(self) -> Connection:
        """The MQTT connection (for advanced use: extra subscriptions)."""
        return self._running(self._connection)

    @property
    def telemetry(self) -> Telemetry:
        """The publisher (for advanced use)."""
        return self._running(self._telemetry)

    @property
    def shadow(self) -> ShadowSync:
        """The classic shadow, kept in sync: ``client.shadow.on_desired("speed", handler)``,
        ``client.shadow.set_reported("mode", "run")``, ``await client.shadow.wait_for(...)``."""
        return self._running(self._shadow)

    @property
    def connected(self) -> bool:
        return self._connection is not None and self._connection.connected

    @property
    def permission(self) -> bool:
        """Whether ``sendTelemetryData`` is true (as last seen)."""
        return self._shadow is not None and self._shadow.send_telemetry_allowed

    @property
    def outbox_recovery(self) -> OutboxRecovery | None:
        """What was found and done when the outbox was damaged at start (see
        :mod:`iotref.device.outbox_integrity`); None when it was sound."""
        return None if self._outbox is None else self._outbox.recovery

    @property
    def started(self) -> bool:
        return self._started and not self._closed

    def _running(self, part: T | None) -> T:
        if part is None or self._closed:
            raise ClientClosed(
                "the client is not started" if not self._closed else "the client is closed",
                "use 'async with AsyncClient.from_store(...) as client'",
            )
        return part

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> AsyncClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self, *, wait: bool = True) -> None:
        """Open the outbox, start connecting, syncing the shadow and publishing.

        With ``wait`` (and a reachable platform) it returns connected and synced: it
        waits up to ``connect_timeout_s`` for the first connection (less when the first
        attempt fails) and up to ``shadow_timeout_s`` for the first sync. Without the
        platform it starts offline (see ``fail_fast``). ``wait=False`` returns as soon as
        the outbox is open and the first attempt is under way.

        Raises :class:`OutboxBusy`, :class:`ClientError` (outbox unusable),
        :class:`~iotref.device.connection.ConnectionFailed` (``kind="config"``: unusable
        certificate files; with ``fail_fast``, any failure to connect),
        :class:`~iotref.device.shadow.ShadowRejected`; nothing is left running then."""
        if self._started:
            raise ClientClosed("a client can be started only once", "make a new client")
        self._started = True
        o = self.options
        try:
            self._outbox = Outbox(
                self.outbox_path,
                max_messages=o.max_messages,
                max_bytes=o.max_bytes,
                overflow=o.overflow,
                durability=o.durability,
            )
        except OutboxLocked:
            self._closed = True
            raise OutboxBusy(
                f"the outbox {self.outbox_path} is in use by another sender",
                "make sure only one process runs with this machine's identity",
            ) from None
        except OSError as exc:
            self._closed = True
            raise ClientError(
                f"cannot open the outbox {self.outbox_path}: {exc.strerror or exc}",
                f"check that {self.outbox_path.parent} is writable by this user",
            ) from None
        except (OutboxError, sqlite3.Error) as exc:
            self._closed = True
            raise ClientError(
                f"cannot open the outbox {self.outbox_path}: {exc}",
                "move the outbox files aside (nothing is deleted automatically) and start "
                "again; see docs/operations.md, 'Outbox integrity'",
            ) from None
        self._carried_over = self._outbox.depth
        try:
            connection = Connection(self.settings)
            self._connection = connection
            if o.fail_fast:
                await connection.start()
            else:
                await connection.start(wait=False)
                if wait:
                    await _first_outcome(connection, o.connect_timeout_s)
            shadow = ShadowSync(
                connection,
                self.client_id,
                initial_reported=o.initial_reported,
                first_sync_timeout_s=o.shadow_timeout_s,
            )
            self._shadow = shadow
            # Offline, the first sync happens on connect; until then the permission is
            # unknown, i.e. not granted.
            await shadow.start(wait=wait and connection.connected)
            telemetry = Telemetry(
                connection,
                self._outbox,
                self.topic,
                validator=MessageValidator(strict=o.strict_validation),
                permission=ShadowPermission(shadow),
                policy=o.policy,
                window=o.window,
                close_timeout=o.close_timeout_s,
            )
            self._telemetry = telemetry
            await telemetry.start()
        except BaseException:
            with contextlib.suppress(Exception):
                self._final = await self._shutdown(0.0, drain=False)
            self._closed = True
            raise
        depth = self._outbox.depth
        if connection.connected:
            log.info(
                "client %s started: %s, permission %s, %d message(s) waiting in %s",
                self.client_id,
                self.settings.where(),
                "granted" if self.permission else "not granted",
                depth,
                self.outbox_path,
            )
        elif not wait:
            log.info(
                "client %s started, connecting to %s; %d message(s) waiting in %s",
                self.client_id,
                self.settings.where(),
                depth,
                self.outbox_path,
            )
        else:
            reason = connection.stats.last_error
            log.warning(
                "client %s started offline, waiting for the platform at %s%s; "
                "%d message(s) waiting in %s",
                self.client_id,
                self.settings.where(),
                f" ({reason})" if reason else "",
                depth,
                self.outbox_path,
            )

    async def close(self, timeout: float | None = None) -> ClientStats:
        """Stop within ``timeout`` seconds (default ``close_timeout_s``; the disconnect may
        take up to :data:`CLOSE_GRACE_S` more): wait for in-flight acks and, with
        ``drain_on_close``, keep publishing until the outbox is empty, reconnecting on the
        way if the connection is down; then disconnect. What is not acknowledged stays in
        the outbox for the next run. Returns the final stats. Idempotent."""
        if self._final is not None:
            return self._final
        if not self._started or self._closed:
            self._closed = True
            self._final = self._snapshot(final=True)
            return self._final
        wait = self.options.close_timeout_s if timeout is None else max(0.0, timeout)
        final = await self._shutdown(wait, drain=self.options.drain_on_close)
        self._closed = True
        self._final = final
        if final.queued:
            log.info(
                "client %s closed; %d message(s) left in %s: the next run sends them",
                self.client_id,
                final.queued,
                self.outbox_path,
            )
        else:
            log.info("client %s closed; the outbox is empty", self.client_id)
        return final

    def _can_still_send(self) -> bool:
        """Whether draining on close may still get somewhere: not when the connection
        ended for good, nor when connected and synced without the permission to send."""
        connection = self._connection
        if connection is None or connection.state.terminal:
            return False
        shadow = self._shadow
        known_refusal = shadow is not None and shadow.synced and not self.permission
        return not (connection.connected and known_refusal)

    async def _shutdown(self, wait: float, *, drain: bool) -> ClientStats:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        if self._telemetry is not None:
            try:
                await self._telemetry.close(wait, drain=self._can_still_send if drain else False)
            except Exception:
                log.exception("closing the publisher failed")
        # Unsubscribing and disconnecting get what is left of the time, and at least a
        # moment each (CLOSE_GRACE_S in all) to say goodbye to a broker that answers.
        for sync in [*self._named.values(), self._shadow]:
            if sync is not None:
                left = max(_STOP_SHADOW_MIN_S, deadline - loop.time())
                await _bounded(sync.stop(), left, "stopping a shadow sync")
        self._named.clear()
        if self._connection is not None:
            left = max(_STOP_CONNECTION_MIN_S, deadline - loop.time())
            await _bounded(self._connection.stop(left), left + 0.5, "stopping the connection")
        # Taken once the connection is stopped (a PUBACK that came meanwhile is counted)
        # and before the outbox closes (its counts are read from it).
        final = self._snapshot(final=True)
        if self._outbox is not None:
            try:
                self._outbox.close()
            except Exception:
                log.exception("closing the outbox failed")
        return final

    # ------------------------------------------------------------------ sending

    def asset(self, asset: Asset) -> AssetChannel:
        """``asset`` bound to this client; ``await channel.send(payload)``."""
        channel = self._channels.get(id(asset))
        if channel is None or channel.asset is not asset:
            channel = AssetChannel(self, asset)
            self._channels[id(asset)] = channel
        return channel

    async def send(
        self,
        asset: Asset,
        payload: PayloadLike,
        *,
        payloadversion: int | None = None,
        asset_time: datetime | None = None,
    ) -> SendResult:
        """Build a message for ``asset`` (header from the sender and the asset, fresh
        ``sendereventuuid``, monotonic ``assettimestamp``), validate it and queue it.

        Returns when the message is committed to the outbox (``status == "queued"``), or
        discarded by ``policy="drop"`` (``"dropped_no_permission"``); the platform need not
        be reachable. Raises :class:`InvalidMessageError`, :class:`MessageTooLargeError`
        (over the platform's 128 KB per message), :class:`OutboxFullError`,
        :class:`ClientClosed`,
        :class:`~iotref.device.connection.ConnectionTakenOver` once another process took
        this identity's session over, and
        :class:`~iotref.device.connection.ConnectionFailed` (``revoked``) once the broker
        refused the certificate as revoked (nothing is queued then).
        ``payload`` may be a plain dict (a Status payload of ``payloadversion``, default 2).
        """
        message = build_message(
            self.sender, asset, _as_payload(payload, payloadversion), asset_time=asset_time
        )
        return await self.send_message(message)

    async def send_message(self, message: Mapping[str, Any]) -> SendResult:
        """Validate and queue a complete message (header and payload) as it is."""
        telemetry = self._running(self._telemetry)
        self._raise_if_taken_over()
        try:
            return await telemetry.send(dict(message))
        except InvalidMessage as exc:
            raise InvalidMessageError(exc.issues) from None
        except MessageTooLarge as exc:
            raise MessageTooLargeError(exc.size, exc.limit) from None
        except OutboxFull as exc:
            raise OutboxFullError(f"the outbox is full: {exc}", depth=exc.depth) from None
        except TelemetryClosed:
            raise ClientClosed("the client is closed") from None

    async def send_many(self, messages: Sequence[Mapping[str, Any]]) -> list[SendResult]:
        """Validate and queue several complete messages in one transaction; one invalid
        message refuses them all."""
        telemetry = self._running(self._telemetry)
        self._raise_if_taken_over()
        try:
            return await telemetry.send_many([dict(m) for m in messages])
        except InvalidMessage as exc:
            raise InvalidMessageError(exc.issues) from None
        except MessageTooLarge as exc:
            raise MessageTooLargeError(exc.size, exc.limit) from None
        except OutboxFull as exc:
            raise OutboxFullError(f"the outbox is full: {exc}", depth=exc.depth) from None
        except TelemetryClosed:
            raise ClientClosed("the client is closed") from None

    def _raise_if_taken_over(self) -> None:
        connection = self._connection
        refused = connection.refused if connection is not None else None
        if refused is not None:
            raise ConnectionFailed(
                refused.reason,
                refused.hint or refused.next_step,
                kind=refused.kind,
                revoked=refused.revoked,
            )
        if connection is not None and connection.taken_over:
            raise ConnectionTakenOver(
                f"client id {self.client_id!r} is in use by another connection: "
                f"{connection.stats.last_error or 'taken over'}",
                "make sure only one process runs with this machine's identity "
                "(a copied certificate store is the usual cause)",
            )

    # ------------------------------------------------------------------ waiting

    async def wait_drained(self, timeout: float | None = None) -> bool:
        """Wait until every queued message was acknowledged; False after ``timeout``."""
        outbox = self._running(self._outbox)
        deadline = None if timeout is None else time.monotonic() + timeout
        while outbox.depth > 0:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_POLL_S)
        return True

    async def wait_permission(
        self,
        allowed: bool = True,
        timeout: float | None = None,
    ) -> bool:
        """Wait until ``sendTelemetryData`` is ``allowed``; False after ``timeout``."""
        self._running(self._shadow)
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.permission is not allowed:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_POLL_S)
        return True

    # ------------------------------------------------------------------ shadows, events

    async def named_shadow(self, name: str, **sync_options: Any) -> ShadowSync:
        """A named shadow of this thing, synced like the classic one (started on first use,
        stopped with the client). ``sync_options`` go to :class:`ShadowSync` the first time."""
        sync = self._named.get(name)
        if sync is None:
            connection = self._running(self._connection)
            sync = ShadowSync(connection, self.client_id, name, **sync_options)
            self._named[name] = sync
            try:
                await sync.start()
            except BaseException:
                self._named.pop(name, None)
                with contextlib.suppress(Exception):
                    await sync.stop()
                raise
        return sync

    def events(self) -> AsyncIterator[ConnectionEvent]:
        """The connection's state changes from now on (ends when the client closes)."""
        return self._running(self._connection).events()

    def stats(self) -> ClientStats:
        """A snapshot (see :class:`ClientStats`); after close, the final one."""
        if self._final is not None:
            return self._final
        return self._snapshot()

    def _snapshot(self, *, final: bool = False) -> ClientStats:
        """The stats now; ``final``: of a client that is stopping for good (its state is
        ``STOPPED`` unless it was taken over, whatever the connection's last state)."""
        conn = self._connection
        tel = self._telemetry
        state = conn.state if conn is not None else ConnectionState.STOPPED
        if final and state is not ConnectionState.TAKEN_OVER:
            state = ConnectionState.STOPPED
        conn_stats = conn.stats if conn is not None else None
        permission = self.permission
        waiting = (
            not final
            and conn is not None
            and self._started
            and not self._closed
            and not conn.connected
            and not state.terminal
        )
        connection_error = conn_stats.last_error if conn_stats else None
        limiter = conn.rate_limiter if conn is not None else None
        pacing: dict[str, Any] = {
            "throttled": conn_stats.throttled if conn_stats else 0,
            "pace": limiter.pace if limiter is not None else None,
            "slowed": limiter is not None and limiter.slowed,
        }
        if tel is not None and self._outbox is not None and not self._outbox.closed:
            t = tel.stats()
            return ClientStats(
                state=state,
                connected=state is ConnectionState.CONNECTED,
                permission=permission,
                policy=t.policy,
                shadow_synced=self._shadow is not None and self._shadow.synced,
                accepted=t.queued,
                dropped_no_permission=t.dropped_no_permission,
                published=t.published,
                republished=t.republished,
                acked=t.delivered,
                queued=t.depth,
                held=0 if permission else t.depth,
                in_flight=t.in_flight,
                dropped_overflow=t.dropped_overflow,
                rejected_full=t.rejected_full,
                rejected_invalid=t.rejected_invalid,
                oldest_age_s=t.oldest_age_s,
                ack_rate=t.ack_rate,
                connects=conn_stats.connects if conn_stats else 0,
                disconnects=conn_stats.disconnects if conn_stats else 0,
                last_error=t.last_error or connection_error,
                waiting_for_platform=waiting,
                connection_error=connection_error,
                carried_over=self._carried_over,
                pubacks=t.acked,
                rejected_too_large=t.rejected_too_large,
                refused=t.refused,
                refused_kept=t.refused_kept,
                **pacing,
            )
        depth = 0
        if self._outbox is not None and not self._outbox.closed:
            depth = self._outbox.depth
        return ClientStats(
            state=state,
            connected=state is ConnectionState.CONNECTED,
            permission=permission,
            policy=self.options.policy,
            shadow_synced=False,
            accepted=0,
            dropped_no_permission=0,
            published=0,
            republished=0,
            acked=0,
            queued=depth,
            held=0 if permission else depth,
            in_flight=0,
            dropped_overflow=0,
            rejected_full=0,
            rejected_invalid=0,
            oldest_age_s=None,
            ack_rate=0.0,
            connects=conn_stats.connects if conn_stats else 0,
            disconnects=conn_stats.disconnects if conn_stats else 0,
            last_error=connection_error,
            waiting_for_platform=waiting,
            connection_error=connection_error,
            carried_over=self._carried_over,
            **pacing,
        )


# --------------------------------------------------------------------------- blocking


async def _value(fn: Callable[[], T]) -> T:
    return fn()


class _LoopThread:
    """An event loop in a private daemon thread; :meth:`call` runs a coroutine on it and
    blocks for the result."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()
        self._ready.wait()

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        loop.call_soon(self._ready.set)
        try:
            loop.run_forever()
            tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError(
                "a blocking Client method was called from the client's own thread (e.g. in "
                "a shadow handler); use client.async_client there"
            )
        if self.loop.is_closed() or not self.thread.is_alive():
            coro.close()
            raise ClientClosed("the client is closed")
        fut: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"no result within {timeout} s") from None
        except BaseException:
            fut.cancel()
            raise

    def stop(self, join_s: float = 10.0) -> None:
        if self.loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self.thread:
            self.thread.join(join_s)


class BlockingAssetChannel:
    """One asset bound to a blocking :class:`Client`."""

    def __init__(self, client: Client, asset: Asset) -> None:
        self.client = client
        self.asset = asset

    def send(
        self,
        payload: PayloadLike,
        *,
        payloadversion: int | None = None,
        asset_time: datetime | None = None,
    ) -> SendResult:
        return self.client.send(
            self.asset, payload, payloadversion=payloadversion, asset_time=asset_time
        )


class BlockingShadow:
    """A :class:`ShadowSync` used from other threads. Handlers registered here run on the
    client's own thread: keep them short, and use :attr:`sync` (async) inside them."""

    def __init__(self, runner: _LoopThread, sync: ShadowSync) -> None:
        self._runner = runner
        self.sync = sync

    @property
    def desired(self) -> dict[str, Any]:
        return self._runner.call(_value(lambda: self.sync.desired))

    @property
    def reported(self) -> dict[str, Any]:
        return self._runner.call(_value(lambda: self.sync.reported))

    @property
    def version(self) -> int:
        return self._runner.call(_value(lambda: self.sync.version))

    @property
    def synced(self) -> bool:
        return self._runner.call(_value(lambda: self.sync.synced))

    @property
    def send_telemetry_allowed(self) -> bool:
        return self._runner.call(_value(lambda: self.sync.send_telemetry_allowed))

    def on_desired(self, key: str, handler: DesiredHandler) -> None:
        """Decide changes of ``key`` (see :meth:`ShadowSync.on_desired`)."""
        self._runner.call(_value(lambda: self.sync.on_desired(key, handler)))

    def on_send_telemetry_changed(self, callback: Callable[[bool], Any]) -> None:
        self._runner.call(_value(lambda: self.sync.on_send_telemetry_changed(callback)))

    def set_reported(self, key: str, value: Any) -> None:
        self._runner.call(_value(lambda: self.sync.set_reported(key, value)))

    def update_local(self, changes: Mapping[str, Any]) -> None:
        self._runner.call(_value(lambda: self.sync.update_local(changes)))

    def flush(self, timeout: float | None = None) -> None:
        self._runner.call(self.sync.flush(timeout))

    def wait_for(
        self,
        key: str,
        *args: Any,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """See :meth:`ShadowSync.wait_for`; raises :class:`TimeoutError` after
        ``timeout``."""
        return self._runner.call(self.sync.wait_for(key, *args, timeout=timeout, **kwargs))

    def get(self) -> dict[str, Any]:
        return self._runner.call(self.sync.client.get())

    def update(self, state: Mapping[str, Any], version: int | None = None) -> dict[str, Any]:
        return self._runner.call(self.sync.client.update(state, version=version))


class Client:
    """The blocking facade: an :class:`AsyncClient` on an event loop in a private daemon
    thread, the same methods, synchronous and thread-safe::

        with Client.from_store("certificate_store/local") as client:
            client.send(asset, StatusV2(...))
    """

    def __init__(
        self,
        identity: DeviceIdentity,
        *,
        sender: Sender | None = None,
        options: ClientOptions | None = None,
        **overrides: Unpack[ClientOptionsArgs],
    ) -> None:
        self.async_client = AsyncClient(identity, sender=sender, options=options, **overrides)
        self._runner: _LoopThread | None = None
        self._lock = threading.Lock()
        self._shadow: BlockingShadow | None = None
        self._named: dict[str, BlockingShadow] = {}

    @classmethod
    def from_store(
        cls,
        path: Path | str,
        *,
        sender: Sender | None = None,
        options: ClientOptions | None = None,
        **overrides: Unpack[ClientOptionsArgs],
    ) -> Client:
        """See :meth:`AsyncClient.from_store`."""
        identity = CertificateStore(Path(path)).load()
        return cls(identity, sender=sender, options=options, **overrides)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Client:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self, *, wait: bool = True) -> None:
        """Start the thread, connect, sync the shadow, start publishing (see
        :meth:`AsyncClient.start`; without the platform it starts offline)."""
        with self._lock:
            if self._runner is not None:
                raise ClientClosed("a client can be started only once", "make a new client")
            runner = _LoopThread(f"iotref-client-{self.async_client.client_id}")
            self._runner = runner
        try:
            runner.call(self.async_client.start(wait=wait))
        except BaseException:
            runner.stop()
            raise

    def close(self, timeout: float | None = None) -> ClientStats:
        """See :meth:`AsyncClient.close`; also stops the thread. Idempotent."""
        with self._lock:
            runner = self._runner
        if runner is None or runner.loop.is_closed():
            return self.async_client.stats()
        try:
            return runner.call(self.async_client.close(timeout))
        finally:
            runner.stop()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        runner = self._runner
        if runner is None:
            coro.close()
            raise ClientClosed("the client is not started", "use 'with Client.from_store(...)'")
        return runner.call(coro, timeout)

    # ------------------------------------------------------------------ views

    @property
    def client_id(self) -> str:
        return self.async_client.client_id

    @property
    def properties(self) -> DeviceProperties:
        return self.async_client.properties

    @property
    def sender(self) -> Sender:
        return self.async_client.sender

    @property
    def topic(self) -> str:
        return self.async_client.topic

    @property
    def connected(self) -> bool:
        return self.async_client.connected

    @property
    def permission(self) -> bool:
        return self.async_client.permission

    @property
    def outbox_recovery(self) -> OutboxRecovery | None:
        """See :attr:`AsyncClient.outbox_recovery`."""
        return self.async_client.outbox_recovery

    @property
    def shadow(self) -> BlockingShadow:
        """The classic shadow (see :class:`BlockingShadow`)."""
        if self._shadow is None:
            sync = self._call(_value(lambda: self.async_client.shadow))
            assert self._runner is not None
            self._shadow = BlockingShadow(self._runner, sync)
        return self._shadow

    def named_shadow(self, name: str, **sync_options: Any) -> BlockingShadow:
        """See :meth:`AsyncClient.named_shadow`."""
        found = self._named.get(name)
        if found is None:
            sync = self._call(self.async_client.named_shadow(name, **sync_options))
            assert self._runner is not None
            found = BlockingShadow(self._runner, sync)
            self._named[name] = found
        return found

    # ------------------------------------------------------------------ sending

    def asset(self, asset: Asset) -> BlockingAssetChannel:
        return BlockingAssetChannel(self, asset)

    def send(
        self,
        asset: Asset,
        payload: PayloadLike,
        *,
        payloadversion: int | None = None,
        asset_time: datetime | None = None,
    ) -> SendResult:
        """See :meth:`AsyncClient.send`."""
        return self._call(
            self.async_client.send(
                asset, payload, payloadversion=payloadversion, asset_time=asset_time
            )
        )

    def send_message(self, message: Mapping[str, Any]) -> SendResult:
        return self._call(self.async_client.send_message(message))

    def send_many(self, messages: Sequence[Mapping[str, Any]]) -> list[SendResult]:
        return self._call(self.async_client.send_many(messages))

    def wait_drained(self, timeout: float | None = None) -> bool:
        return self._call(self.async_client.wait_drained(timeout))

    def wait_permission(self, allowed: bool = True, timeout: float | None = None) -> bool:
        return self._call(self.async_client.wait_permission(allowed, timeout))

    def stats(self) -> ClientStats:
        runner = self._runner
        if runner is None or runner.loop.is_closed():
            return self.async_client.stats()
        return runner.call(_value(self.async_client.stats))

    def events(self) -> Iterator[ConnectionEvent]:
        """The connection's state changes from now on, blocking (ends when the client
        closes)."""
        items: queue.Queue[ConnectionEvent | None] = queue.Queue()

        async def pump() -> None:
            try:
                async for event in self.async_client.events():
                    items.put(event)
            finally:
                items.put(None)

        runner = self._runner
        if runner is None:
            raise ClientClosed("the client is not started")
        fut = asyncio.run_coroutine_threadsafe(pump(), runner.loop)
        try:
            while (event := items.get()) is not None:
                yield event
        finally:
            fut.cancel()
