"""Permission-gated, durable telemetry publishing (contract sections 6-8).

:class:`Telemetry` is what an application calls::

    telemetry = Telemetry(connection, outbox, topic, permission=flag)
    result = await telemetry.send(message)   # validated, serialized, stored, then returns

``send()`` validates the whole message (an invalid one raises
:class:`~iotref.protocol.message_schemas.InvalidMessage` naming the JSON path and the reason,
and is never queued), serializes it as compact JSON (:func:`iotref.device.messages.to_json`),
refuses it with :class:`MessageTooLarge` when that is over the platform's payload limit
(:data:`iotref.protocol.limits.MAX_PAYLOAD_BYTES`), appends it to the durable
:class:`~iotref.device.outbox.Outbox` and wakes the drainer. When
it returns with ``SendResult.status == "queued"`` the message is committed and will be
published at least once, through broker restarts, network cuts and crashes of this process.

The drainer publishes the outbox strictly in ``seq`` order with QoS 1, keeping up to
``window`` messages in flight (unacknowledged), and removes a message only when its PUBACK
arrives. After every (re)connect, and after a failed publish, it starts again from the
oldest unacknowledged message, so everything unacknowledged is re-published in order:
duplicates are possible, gaps and reordering of first deliveries are not (the platform drops
duplicates by ``sendereventuuid``).

A message the platform refuses for good (a PUBACK reason code or an MQTT library error that
no retry can change, see :mod:`iotref.device.publish_refusals`), and a stored message over
the payload limit (queued by an earlier version), never blocks the queue: it is moved to
the outbox's ``refused`` table (:meth:`~iotref.device.outbox.Outbox.refuse`), counted in
:attr:`TelemetryStats.refused` and logged, and the messages after it go on in order. Every
other failure is retried.

Permission (the shadow's ``sendTelemetryData``): while it is not true nothing is published;
the permission is checked before every publish. ``policy`` says what ``send()`` does
meanwhile:

``"hold"`` (default)
    The message is validated and queued as usual and published once permission returns
    (``SendResult.status == "queued"``). The outbox bound still applies.
``"drop"``
    The message is validated and then discarded: ``SendResult.status ==
    "dropped_no_permission"``, counted in :attr:`TelemetryStats.dropped_no_permission`.
    Messages queued before the permission was withdrawn stay queued and are published when
    it returns.

The permission comes from any object with an ``allowed`` attribute and an
``add_listener(callback)`` method (:class:`PermissionSource`), such as
:class:`PermissionFlag` (settable; :meth:`Telemetry.set_permission`) or
:class:`ShadowPermission`, which follows :class:`iotref.device.shadow.sync.ShadowSync`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Literal, Protocol, runtime_checkable

from iotref.device import stdlib_compat
from iotref.device.connection.rate_limit import PublishLimiter
from iotref.device.messages import to_json
from iotref.device.outbox import AppendResult, Outbox, OutboxEntry
from iotref.device.publish_refusals import permanent_refusal
from iotref.device.stdlib_compat import StrEnum
from iotref.protocol.limits import MAX_PAYLOAD_BYTES

log = logging.getLogger(__name__)

PermissionPolicy = Literal["hold", "drop"]

DEFAULT_WINDOW: Final = 1000
DEFAULT_BATCH: Final = 256
DEFAULT_CLOSE_TIMEOUT_S: Final = 10.0
SEND_YIELD_EVERY: Final = 32
"""``send()`` lets other tasks run (the drainer, the acks) every this many calls."""
_GROUP_SOLO_LIMIT: Final = 4
"""Group commits of a single message in a row after which ``send()`` stops grouping."""
_IDLE_ACK_FLUSH_S: Final = 0.2
_RETRY_MIN_S: Final = 0.5
_RETRY_MAX_S: Final = 30.0


# --------------------------------------------------------------------------- protocols


class ConnectionLike(Protocol):
    """What the publisher needs of :class:`iotref.device.connection.connection.Connection`.

    A connection that also has ``publish_callback(topic, payload, callback, qos)`` (as
    :class:`~iotref.device.connection.connection.Connection` does) is published through that,
    which costs less per message than a future."""

    @property
    def connected(self) -> bool: ...

    def add_connected_callback(self, cb: Callable[[bool], Awaitable[None] | None]) -> None: ...

    def publish_nowait(self, topic: str, payload: bytes, qos: int = 1) -> asyncio.Future[None]: ...


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


class ShadowPermission:
    """A :class:`PermissionSource` reading a shadow sync's ``send_telemetry_allowed``
    (``False`` until the shadow was read) and listening to its changes."""

    __slots__ = ("_shadow",)

    def __init__(self, shadow: ShadowPermissionLike) -> None:
        self._shadow = shadow

    @property
    def allowed(self) -> bool:
        return self._shadow.send_telemetry_allowed is True

    def add_listener(self, cb: Callable[[bool], None]) -> None:
        self._shadow.on_send_telemetry_changed(cb)


class MessageValidatorLike(Protocol):
    """What :class:`~iotref.protocol.message_schemas.MessageValidator` offers."""

    def validate_or_raise(self, message: Any) -> None: ...


class PermissionFlag:
    """A settable :class:`PermissionSource`; listeners hear every change."""

    def __init__(self, allowed: bool = False) -> None:
        self._allowed = allowed
        self._listeners: list[Callable[[bool], None]] = []

    @property
    def allowed(self) -> bool:
        return self._allowed

    def set(self, allowed: bool) -> None:
        """Change the permission (``allowed`` is taken as ``allowed is True``)."""
        allowed = allowed is True
        if allowed == self._allowed:
            return
        self._allowed = allowed
        for cb in list(self._listeners):
            try:
                cb(allowed)
            except Exception:
                log.exception("permission listener failed")

    def add_listener(self, cb: Callable[[bool], None]) -> None:
        self._listeners.append(cb)


# --------------------------------------------------------------------------- results


class SendStatus(StrEnum):
    """What :meth:`Telemetry.send` did with a valid message."""

    QUEUED = "queued"
    """Stored in the outbox; it will be published (at least once, in order)."""
    DROPPED_NO_PERMISSION = "dropped_no_permission"
    """Not stored: no permission to send telemetry and the policy is ``drop``."""


@dataclass(frozen=True, slots=True)
class SendResult:
    status: SendStatus
    seq: int | None = None
    """The outbox sequence number (queued messages only)."""
    evicted: int = 0
    """Older messages dropped from the outbox to make room (``drop_oldest`` only)."""

    @property
    def queued(self) -> bool:
        return self.status is SendStatus.QUEUED


class TelemetryClosed(RuntimeError):
    """``send()`` after ``close()``."""


class MessageTooLarge(ValueError):
    """The encoded message is larger than the platform accepts; nothing was queued."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"the message is {size:,} bytes encoded, over the platform's limit of "
            f"{limit:,} bytes per message"
        )
        self.size = size
        self.limit = limit


