"""How a client behaves and what it reports: :class:`ClientOptions` (every field with a
default that suits a machine's gateway), the same fields as keyword arguments
(:class:`ClientOptionsArgs`), and :class:`ClientStats`, a snapshot of one client, taken from
its parts by :func:`client_stats`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from iotref.device.connection.state import ConnectionState
from iotref.device.telemetry.outbox import DEFAULT_MAX_BYTES, DEFAULT_MAX_MESSAGES
from iotref.device.telemetry.outbox_records import Durability, OverflowPolicy
from iotref.device.telemetry.permission import PermissionPolicy
from iotref.device.telemetry.publisher import DEFAULT_WINDOW
from iotref.protocol import limits

if TYPE_CHECKING:
    from iotref.device.connection.connection import Connection
    from iotref.device.shadow.sync import ShadowSync
    from iotref.device.telemetry.outbox import Outbox
    from iotref.device.telemetry.publisher import Telemetry

__all__ = [
    "ClientOptions",
    "ClientOptionsArgs",
    "ClientStats",
    "client_stats",
    "merged_options",
]


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
    so that no second the platform counts holds more (:mod:`iotref.device.connection.rate_limit`); a
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

    def connection_overrides(self) -> dict[str, Any]:
        """The :class:`~iotref.device.connection.ConnectionSettings` fields these options
        set (the rest comes from the certificate store)."""
        overrides: dict[str, Any] = {
            "alpn": self.alpn,
            "min_backoff_s": self.min_backoff_s,
            "max_backoff_s": self.max_backoff_s,
            "connect_timeout_s": self.connect_timeout_s,
            "keepalive_s": self.keepalive_s,
            "fail_fast": True,  # errors retrying cannot fix end a waiting start at once
            "publish_rate_limit": self.publish_rate_limit or None,
            "throughput_limit": self.throughput_limit or None,
        }
        if self.port is not None:
            overrides["port"] = self.port
        return overrides


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


def merged_options(options: ClientOptions | None, overrides: Mapping[str, Any]) -> ClientOptions:
    """``options`` (default: the defaults) with ``overrides`` (field names) replaced."""
    base = options or ClientOptions()
    return dataclasses.replace(base, **overrides) if overrides else base


@dataclass(frozen=True)
class ClientStats:
    """A snapshot of one client. Counters count since the client started; ``queued``,
    ``held`` and ``oldest_age_s`` describe the outbox now (earlier runs included).

    The outbox's counts add up: ``carried_over + accepted == acked + queued +
    dropped_overflow + refused`` (messages left by earlier runs and taken in by this one
    are either delivered, still in the outbox, evicted by ``overflow="drop_oldest"``, or
    refused for good by the platform and moved to the outbox's ``refused`` table).

    After :meth:`AsyncClient.close` the state is ``STOPPED`` (``TAKEN_OVER`` if another
    process took the session over), ``connected`` and ``waiting_for_platform`` are false.
    Counters a client has not started yet are 0."""

    state: ConnectionState
    connected: bool
    permission: bool
    """``sendTelemetryData`` as last seen in the shadow (False until known)."""
    policy: PermissionPolicy
    shadow_synced: bool
    accepted: int = 0
    """Messages this client took into the outbox (``send()`` returned ``queued``)."""
    dropped_no_permission: int = 0
    """Valid messages discarded because of ``policy="drop"``."""
    published: int = 0
    """Publishes, re-publications included."""
    republished: int = 0
    acked: int = 0
    """Messages delivered: acknowledged by the platform (PUBACK) and so removed from the
    outbox, each counted once (messages of earlier runs included; see ``pubacks``)."""
    queued: int = 0
    """Messages in the outbox, not yet acknowledged (earlier runs' included)."""
    held: int = 0
    """Of ``queued``, held back for want of permission (``queued`` while not permitted)."""
    in_flight: int = 0
    dropped_overflow: int = 0
    """Messages evicted from the outbox to make room (``overflow="drop_oldest"``)."""
    rejected_full: int = 0
    """``send()`` calls refused because the outbox was full (``overflow="reject_new"``)."""
    rejected_invalid: int = 0
    """``send()`` calls refused because the message is not valid against the schemas."""
    oldest_age_s: float | None = None
    ack_rate: float = 0.0
    """Acknowledged messages per second, last ten seconds."""
    connects: int = 0
    disconnects: int = 0
    last_error: str | None = None
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


def client_stats(
    connection: Connection | None,
    shadow: ShadowSync | None,
    telemetry: Telemetry | None,
    outbox: Outbox | None,
    *,
    policy: PermissionPolicy,
    carried_over: int,
    running: bool,
    final: bool = False,
) -> ClientStats:
    """The stats of a client made of these parts (None: not made yet). ``running``: started
    and not closed; ``final``: the client is stopping for good (its state is ``STOPPED``
    unless it was taken over, whatever the connection's last state)."""
    conn = connection
    state = conn.state if conn is not None else ConnectionState.STOPPED
    if final and state is not ConnectionState.TAKEN_OVER:
        state = ConnectionState.STOPPED
    conn_stats = conn.stats if conn is not None else None
    connection_error = conn_stats.last_error if conn_stats else None
    limiter = conn.rate_limiter if conn is not None else None
    permission = shadow is not None and shadow.send_telemetry_allowed
    outbox = outbox if outbox is not None and not outbox.closed else None
    depth = outbox.depth if outbox is not None else 0
    stats = ClientStats(
        state=state,
        connected=state is ConnectionState.CONNECTED,
        permission=permission,
        policy=policy,
        shadow_synced=False,
        queued=depth,
        held=0 if permission else depth,
        connects=conn_stats.connects if conn_stats else 0,
        disconnects=conn_stats.disconnects if conn_stats else 0,
        last_error=connection_error,
        waiting_for_platform=(
            running and not final and conn is not None and not conn.connected and not state.terminal
        ),
        connection_error=connection_error,
        carried_over=carried_over,
        throttled=conn_stats.throttled if conn_stats else 0,
        pace=limiter.pace if limiter is not None else None,
        slowed=limiter is not None and limiter.slowed,
    )
    if telemetry is None or outbox is None:
        return stats
    t = telemetry.stats()
    return dataclasses.replace(
        stats,
        policy=t.policy,
        shadow_synced=shadow is not None and shadow.synced,
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
        last_error=t.last_error or connection_error,
        pubacks=t.acked,
        rejected_too_large=t.rejected_too_large,
        refused=t.refused,
        refused_kept=t.refused_kept,
    )
