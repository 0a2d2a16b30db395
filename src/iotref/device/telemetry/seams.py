"""What the telemetry publisher (:class:`~iotref.device.telemetry.publisher.Telemetry`)
needs of its collaborators, as Protocols: the MQTT connection it publishes through, the
pace that connection keeps, the message store it drains, where the permission to send
comes from, and the validator. The publisher knows them only through these."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from iotref.device.telemetry.outbox_errors import OutboxFull
from iotref.device.telemetry.outbox_records import (
    AppendResult,
    Durability,
    OutboxEntry,
    OutboxStats,
    PendingMessage,
)

ConnectedCallback = Callable[[bool], Awaitable[None] | None]
"""Called with ``session_present`` after every (re)connect."""
PublishDone = Callable[[BaseException | None], None]
"""Called once per publish, on the event loop: ``None`` when acknowledged (QoS 1), else
why it failed."""


class PublishPace(Protocol):
    """The connection's pace under the platform's per-connection quotas, as
    :class:`iotref.device.connection.rate_limit.PublishLimiter` keeps it. The publisher asks before
    each batch; every publish is charged to it by the connection."""

    def ready(self) -> int:
        """How many publishes may go now (0: none yet, see :meth:`delay`)."""
        ...

    def delay(self) -> float:
        """Seconds until one more publish may go."""
        ...

    def byte_room(self) -> float:
        """Bytes that may go before the throughput pace is exceeded (``inf``: not
        paced); a publish may go while this is not negative."""
        ...


class TelemetryConnection(Protocol):
    """What the publisher needs of the MQTT connection
    (:class:`iotref.device.connection.connection.Connection`)."""

    @property
    def connected(self) -> bool: ...

    @property
    def rate_limiter(self) -> PublishPace | None:
        """The pace to keep (None: not paced)."""
        ...

    def add_connected_callback(self, cb: ConnectedCallback) -> None: ...

    def remove_connected_callback(self, cb: ConnectedCallback) -> None: ...

    def publish_callback(
        self, topic: str, payload: bytes, callback: PublishDone, qos: int = 1
    ) -> None:
        """Queue a publish without waiting and call ``callback`` exactly once when it
        completed (on the loop), or raise at once (and never call it) when the publish
        cannot even be queued."""
        ...


class MessageStore(Protocol):
    """The queue the publisher drains: messages kept in ``seq`` order until acknowledged,
    such as the durable :class:`iotref.device.telemetry.outbox.Outbox`.

    The contract, which the publisher relies on:

    - Appends number messages with strictly increasing ``seq`` values, never reused while
      the store is open, and keep each message until it is acknowledged (:meth:`ack`),
      refused (:meth:`refuse`) or dropped to make room (reported in
      :attr:`AppendResult.dropped <iotref.device.telemetry.outbox_records.AppendResult.dropped>`).
      A message that cannot be stored raises :class:`OutboxFull` and nothing is stored.
    - When an append returns, the message is stored as durably as :attr:`durability` says.
    - :meth:`read_pending` returns stored messages in ``seq`` order and never one already
      acknowledged, refused or dropped, even while its removal is buffered.
    - :meth:`ack` may buffer the removal: :attr:`pending_acks` counts what is buffered and
      :meth:`flush_acks` writes it. Acknowledging an unknown ``seq`` does nothing.
    - After :meth:`close` (:attr:`closed`), the publisher no longer acknowledges, refuses
      or flushes.

    Every method is called on the event loop's thread and must return quickly.
    """

    @property
    def closed(self) -> bool: ...

    @property
    def durability(self) -> Durability:
        """``"power"`` when every commit is flushed to the disk: the publisher then lets
        the sends of concurrent tasks share one commit (:meth:`append_each`)."""
        ...

    @property
    def depth(self) -> int:
        """Messages stored and not acknowledged."""
        ...

    @property
    def pending_acks(self) -> int:
        """Acknowledgements buffered and not yet written."""
        ...

    def append(self, topic: str, payload: bytes, message_id: str | None = None) -> AppendResult:
        """Store one message."""
        ...

    def append_many(self, entries: Sequence[OutboxEntry]) -> list[AppendResult]:
        """Store several messages together: all of them, or none (:class:`OutboxFull`)."""
        ...

    def append_each(self, entries: Sequence[OutboxEntry]) -> list[AppendResult | OutboxFull]:
        """Store several messages with the outcomes :meth:`append` would have had called
        for each in turn (a result, or the :class:`OutboxFull` it raised), in one commit
        where they allow it. Other errors are raised for all."""
        ...

    def read_pending(self, after_seq: int = 0, limit: int = 500) -> list[PendingMessage]:
        """Up to ``limit`` stored messages with ``seq > after_seq``, in ``seq`` order."""
        ...

    def mark_attempted(self, first_seq: int, last_seq: int) -> None:
        """Count one more publish attempt of the messages ``first_seq..last_seq`` (a
        store that keeps no count does nothing)."""
        ...

    def ack(self, seq: int) -> None:
        """The message ``seq`` was acknowledged: remove it (possibly buffered)."""
        ...

    def flush_acks(self) -> int:
        """Write the buffered acknowledgements; returns how many messages were removed."""
        ...

    def refuse(self, seq: int, reason: str) -> bool:
        """Take the message ``seq``, refused for good by the platform, out of the queue;
        False when it is no longer queued."""
        ...

    def stats(self) -> OutboxStats: ...

    def close(self) -> None: ...


@runtime_checkable
class PermissionSource(Protocol):
    """Where the ``sendTelemetryData`` permission comes from."""

    @property
    def allowed(self) -> bool: ...

    def add_listener(self, cb: Callable[[bool], None]) -> None: ...


class ShadowPermissionLike(Protocol):
    """What :class:`iotref.device.shadow.sync.ShadowSync` offers about the permission."""

    @property
    def send_telemetry_allowed(self) -> bool: ...

    def on_send_telemetry_changed(self, callback: Callable[[bool], Any]) -> None: ...


class MessageValidatorLike(Protocol):
    """What :class:`~iotref.protocol.message_schemas.MessageValidator` offers."""

    def validate_or_raise(self, message: Any) -> None: ...