@dataclass(frozen=True, slots=True)
class TelemetryStats:
    """A snapshot of the publisher and its outbox."""

    connected: bool
    permission: bool
    policy: PermissionPolicy
    queued: int
    """Messages accepted into the outbox by this object."""
    published: int
    """Publish calls, re-publications included."""
    republished: int
    acked: int
    """PUBACKs received (a message re-published twice may be acked twice)."""
    delivered: int
    """Messages acknowledged and removed from the outbox, each counted once."""
    failed: int
    """Publishes that failed (connection loss, error reason code)."""
    dropped_no_permission: int
    rejected_invalid: int
    rejected_full: int
    rejected_too_large: int
    """``send()`` calls refused because the message is over the payload limit."""
    refused: int
    """Messages the platform refused for good, moved out of the queue by this object."""
    refused_kept: int
    """Messages in the outbox's ``refused`` table (earlier runs included)."""
    dropped_overflow: int
    in_flight: int
    window: int
    depth: int
    bytes: int
    oldest_age_s: float | None
    ack_rate: float
    """Messages removed from the outbox per second (last ten seconds)."""
    last_error: str | None


# --------------------------------------------------------------------------- publisher

_Pending = tuple[int, str, bytes]
"""A message to publish: ``(seq, topic, payload)``."""


