"""The durable outbox: the telemetry a sender accepted and has not yet seen acknowledged,
in one SQLite database (WAL) in the certificate store's folder.

A message is a row ``(seq, topic, payload, size, enqueued_at, attempts, message_id)``.
``seq`` comes from an in-memory counter that starts above the highest number the database
ever held: it grows strictly and is never reused, so a late PUBACK can never delete a
newer message. Messages leave only when acknowledged (:meth:`Outbox.ack`, buffered and
deleted in batches), when the platform refused them for good (:meth:`Outbox.refuse`, kept
in the ``refused`` table) or, with ``overflow="drop_oldest"``, to make room.

``durability="process"`` (default) commits to the write-ahead log without an ``fsync``:
an accepted message survives a crash of the process. ``"power"`` flushes every commit:
it also survives a power cut. A damaged outbox is never replaced silently: its readable
messages are queued again in a fresh one and :attr:`Outbox.recovery` says what happened
(:mod:`~iotref.device.telemetry.outbox_integrity`,
:mod:`~iotref.device.telemetry.outbox_salvage`). One process owns an outbox at a time
(:class:`~iotref.device.telemetry.outbox_errors.OutboxLocked`). Methods are synchronous
and thread-safe. docs/architecture.md ("Device telemetry") has the design.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Final

from iotref.device.telemetry.outbox_database import INSERT, SET_HIGH_SEQ
from iotref.device.telemetry.outbox_errors import OutboxClosed, OutboxFull
from iotref.device.telemetry.outbox_integrity import Marker
from iotref.device.telemetry.outbox_opening import open_outbox
from iotref.device.telemetry.outbox_records import (
    AppendResult,
    Durability,
    OutboxEntry,
    OutboxRecord,
    OutboxStats,
    OverflowPolicy,
    PendingMessage,
    RefusedRecord,
)
from iotref.device.telemetry.outbox_salvage import OutboxRecovery
from iotref.device.telemetry.rate_meter import RateMeter

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGES: Final = 100_000
DEFAULT_MAX_BYTES: Final = 256 * 1024 * 1024
DEFAULT_ACK_BATCH: Final = 256
DEFAULT_MAX_REFUSED: Final = 10_000
OUTBOX_FILE_NAME: Final = "outbox.sqlite3"

_READ_RECORDS: Final = (
    "SELECT seq, topic, payload, enqueued_at, attempts, message_id FROM outbox"
    " WHERE seq > ? ORDER BY seq LIMIT ?"
)
_READ_PENDING: Final = "SELECT seq, topic, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?"
_DELETE_RANGE: Final = "DELETE FROM outbox WHERE seq BETWEEN ? AND ? RETURNING size"


def _runs(seqs: Sequence[int]) -> list[tuple[int, int]]:
    """The runs of consecutive numbers in the sorted ``seqs``, as ``(first, last)``."""
    runs: list[tuple[int, int]] = []
    first = last = seqs[0]
    for seq in seqs[1:]:
        if seq != last + 1:
            runs.append((first, last))
            first = seq
        last = seq
    runs.append((first, last))
    return runs


class Outbox:
    """A bounded, durable FIFO of messages, removed only when acknowledged.

    ``path`` is the database file (e.g. ``store_dir / OUTBOX_FILE_NAME``); its folder must
    exist. See the module docstring for ``durability``, ``overflow`` and what happens to
    a damaged outbox (:attr:`recovery`).
    """

    recovery: OutboxRecovery | None = None
    """Set when the outbox was found damaged at open and rebuilt (see the module
    docstring); None otherwise."""

    def __init__(
        self,
        path: Path | str,
        *,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        overflow: OverflowPolicy = "reject_new",
        durability: Durability = "process",
        ack_batch: int = DEFAULT_ACK_BATCH,
        max_refused: int = DEFAULT_MAX_REFUSED,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_messages < 1 or max_bytes < 1 or max_refused < 1:
            raise ValueError("max_messages, max_bytes and max_refused must be positive")
        if overflow not in ("reject_new", "drop_oldest"):
            raise ValueError(f"unknown overflow policy {overflow!r}")
        if durability not in ("process", "power"):
            raise ValueError(f"unknown durability {durability!r}")
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.overflow: OverflowPolicy = overflow
        self.durability: Durability = durability
        self.max_refused = max_refused
        self._ack_batch = max(1, ack_batch)
        self._clock = clock
        self._lock = threading.Lock()
        self._pending_acks: set[int] = set()
        self._accepted = 0
        self._acked = 0
        self._dropped = 0
        self._rejected = 0
        self._refused_moved = 0
        self._rate = RateMeter(clock)
        opened = open_outbox(self.path, durability, clock())
        self._db: sqlite3.Connection | None = opened.db
        self._marker: Marker | None = opened.marker
        self.recovery = opened.recovery
        self._last_seq = opened.high_seq
        try:
            db = opened.db
            row = db.execute("SELECT count(*), coalesce(sum(size), 0) FROM outbox").fetchone()
            self._count = int(row[0])
            self._bytes = int(row[1])
            self._refused_kept = int(db.execute("SELECT count(*) FROM refused").fetchone()[0])
            self._mark()
        except BaseException:
            opened.db.close()
            opened.marker.close()
            self._db = None
            self._marker = None
            raise

    # ------------------------------------------------------------------ setup

    def _mark(self, *, clean: bool = False) -> None:
        """Record the highest ``seq`` and the depth in the marker after a commit, so that a
        truncated database or WAL is told from an empty outbox."""
        marker = self._marker
        if marker is not None:
            marker.write(self._last_seq, self._count, clean=clean)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise OutboxClosed(f"{self.path} is closed")
        return self._db

    def close(self) -> None:
        """Write buffered acks and close the database (idempotent)."""
        with self._lock:
            if self._db is None:
                return
            self._flush_acks_locked()
            self._db.close()
            self._db = None
            self._mark(clean=True)
            if self._marker is not None:
                self._marker.close()
                self._marker = None

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._db is None

    # ------------------------------------------------------------------ writing

    def append(self, topic: str, payload: bytes, message_id: str | None = None) -> AppendResult:
        """Store one message; committed (see ``durability``) when this returns.

        Raises :class:`OutboxFull` when it does not fit and the policy is ``reject_new``.
        """
        size = len(payload) + len(topic.encode())
        with self._lock:
            db = self._db
            if db is None:
                raise OutboxClosed(f"{self.path} is closed")
            if not (self._count < self.max_messages and self._bytes + size <= self.max_bytes):
                # Over a bound as things stand (the check is _make_room_locked's first).
                dropped = self._make_room_locked(db, 1, size)
                entry = OutboxEntry(topic, payload, message_id)
                return AppendResult(self._insert_locked(db, (entry,), [size], dropped), dropped)
            seq = self._last_seq + 1
            db.execute(INSERT, (seq, topic, payload, size, self._clock(), message_id))
            self._last_seq = seq
            self._count += 1
            self._bytes += size
            self._accepted += 1
            self._mark()
            return AppendResult(seq)

    def append_many(self, entries: Sequence[OutboxEntry]) -> list[AppendResult]:
        """Store several messages in one transaction (one flush in ``"power"`` mode): all
        of them or, on :class:`OutboxFull` (``reject_new``), none. Oldest messages dropped
        to make room (``drop_oldest``) are counted in the first result."""
        if not entries:
            return []
        sizes = [len(e.payload) + len(e.topic.encode()) for e in entries]
        with self._lock:
            db = self._conn()
            dropped = self._make_room_locked(db, len(entries), sum(sizes))
            first = self._insert_locked(db, entries, sizes, dropped)
            return [AppendResult(first, dropped)] + [
                AppendResult(first + i) for i in range(1, len(entries))
            ]

    def append_each(self, entries: Sequence[OutboxEntry]) -> list[AppendResult | OutboxFull]:
        """The outcome of appending each entry in turn with :meth:`append` (a result or the
        :class:`OutboxFull` it raised), committed in one transaction when all of them fit
        without dropping anything (then the outcomes are the same), else one by one.
        Other errors (closed, SQLite) are raised."""
        sizes = [len(e.payload) + len(e.topic.encode()) for e in entries]
        with self._lock:
            db = self._conn()
            if entries and self._fits(len(entries), sum(sizes)):
                first = self._insert_locked(db, entries, sizes, 0)
                return [AppendResult(first + i) for i in range(len(entries))]
        outcomes: list[AppendResult | OutboxFull] = []
        for e in entries:
            try:
                outcomes.append(self.append(e.topic, e.payload, e.message_id))
            except OutboxFull as exc:
                outcomes.append(exc)
        return outcomes

    def _insert_locked(
        self, db: sqlite3.Connection, entries: Sequence[OutboxEntry], sizes: list[int], drop: int
    ) -> int:
        """Drop the ``drop`` oldest rows and insert ``entries`` in one transaction;
        returns the first new ``seq``."""
        now = self._clock()
        first = self._last_seq + 1
        db.execute("BEGIN IMMEDIATE")
        try:
            if drop:
                self._drop_oldest_locked(db, drop)
            db.executemany(
                INSERT,
                [
                    (first + i, e.topic, e.payload, size, now, e.message_id)
                    for i, (e, size) in enumerate(zip(entries, sizes, strict=True))
                ],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._last_seq = first + len(entries) - 1
        self._count += len(entries)
        self._bytes += sum(sizes)
        self._accepted += len(entries)
        self._mark()
        return first

    def _make_room_locked(self, db: sqlite3.Connection, n: int, size: int) -> int:
        """How many oldest rows to drop so ``n`` messages of ``size`` bytes fit (0 if they
        fit); raises :class:`OutboxFull` when they cannot or must not."""
        if self._fits(n, size):
            return 0
        if self._pending_acks:  # acked rows still count until deleted: delete them first
            self._flush_acks_locked()
            if self._fits(n, size):
                return 0
        if n > self.max_messages or size > self.max_bytes:
            self._rejected += n
            raise OutboxFull(
                f"{n} message(s) of {size} bytes can never fit an outbox of "
                f"{self.max_messages} messages / {self.max_bytes} bytes",
                depth=self._count,
                size=self._bytes,
            )
        if self.overflow == "reject_new":
            self._rejected += n
            raise OutboxFull(
                f"outbox full ({self._count} messages, {self._bytes} bytes; limits "
                f"{self.max_messages} / {self.max_bytes})",
                depth=self._count,
                size=self._bytes,
            )
        # drop_oldest: walk the oldest rows until enough count and bytes are freed.
        need_count = self._count + n - self.max_messages
        need_bytes = self._bytes + size - self.max_bytes
        drop = 0
        freed = 0
        for (row_size,) in db.execute("SELECT size FROM outbox ORDER BY seq"):
            if drop >= need_count and freed >= need_bytes:
                break
            drop += 1
            freed += int(row_size)
        return drop

    def _fits(self, n: int, size: int) -> bool:
        return self._count + n <= self.max_messages and self._bytes + size <= self.max_bytes

    def _drop_oldest_locked(self, db: sqlite3.Connection, n: int) -> None:
        rows = db.execute(
            "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?)"
            " RETURNING seq, size",
            (n,),
        ).fetchall()
        for seq, size in rows:
            self._pending_acks.discard(int(seq))
            self._count -= 1
            self._bytes -= int(size)
        if rows:
            db.execute(SET_HIGH_SEQ, (max(int(seq) for seq, _ in rows),))
        self._dropped += len(rows)

    # ------------------------------------------------------------------ reading

    def read_batch(self, after_seq: int = 0, limit: int = 500) -> list[OutboxRecord]:
        """Up to ``limit`` unacknowledged messages with ``seq > after_seq``, in ``seq``
        order. Acked rows not yet deleted are skipped."""
        with self._lock:
            db = self._conn()
            pending = self._pending_acks
            skip = self._pending_after_locked(after_seq)
            rows = db.execute(_READ_RECORDS, (after_seq, limit + skip)).fetchall()
            if skip:
                rows = [row for row in rows if row[0] not in pending][:limit]
            return [OutboxRecord(*row) for row in rows]

    def read_pending(self, after_seq: int = 0, limit: int = 500) -> list[PendingMessage]:
        """What :meth:`read_batch` returns, as bare ``(seq, topic, payload)`` tuples: the
        publisher's read-back, without a record object per message."""
        with self._lock:
            db = self._conn()
            pending = self._pending_acks
            skip = self._pending_after_locked(after_seq)
            rows: list[PendingMessage] = db.execute(
                _READ_PENDING, (after_seq, limit + skip)
            ).fetchall()
            if skip:
                rows = [row for row in rows if row[0] not in pending][:limit]
            return rows

    def _pending_after_locked(self, after_seq: int) -> int:
        """How many acked rows not yet deleted lie after ``after_seq`` (a read skips them,
        so it asks for that many more). Usually none: acks come for published rows, and
        the publisher reads after the last one it published."""
        pending = self._pending_acks
        if not pending:
            return 0
        return sum(1 for seq in pending if seq > after_seq)

    def mark_attempted(self, first_seq: int, last_seq: int) -> None:
        """Count one publish attempt for the rows ``first_seq..last_seq`` (one statement
        for a whole batch)."""
        with self._lock:
            self._conn().execute(
                "UPDATE outbox SET attempts = attempts + 1 WHERE seq BETWEEN ? AND ?",
                (first_seq, last_seq),
            )

    def __len__(self) -> int:
        return self.depth

    # ------------------------------------------------------------------ acknowledging

    def ack(self, seq: int) -> None:
        """The message ``seq`` was acknowledged (PUBACK): remove it (batched)."""
        with self._lock:
            self._pending_acks.add(seq)
            if len(self._pending_acks) >= self._ack_batch:
                self._flush_acks_locked()

    def ack_many(self, seqs: Iterable[int]) -> None:
        """Several acks at once (any order)."""
        with self._lock:
            self._pending_acks.update(seqs)
            if len(self._pending_acks) >= self._ack_batch:
                self._flush_acks_locked()

    def flush_acks(self) -> int:
        """Delete every buffered ack now; returns how many rows were removed."""
        with self._lock:
            if self._db is None:
                return 0
            return self._flush_acks_locked()

    @property
    def pending_acks(self) -> int:
        """Acks buffered but not yet written."""
        return len(self._pending_acks)

    def _flush_acks_locked(self) -> int:
        if not self._pending_acks:
            return 0
        db = self._conn()
        removed = 0
        removed_bytes = 0
        db.execute("BEGIN IMMEDIATE")
        try:
            # One statement per run of consecutive seqs (acks mostly come in order, so
            # usually one or a few): each range holds acked rows only.
            runs = _runs(sorted(self._pending_acks))
            for first, last in runs:
                for (size,) in db.execute(_DELETE_RANGE, (first, last)):
                    removed += 1
                    removed_bytes += size
            db.execute(SET_HIGH_SEQ, (runs[-1][1],))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._pending_acks.clear()
        self._count -= removed
        self._bytes -= removed_bytes
        self._acked += removed
        self._rate.add(removed)
        self._mark()
        return removed

    # ------------------------------------------------------------------ refusing

    def refuse(self, seq: int, reason: str) -> bool:
        """Move the message ``seq`` out of the queue into the ``refused`` table, with
        ``reason`` and the time: the platform refused it for good. Returns False when it
        is no longer queued (already acknowledged, refused or dropped). Beyond
        ``max_refused`` kept rows, the oldest are deleted (logged)."""
        with self._lock:
            db = self._conn()
            if seq in self._pending_acks:
                return False
            db.execute("BEGIN IMMEDIATE")
            try:
                moved = db.execute(
                    "INSERT INTO refused (seq, topic, payload, size, enqueued_at, attempts,"
                    " message_id, refused_at, reason) SELECT seq, topic, payload, size,"
                    " enqueued_at, attempts + 1, message_id, ?, ? FROM outbox WHERE seq = ?",
                    (self._clock(), reason, seq),
                ).rowcount
                size = 0
                if moved:
                    (size,) = db.execute(
                        "DELETE FROM outbox WHERE seq = ? RETURNING size", (seq,)
                    ).fetchone()
                    db.execute(SET_HIGH_SEQ, (seq,))
                over = self._refused_kept + moved - self.max_refused
                if over > 0:
                    db.execute(
                        "DELETE FROM refused WHERE seq IN"
                        " (SELECT seq FROM refused ORDER BY seq LIMIT ?)",
                        (over,),
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            if not moved:
                return False
            self._count -= 1
            self._bytes -= int(size)
            self._refused_moved += 1
            self._refused_kept += 1
            if over > 0:
                self._refused_kept -= over
                log.warning(
                    "%s: more than %d refused messages kept; the oldest %d deleted",
                    self.path,
                    self.max_refused,
                    over,
                )
            self._mark()
            return True

    def refused_records(self, limit: int = 100, after_seq: int = 0) -> list[RefusedRecord]:
        """Up to ``limit`` kept refused messages with ``seq > after_seq``, oldest first."""
        with self._lock:
            rows = (
                self._conn()
                .execute(
                    "SELECT seq, topic, payload, enqueued_at, attempts, message_id, refused_at,"
                    " reason FROM refused WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after_seq, limit),
                )
                .fetchall()
            )
            return [RefusedRecord(*row) for row in rows]

    # ------------------------------------------------------------------ observing

    def stats(self) -> OutboxStats:
        """Depth, bytes, age of the oldest message, counters and the ack rate (writes
        buffered acks first, so the numbers are exact)."""
        with self._lock:
            db = self._conn()
            self._flush_acks_locked()
            oldest = db.execute(
                "SELECT seq, enqueued_at FROM outbox ORDER BY seq LIMIT 1"
            ).fetchone()
            return OutboxStats(
                depth=self._count,
                bytes=self._bytes,
                oldest_age_s=max(0.0, self._clock() - oldest[1]) if oldest else None,
                oldest_seq=int(oldest[0]) if oldest else None,
                max_messages=self.max_messages,
                max_bytes=self.max_bytes,
                overflow=self.overflow,
                durability=self.durability,
                accepted=self._accepted,
                acked=self._acked,
                dropped_overflow=self._dropped,
                rejected=self._rejected,
                ack_rate=self._rate.rate(),
                refused=self._refused_moved,
                refused_kept=self._refused_kept,
            )

    @property
    def depth(self) -> int:
        """Messages stored and not acknowledged (writes buffered acks first)."""
        with self._lock:
            if self._db is not None:
                self._flush_acks_locked()
            return self._count

    @property
    def last_seq(self) -> int:
        """The highest ``seq`` handed out (0 if none)."""
        return self._last_seq
