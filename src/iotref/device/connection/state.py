"""What the connection reports: its state, the events of its changes, incoming messages,
its counters, and the shapes of the callbacks it calls."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


class ConnectionState(enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    TAKEN_OVER = "taken_over"
    STOPPED = "stopped"

    @property
    def terminal(self) -> bool:
        # Identity, not ``in (...)``: the members are singletons, and this runs for every
        # publish (a tuple's ``in`` calls the enum's ``__eq__``).
        return self is ConnectionState.TAKEN_OVER or self is ConnectionState.STOPPED


@dataclass(frozen=True)
class ConnectionEvent:
    state: ConnectionState
    at: float
    """``time.time()`` of the change."""
    reason: str | None = None
    session_present: bool | None = None


@dataclass(frozen=True)
class IncomingMessage:
    topic: str
    payload: bytes
    qos: int


@dataclass(frozen=True)
class ConnectionStats:
    connects: int = 0
    disconnects: int = 0
    publishes: int = 0
    pubacks: int = 0
    failures: int = 0
    """Failed connection attempts."""
    publish_failures: int = 0
    messages_received: int = 0
    last_error: str | None = None
    throttled: int = 0
    """Publishes the platform answered with "quota exceeded" (PUBACK 0x97)."""


@dataclass(slots=True)
class Counters:
    """The connection's running counts, of which :class:`ConnectionStats` is a snapshot."""

    connects: int = 0
    disconnects: int = 0
    publishes: int = 0
    pubacks: int = 0
    failures: int = 0
    publish_failures: int = 0
    messages_received: int = 0
    last_error: str | None = None
    throttled: int = 0

    def snapshot(self) -> ConnectionStats:
        return ConnectionStats(
            connects=self.connects,
            disconnects=self.disconnects,
            publishes=self.publishes,
            pubacks=self.pubacks,
            failures=self.failures,
            publish_failures=self.publish_failures,
            messages_received=self.messages_received,
            last_error=self.last_error,
            throttled=self.throttled,
        )


MessageHandler = Callable[[IncomingMessage], Awaitable[None] | None]
ConnectedCallback = Callable[[bool], Awaitable[None] | None]
PublishCallback = Callable[[BaseException | None], None]
"""What :meth:`~iotref.device.connection.connection.Connection.publish_callback` calls on
the loop: ``None`` on success, else the
:class:`~iotref.device.connection.errors.PublishFailed`."""