class _Wakeup:
    """An :class:`asyncio.Event` for a single waiter (the drainer): the same ``set``,
    ``clear``, ``is_set`` and ``wait``, without the deque of waiters an ``asyncio.Event``
    allocates (760 bytes even when empty) in each of a fleet's thousands of publishers."""

    __slots__ = ("_set", "_waiter")

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if not self._set:
            self._set = True
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        if self._set:
            return
        assert self._waiter is None, "one waiter only"
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None


async def _wait_event(event: _Wakeup, seconds: float) -> None:
    """Wait until ``event`` is set or ``seconds`` passed."""
    with contextlib.suppress(TimeoutError):
        async with stdlib_compat.timeout(seconds):
            await event.wait()


def _always() -> bool:
    return True


def _read_records(outbox: Outbox, after_seq: int, limit: int) -> list[_Pending]:
    """``Outbox.read_pending`` for an outbox that overrides ``read_batch``."""
    return [(r.seq, r.topic, r.payload) for r in outbox.read_batch(after_seq, limit)]


def _default_validator() -> MessageValidatorLike:
    from iotref.protocol.message_schemas import default_validator

    return default_validator()


class Telemetry:
    """Validates, stores and publishes telemetry for one sender (see the module docstring).

    ``topic`` is ``telemetry_topic(prefix, org_id, client_id)``. ``validator`` defaults to
    the packaged schemas' validator. ``permission`` defaults to a :class:`PermissionFlag`
    that starts allowed (use :meth:`set_permission`). ``window`` is the most messages in
    flight; ``batch`` the most read from the outbox at once.

    The drainer runs as a task on the running event loop from :meth:`start` (or the first
    :meth:`send`) until :meth:`close`. One :class:`Telemetry` per outbox: it publishes
    what it appended itself from memory, and reads back from the outbox only the backlog
    (earlier runs, re-publications). The outbox belongs to the caller: ``close()`` writes
    its buffered acks but does not close it.
    """

    # A fleet holds thousands of publishers: no instance dict (``__weakref__`` kept, so
    # that applications can still hold weak references to one).
    __slots__ = (
        "__weakref__",
        "_acked",
        "_batch",
        "_can_group",
        "_close_timeout",
        "_closing",
        "_conn",
        "_cursor",
        "_draining",
        "_dropped_no_permission",
        "_failed",
        "_failures_in_row",
        "_gen",
        "_group",
        "_group_solos",
        "_grouping",
        "_hold_until",
        "_idle_waiter",
        "_in_flight",
        "_last_error",
        "_last_sender",
        "_limiter",
        "_max_payload",
        "_outbox",
        "_permission",
        "_publish_cb",
        "_published",
        "_published_high",
        "_queued",
        "_read_pending",
        "_refill",
        "_refused",
        "_rejected_invalid",
        "_rejected_too_large",
        "_republished",
        "_since_yield",
        "_tail",
        "_tail_max",
        "_tail_valid",
        "_task",
        "_validator",
        "_waiting_room",
        "_wake",
        "policy",
        "topic",
        "window",
    )

    def __init__(
        self,
        connection: ConnectionLike,
        outbox: Outbox,
        topic: str,
        validator: MessageValidatorLike | None = None,
        permission: PermissionSource | None = None,
        policy: PermissionPolicy = "hold",
        *,
        window: int = DEFAULT_WINDOW,
        batch: int = DEFAULT_BATCH,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT_S,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    ) -> None:
        if policy not in ("hold", "drop"):
            raise ValueError(f"unknown permission policy {policy!r}")
        if window < 1 or batch < 1 or max_payload_bytes < 1:
            raise ValueError("window, batch and max_payload_bytes must be positive")
        self._max_payload = max_payload_bytes
        self._conn = connection
        self._outbox = outbox
        self.topic = topic
        self._validator = validator if validator is not None else _default_validator()
        self._permission: PermissionSource = (
            permission if permission is not None else PermissionFlag(True)
        )
        self.policy: PermissionPolicy = policy
        self.window = window
        self._batch = batch
        self._refill = max(1, min(batch, window // 4))
        self._close_timeout = close_timeout

        self._wake: _Wakeup | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._draining = False
        # Publishing state: one "generation" per pass over the outbox. A rewind (reconnect,
        # failure) starts a new generation from the oldest unacknowledged message; futures
        # of older generations still remove their message when acked but no longer count
        # against the window nor trigger rewinds.
        self._gen = 0
        self._cursor = 0
        # Messages appended by this object while the drainer had read everything up to
        # ``_cursor``: the rows right after the cursor, in order, so the drainer takes
        # them from memory instead of reading them back from SQLite; when
        # ``_tail_valid``, all of them (else the rows after the tail's are read back).
        # (A list, not a deque: an empty deque already takes a 760-byte block.)
        self._tail: list[_Pending] = []
        self._tail_valid = False
        self._tail_max = max(window, batch) * 2
        self._read_pending: Callable[[int, int], list[_Pending]] = (
            outbox.read_pending
            if type(outbox).read_batch is Outbox.read_batch
            else partial(_read_records, outbox)
        )
        self._published_high = 0
        # The seqs published in the current generation and not yet acknowledged.
        self._in_flight: set[int] = set()
        self._idle_waiter: asyncio.Future[None] | None = None
        self._publish_cb: Callable[..., None] | None = getattr(connection, "publish_callback", None)
        # The connection's pace (see iotref.device.connection.rate_limit): the drainer
        # publishes only what it lets go now, and waits for the rest.
        self._limiter: PublishLimiter | None = getattr(connection, "rate_limiter", None)
        self._hold_until = 0.0
        self._failures_in_row = 0
        self._waiting_room = False
        self._since_yield = 0
        # Group commit of concurrent send() calls: the open group of this loop pass, and
        # whether sends are grouped at all (from when a second task sends until a few
        # groups in a row held one message only).
        self._group: list[tuple[bytes, str | None, asyncio.Future[AppendResult]]] | None = None
        self._grouping = False
        self._group_solos = 0
        self._last_sender: asyncio.Task[Any] | None = None
        # Grouping pays where a commit is dear: durability="power" flushes every commit to
        # the disk (the loop waits for it); with "process" a commit costs little more than
        # the rows it writes, less than suspending each send until the group commit. And
        # only an Outbox whose appends are its own can commit a group in one transaction
        # (a subclass may keep its rows elsewhere).
        kind = type(outbox)
        self._can_group = (
            outbox.durability == "power"
            and kind.append is Outbox.append
            and kind.append_many is Outbox.append_many
        )

        self._queued = 0
        self._published = 0
        self._republished = 0
        self._acked = 0
        self._failed = 0
        self._dropped_no_permission = 0
        self._rejected_invalid = 0
        self._rejected_too_large = 0
        self._refused = 0
        self._last_error: str | None = None

        self._permission.add_listener(self._on_permission)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the drainer on the running loop (idempotent)."""
        if self._task is not None:
            return
        if self._closing:
            raise TelemetryClosed("telemetry is closed")
        self._wake = _Wakeup()
        self._conn.add_connected_callback(self._on_connected)
        self._task = asyncio.get_running_loop().create_task(
            self._drain_loop(), name="telemetry-drainer"
        )

    async def __aenter__(self) -> Telemetry:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(
        self, max_wait: float | None = None, *, drain: bool | Callable[[], bool] = False
    ) -> bool:
        """Stop accepting messages and stop the drainer; return True if nothing was left
        unacknowledged in flight (or, when draining, in the outbox).

        Waits at most ``max_wait`` seconds (default: ``close_timeout``) for the PUBACKs of
        the messages in flight; with ``drain=True`` keeps publishing until the outbox is
        empty or the time is up, whenever connected and permitted meanwhile (a connection
        that comes back during the close is used). ``drain`` may be a function instead:
        draining then also ends as soon as it returns False (nothing more can be sent).
        Whatever is not acknowledged stays in the outbox for the next run.
        """
        timeout = self._close_timeout if max_wait is None else max_wait
        if self._closing and self._task is None:
            return not self._in_flight
        self._closing = True
        self._draining = bool(drain)
        worth_it: Callable[[], bool] = drain if callable(drain) else _always
        deadline = time.monotonic() + timeout
        done = True
        if self._task is not None:
            self._kick()
            if drain:
                # Polling the depth keeps the hot path free of close-only bookkeeping.
                while (  # noqa: ASYNC110
                    self._outbox.depth > 0 and time.monotonic() < deadline and worth_it()
                ):
                    await asyncio.sleep(0.02)
                done = self._outbox.depth == 0
            self._draining = False
            self._kick()
            if self._in_flight:
                remaining = max(0.0, deadline - time.monotonic())
                waiter = asyncio.get_running_loop().create_future()
                self._idle_waiter = waiter
                await asyncio.wait([waiter], timeout=remaining)
                self._idle_waiter = None
            done = done and not self._in_flight
            # The drainer returns by itself once closing; cancel only if it is stuck.
            self._kick()
            finished, _ = await asyncio.wait([self._task], timeout=1.0)
            if not finished:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None
        remove = getattr(self._conn, "remove_connected_callback", None)
        if remove is not None:
            remove(self._on_connected)
        if not self._outbox.closed:
            self._outbox.flush_acks()
        return done

    # ------------------------------------------------------------------ sending

    async def send(self, message: dict[str, Any]) -> SendResult:
        """Validate, serialize and store one message; see :class:`SendResult`.

        Returns once the message is committed. With ``durability="power"`` the sends of
        several tasks that wait at the same time share one commit (one flush).

        Raises :class:`~iotref.protocol.message_schemas.InvalidMessage` (nothing queued),
        :class:`MessageTooLarge` (nothing queued),
        :class:`~iotref.device.outbox.OutboxFull` (``reject_new``; nothing queued, the
        caller keeps the message) or :class:`TelemetryClosed`.
        """
        if self._closing:
            raise TelemetryClosed("telemetry is closed")
        if self._task is None:
            await self.start()
        try:
            self._validator.validate_or_raise(message)
        except ValueError:
            self._rejected_invalid += 1
            raise
        if self.policy == "drop" and not self._permission.allowed:
            self._dropped_no_permission += 1
            return SendResult(SendStatus.DROPPED_NO_PERMISSION)
        message_id = message.get("sendereventuuid")
        payload = to_json(message)
        if len(payload) > self._max_payload:
            self._rejected_too_large += 1
            raise MessageTooLarge(len(payload), self._max_payload)
        mid = message_id if isinstance(message_id, str) else None
        # With durability="power", several tasks sending at once share one commit (see
        # _send_grouped); otherwise, and for a single sender, commit right here.
        if self._can_group:
            if self._group is not None or self._grouping:
                return await self._send_grouped(payload, mid)
            task = asyncio.current_task()
            if task is not self._last_sender:
                if self._last_sender is not None:
                    self._grouping = True
                    self._group_solos = 0
                    self._last_sender = None
                    return await self._send_grouped(payload, mid)
                self._last_sender = task
        appended = self._outbox.append(self.topic, payload, mid)
        self._remember(appended.seq, payload, appended.dropped)
        self._queued += 1
        self._kick()
        self._since_yield += 1
        if self._since_yield >= SEND_YIELD_EVERY:  # see _maybe_yield
            self._since_yield = 0
            await asyncio.sleep(0)
        return SendResult(SendStatus.QUEUED, appended.seq, appended.dropped)

    async def _send_grouped(self, payload: bytes, message_id: str | None) -> SendResult:
        """Store the message in the group commit of this loop pass: every ``send()`` that
        gets here before the commit runs (at the end of the pass) joins it, and each
        returns once the one transaction committed. Outcomes are those of separate
        appends in call order (when the group does not fit as a whole, it is appended one
        by one). A caller cancelled before the commit is left out of it."""
        group = self._group
        if group is None:
            group = self._group = []
            asyncio.get_running_loop().call_soon(self._commit_group)
        waiter: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        group.append((payload, message_id, waiter))
        appended = await waiter
        return SendResult(SendStatus.QUEUED, appended.seq, appended.dropped)

    def _commit_group(self) -> None:
        group, self._group = self._group or [], None
        group = [entry for entry in group if not entry[2].done()]  # cancelled callers
        if len(group) > 1:
            self._group_solos = 0
        else:
            self._group_solos += 1
            if self._group_solos >= _GROUP_SOLO_LIMIT:
                self._grouping = False
        if not group:
            return
        topic = self.topic
        outcomes: Sequence[AppendResult | BaseException]
        try:
            outcomes = self._outbox._append_each(
                [OutboxEntry(topic, payload, mid) for payload, mid, _ in group]
            )
        except Exception as exc:  # closed, SQLite: every caller gets it
            outcomes = [exc] * len(group)
        for (payload, _, waiter), outcome in zip(group, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                waiter.set_exception(outcome)
                continue
            self._remember(outcome.seq, payload, outcome.dropped)
            self._queued += 1
            waiter.set_result(outcome)
        self._kick()

    async def send_many(self, messages: Sequence[dict[str, Any]]) -> list[SendResult]:
        """Like :meth:`send` for several messages, stored in one transaction (one flush in
        ``durability="power"``). Validates all first: one invalid or too large message
        refuses all."""
        if self._closing:
            raise TelemetryClosed("telemetry is closed")
        if self._task is None:
            await self.start()
        for message in messages:
            try:
                self._validator.validate_or_raise(message)
            except ValueError:
                self._rejected_invalid += 1
                raise
        if self.policy == "drop" and not self._permission.allowed:
            self._dropped_no_permission += len(messages)
            return [SendResult(SendStatus.DROPPED_NO_PERMISSION) for _ in messages]
        entries = []
        for message in messages:
            message_id = message.get("sendereventuuid")
            payload = to_json(message)
            if len(payload) > self._max_payload:
                self._rejected_too_large += 1
                raise MessageTooLarge(len(payload), self._max_payload)
            entries.append(
                OutboxEntry(
                    self.topic,
                    payload,
                    message_id if isinstance(message_id, str) else None,
                )
            )
        appended = self._outbox.append_many(entries)
        for entry, result in zip(entries, appended, strict=True):
            self._remember(result.seq, entry.payload, result.dropped)
        self._queued += len(entries)
        self._kick()
        self._since_yield = SEND_YIELD_EVERY
        await self._maybe_yield()
        return [SendResult(SendStatus.QUEUED, a.seq, a.dropped) for a in appended]

    # ------------------------------------------------------------------ permission

    def set_permission(self, allowed: bool) -> None:
        """Set the permission when it is a :class:`PermissionFlag` (the default)."""
        if not isinstance(self._permission, PermissionFlag):
            raise TypeError("the permission comes from a source; change it there")
        self._permission.set(allowed)

    @property
    def permission(self) -> bool:
        return self._permission.allowed is True

    def _on_permission(self, allowed: bool) -> None:
        log.info("telemetry permission %s", "granted" if allowed else "withdrawn")
        self._kick()

    # ------------------------------------------------------------------ observing

    def stats(self) -> TelemetryStats:
        o = self._outbox.stats()
        return TelemetryStats(
            connected=bool(self._conn.connected),
            permission=self.permission,
            policy=self.policy,
            queued=self._queued,
            published=self._published,
            republished=self._republished,
            acked=self._acked,
            delivered=o.acked,
            failed=self._failed,
            dropped_no_permission=self._dropped_no_permission,
            rejected_invalid=self._rejected_invalid,
            rejected_full=o.rejected,
            rejected_too_large=self._rejected_too_large,
            refused=self._refused,
            refused_kept=o.refused_kept,
            dropped_overflow=o.dropped_overflow,
            in_flight=len(self._in_flight),
            window=self.window,
            depth=o.depth,
            bytes=o.bytes,
            oldest_age_s=o.oldest_age_s,
            ack_rate=o.ack_rate,
            last_error=self._last_error,
        )

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # ------------------------------------------------------------------ the drainer

    async def _maybe_yield(self) -> None:
        # A tight loop of sends must let the drainer and the acks run; yielding on every
        # send costs an event-loop pass per message, so yield every few sends: the drainer
        # then publishes them as one batch.
        self._since_yield += 1
        if self._since_yield >= SEND_YIELD_EVERY:
            self._since_yield = 0
            await asyncio.sleep(0)

    def _remember(self, seq: int, payload: bytes, dropped: int) -> None:
        if not self._tail_valid:
            return
        if dropped:
            self._forget_tail()  # evicted rows may be in it: read from SQLite
            return
        if len(self._tail) >= self._tail_max:
            # Full: keep it, and read this message and the next ones back from SQLite
            # once the tail is published.
            self._tail_valid = False
            return
        self._tail.append((seq, self.topic, payload))

    def _forget_tail(self) -> None:
        self._tail_valid = False
        self._tail.clear()

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _may_publish(self) -> bool:
        return (
            (not self._closing or self._draining)
            and self._permission.allowed is True
            and bool(self._conn.connected)
        )

    def _rewind(self, reason: str) -> None:
        """Start a new generation from the oldest unacknowledged message."""
        # Publishes of older generations still remove their message when acked, but no
        # longer count against the window nor trigger rewinds.
        self._in_flight.clear()
        self._wake_idle_waiter()
        self._gen += 1
        self._cursor = 0
        self._forget_tail()
        log.debug("telemetry rewind (%s), generation %d", reason, self._gen)
        self._kick()

    def _on_connected(self, session_present: bool) -> None:
        self._hold_until = 0.0
        self._rewind("connected")

    async def _drain_loop(self) -> None:
        assert self._wake is not None
        wake = self._wake
        loop = asyncio.get_running_loop()
        while not (self._closing and not self._draining):
            wake.clear()
            if not self._may_publish():
                await wake.wait()
                continue
            now = loop.time()
            if now < self._hold_until:
                await _wait_event(wake, self._hold_until - now)
                continue
            room = self.window - len(self._in_flight)
            if room <= 0:
                # Woken by the acks only when a worthwhile batch fits (``_refill``).
                self._waiting_room = True
                await wake.wait()
                continue
            want = min(room, self._batch)
            limiter = self._limiter
            if limiter is not None:
                allowed = limiter.ready()
                if allowed <= 0:
                    # 0 with no delay: a shadow request waits for its turn (a millisecond).
                    await asyncio.sleep(max(limiter.delay(), 0.001))
                    continue
                want = min(want, allowed)
            records: list[_Pending]
            tail = self._tail
            if tail:
                if len(tail) <= want:
                    records = tail
                    self._tail = []
                else:
                    records = tail[:want]
                    del tail[:want]
            elif self._tail_valid:
                records = []
            else:
                records = self._read_pending(self._cursor, want)
                # Fewer than asked for: nothing else is stored after them, so from now on
                # this object's own appends are the whole tail.
                self._tail_valid = len(records) < want
            if not records:
                if self._outbox.pending_acks and not self._in_flight:
                    self._outbox.flush_acks()
                if self._outbox.pending_acks:
                    await _wait_event(wake, _IDLE_ACK_FLUSH_S)
                    if not wake.is_set():
                        self._outbox.flush_acks()
                else:
                    await wake.wait()
                continue
            self._publish(records, None if limiter is None else limiter.byte_room())
            await asyncio.sleep(0)

    def _publish(self, records: Iterable[_Pending], byte_room: float | None = None) -> None:
        """Publish ``records`` in order while permitted; ``byte_room``: the bytes the
        connection's throughput pace lets go now (``None``: not paced), after which the rest
        waits (a publish may go while it is not negative)."""
        gen = self._gen
        first_again = last_again = 0
        permission = self._permission
        in_flight = self._in_flight
        publish_cb = self._publish_cb
        publish_nowait = self._conn.publish_nowait
        on_ack = self._on_ack
        on_done = self._on_done
        published_high = self._published_high
        published = republished = 0
        failure: Exception | None = None
        max_payload = self._max_payload
        for seq, topic, payload in records:
            # The contract: check the permission before every telemetry publish.
            if permission.allowed is not True or gen != self._gen:
                self._forget_tail()  # the rest of the batch is re-read from the outbox
                break
            if len(payload) > max_payload:  # stored by an earlier version: never sent
                self._refuse(
                    seq, f"{len(payload):,} bytes, over the platform's limit of {max_payload:,}"
                )
                self._cursor = seq
                continue
            if byte_room is not None:
                if byte_room < 0:  # over the throughput pace: the rest is read again later
                    self._forget_tail()
                    break
                byte_room -= len(topic) + len(payload)
            try:
                if publish_cb is not None:
                    publish_cb(topic, payload, partial(on_ack, seq, gen), 1)
                else:
                    publish_nowait(topic, payload, 1).add_done_callback(partial(on_done, seq, gen))
            except Exception as exc:
                reason = permanent_refusal(exc)
                if reason is not None:
                    self._refuse(seq, reason)
                    self._cursor = seq
                    continue
                failure = exc
                break
            in_flight.add(seq)
            self._cursor = seq
            published += 1
            if seq <= published_high:
                republished += 1
                first_again = first_again or seq
                last_again = seq
            else:
                published_high = seq
        self._published += published
        self._republished += republished
        self._published_high = published_high
        if first_again:
            self._outbox.mark_attempted(first_again, last_again)
        if failure is not None:
            self._forget_tail()
            self._publish_failed(failure, gen)

    def _on_done(self, seq: int, gen: int, fut: asyncio.Future[None]) -> None:
        """A ``publish_nowait`` future completed."""
        exc: BaseException | None = asyncio.CancelledError() if fut.cancelled() else fut.exception()
        self._on_ack(seq, gen, exc)

    def _on_ack(self, seq: int, gen: int, exc: BaseException | None) -> None:
        """The publish of ``seq`` (in generation ``gen``) completed: acked if ``exc`` is
        None."""
        in_flight = self._in_flight
        if gen == self._gen:
            in_flight.discard(seq)
        if exc is None:
            self._acked += 1
            self._failures_in_row = 0
            if not self._outbox.closed:
                self._outbox.ack(seq)
        else:
            reason = permanent_refusal(exc)
            if reason is None:
                self._publish_failed(exc, gen)
                return
            self._refuse(seq, reason)
        if self._waiting_room and self.window - len(in_flight) >= self._refill:
            self._waiting_room = False
            self._kick()
        if self._closing and not in_flight:
            self._kick()
            self._wake_idle_waiter()

    def _refuse(self, seq: int, reason: str) -> None:
        """The platform refused message ``seq`` for good: move it out of the queue."""
        self._last_error = f"message #{seq} refused for good: {reason}"
        if self._outbox.closed or not self._outbox.refuse(seq, reason):
            return  # already acknowledged or moved (e.g. refused in two generations)
        self._refused += 1
        log.warning(
            "telemetry message #%d refused for good (%s); moved to the outbox's refused "
            "table, the next ones go on",
            seq,
            reason,
        )

    def _wake_idle_waiter(self) -> None:
        waiter = self._idle_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _publish_failed(self, exc: BaseException, gen: int) -> None:
        self._failed += 1
        if gen != self._gen:
            return  # an older generation: already rewound
        self._last_error = f"{type(exc).__name__}: {exc}"
        if self._conn.connected:
            # Connected but refused (e.g. an error reason code): back off, then retry.
            delay = min(_RETRY_MAX_S, _RETRY_MIN_S * (2**self._failures_in_row))
            self._failures_in_row += 1
            log.warning("telemetry publish failed (%s); retrying in %.1f s", exc, delay)
            self._hold_until = asyncio.get_running_loop().time() + delay
        else:
            log.info("telemetry publish interrupted (%s); waiting for the connection", exc)
        self._rewind("publish failed")
