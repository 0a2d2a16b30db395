"""The telemetry publisher (:class:`Telemetry`): validates, serializes and stores each
message in the outbox, then publishes the outbox in order with QoS 1 and removes a message
only when acknowledged, while the permission to send allows it.

Its collaborators (connection, message store, permission source, validator) are the
Protocols of :mod:`iotref.device.telemetry.seams`. docs/architecture.md ("Device
telemetry") describes the drain: the in-flight window, generations and rewinds, refusals
for good, group commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any, Final

from iotref.device.telemetry.group_commit import GroupCommit
from iotref.device.telemetry.messages import to_json
from iotref.device.telemetry.outbox_records import OutboxEntry, PendingMessage
from iotref.device.telemetry.permission import PermissionFlag, PermissionPolicy
from iotref.device.telemetry.publish_refusals import permanent_refusal
from iotref.device.telemetry.results import (
    MessageTooLarge,
    SendResult,
    SendStatus,
    TelemetryClosed,
    TelemetryStats,
)
from iotref.device.telemetry.seams import (
    MessageStore,
    MessageValidatorLike,
    PermissionSource,
    PublishPace,
    TelemetryConnection,
)
from iotref.device.telemetry.wakeup import Wakeup
from iotref.protocol.limits import MAX_PAYLOAD_BYTES

log = logging.getLogger(__name__)

DEFAULT_WINDOW: Final = 1000
DEFAULT_BATCH: Final = 256
DEFAULT_CLOSE_TIMEOUT_S: Final = 10.0
SEND_YIELD_EVERY: Final = 32
"""``send()`` lets other tasks run (the drainer, the acks) every this many calls."""
_IDLE_ACK_FLUSH_S: Final = 0.2
_RETRY_MIN_S: Final = 0.5
_RETRY_MAX_S: Final = 30.0


def _always() -> bool:
    return True


def _default_validator() -> MessageValidatorLike:
    from iotref.protocol.message_schemas import default_validator

    return default_validator()


class Telemetry:
    """Validates, stores and publishes telemetry for one sender::

        telemetry = Telemetry(connection, outbox, topic, permission=flag)
        result = await telemetry.send(message)   # validated, serialized, stored

    ``topic`` is ``telemetry_topic(prefix, org_id, client_id)``. ``validator`` defaults to
    the packaged schemas' validator. ``permission`` defaults to a :class:`PermissionFlag`
    that starts allowed (use :meth:`set_permission`); it is checked before every publish,
    and ``policy`` (:data:`~iotref.device.telemetry.permission.PermissionPolicy`) says
    what a send does while it is withdrawn. ``window`` is the most messages in flight;
    ``batch`` the most read from the outbox at once.

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
        "_close_timeout",
        "_closing",
        "_conn",
        "_cursor",
        "_draining",
        "_dropped_no_permission",
        "_failed",
        "_failures_in_row",
        "_gen",
        "_group_commit",
        "_hold_until",
        "_idle_waiter",
        "_in_flight",
        "_last_error",
        "_limiter",
        "_max_payload",
        "_outbox",
        "_permission",
        "_published",
        "_published_high",
        "_queued",
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
        connection: TelemetryConnection,
        outbox: MessageStore,
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

        self._wake: Wakeup | None = None
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
        self._tail: list[PendingMessage] = []
        self._tail_valid = False
        self._tail_max = max(window, batch) * 2
        self._published_high = 0
        # The seqs published in the current generation and not yet acknowledged.
        self._in_flight: set[int] = set()
        self._idle_waiter: asyncio.Future[None] | None = None
        # The connection's pace (see iotref.device.connection.rate_limit): the drainer
        # publishes only what it lets go now, and waits for the rest.
        self._limiter: PublishPace | None = connection.rate_limiter
        self._hold_until = 0.0
        self._failures_in_row = 0
        self._waiting_room = False
        self._since_yield = 0
        # Grouping pays where a commit is dear: durability="power" flushes every commit to
        # the disk (the loop waits for it); with "process" a commit costs little more than
        # the rows it writes, less than suspending each send until the group commit.
        self._group_commit = (
            GroupCommit(outbox, topic, self._stored) if outbox.durability == "power" else None
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
        self._wake = Wakeup()
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
        self._conn.remove_connected_callback(self._on_connected)
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
        :class:`~iotref.device.telemetry.outbox.OutboxFull` (``reject_new``; nothing queued, the
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
        group_commit = self._group_commit
        if group_commit is not None and group_commit.wanted():
            appended = await group_commit.append(payload, mid)
            return SendResult(SendStatus.QUEUED, appended.seq, appended.dropped)
        appended = self._outbox.append(self.topic, payload, mid)
        self._stored(appended.seq, payload, appended.dropped)
        self._since_yield += 1
        if self._since_yield >= SEND_YIELD_EVERY:  # see _maybe_yield
            self._since_yield = 0
            await asyncio.sleep(0)
        return SendResult(SendStatus.QUEUED, appended.seq, appended.dropped)

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
            self._stored(result.seq, entry.payload, result.dropped)
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

    def _stored(self, seq: int, payload: bytes, dropped: int) -> None:
        """A message of this object's is in the store: count it, and hand it to the
        drainer from memory when it comes next."""
        self._remember(seq, payload, dropped)
        self._queued += 1
        self._kick()

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
                await wake.wait_at_most(self._hold_until - now)
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
            records: list[PendingMessage]
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
                records = self._outbox.read_pending(self._cursor, want)
                # Fewer than asked for: nothing else is stored after them, so from now on
                # this object's own appends are the whole tail.
                self._tail_valid = len(records) < want
            if not records:
                if self._outbox.pending_acks and not self._in_flight:
                    self._outbox.flush_acks()
                if self._outbox.pending_acks:
                    await wake.wait_at_most(_IDLE_ACK_FLUSH_S)
                    if not wake.is_set():
                        self._outbox.flush_acks()
                else:
                    await wake.wait()
                continue
            self._publish(records, None if limiter is None else limiter.byte_room())
            await asyncio.sleep(0)

    def _publish(self, records: Iterable[PendingMessage], byte_room: float | None = None) -> None:
        """Publish ``records`` in order while permitted; ``byte_room``: the bytes the
        connection's throughput pace lets go now (``None``: not paced), after which the rest
        waits (a publish may go while it is not negative)."""
        gen = self._gen
        first_again = last_again = 0
        permission = self._permission
        in_flight = self._in_flight
        publish = self._conn.publish_callback
        on_ack = self._on_ack
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
                publish(topic, payload, partial(on_ack, seq, gen), 1)
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
