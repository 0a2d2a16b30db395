"""The durable outbox: telemetry a sender accepted and has not yet seen acknowledged.

Messages live in one SQLite database in WAL mode, a file in the certificate store's folder
(the caller passes the path). A message is a row ``(seq, topic, payload, size, enqueued_at,
attempts, message_id)``. ``seq``, the ``INTEGER PRIMARY KEY``, comes from an in-memory
counter that starts above the highest stored row when the outbox is opened: within one
process it grows strictly and is never reused, even after the table ran empty, so a late
PUBACK for an old ``seq`` can never delete a newer message (cheaper than ``AUTOINCREMENT``;
no PUBACK of an earlier process can arrive after a restart).

Durability (``durability=``):

``"process"`` (default)
    ``synchronous=NORMAL``. :meth:`Outbox.append` returns after its transaction committed
    to the write-ahead log, i.e. after a ``write()`` into the operating system's page
    cache, without an ``fsync``. An accepted message survives a crash or SIGKILL of the
    process; a power cut or kernel crash may lose the last transactions (the database
    itself stays consistent). Cost: tens of microseconds per append.
``"power"``
    ``synchronous=FULL``. Every commit is ``fsync``-ed before :meth:`Outbox.append`
    returns, so an accepted message also survives a power cut, provided the storage honours
    flushes. Cost: one flush per append, from well under a millisecond (a good SSD) to
    tens of milliseconds (SD cards, busy disks). Batch with :meth:`Outbox.append_many` to
    pay one flush for many messages.

Bounds: at most ``max_messages`` rows and ``max_bytes`` bytes (payload plus topic, UTF-8).
When a new message does not fit, ``overflow=`` says what happens:

``"reject_new"`` (default)
    :meth:`Outbox.append` raises :class:`OutboxFull`; nothing is written and the caller
    still holds the message. Nothing accepted is ever thrown away.
``"drop_oldest"``
    The oldest messages are deleted, in the same transaction as the insert, until the new
    one fits. They are counted in :attr:`OutboxStats.dropped_overflow` and returned by
    :meth:`Outbox.append` so the caller can report them.

A message larger than ``max_bytes`` on its own is always refused with :class:`OutboxFull`.

Removal happens only on acknowledgement (:meth:`Outbox.ack`), by ``seq``, in any order.
Acks are buffered and deleted in batches (one transaction per ``ack_batch`` acks, or on
:meth:`Outbox.flush_acks`); a crash before the batch is written only means those messages
are published once more after restart (at least once; the platform drops duplicates by
``sendereventuuid``). Until their deletion, acked rows are excluded from reads and from
:meth:`Outbox.stats`.

Messages the platform refuses for good (see :mod:`iotref.device.telemetry.publish_refusals`) are
moved by :meth:`Outbox.refuse` into a second table, ``refused``, kept for inspection
(:meth:`Outbox.refused_records`): at most ``max_refused`` rows, the oldest removed beyond.

Integrity: before opening, the files are checked and a damaged outbox is never replaced
silently (:mod:`iotref.device.telemetry.outbox_integrity`): the damaged files are renamed aside,
every readable message is queued again in a fresh outbox with its own sequence number and
message id, and :attr:`Outbox.recovery` says what happened (logged as a warning too). A
sidecar marker ``<outbox>-mark`` records the highest sequence number and the depth after
every commit (one small write, no flush), so that a truncated database or WAL is told
from an empty outbox; the highest sequence number ever deleted is kept in the table
``outbox_meta`` (written with the deletions), so numbering never goes back across runs.
The files are created with mode 0600.

The database is opened in exclusive locking mode: one process owns an outbox at a time
(a second one gets :class:`OutboxLocked`; the marker is locked too, with ``flock``, for
the time of the checks), which also spares WAL's shared-memory index.
Methods are synchronous and thread-safe (one internal lock); in ``"process"`` mode they are
cheap enough to call from an asyncio event loop.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from iotref.device.telemetry.outbox_integrity import (
    SHM_SUFFIX,
    WAL_SUFFIX,
    Inspection,
    Marker,
    inspect_outbox,
    marker_path,
)
from iotref.device.telemetry.outbox_salvage import (
    OutboxRecovery,
    report_path,
    salvage_rows,
    set_aside,
    write_report,
)

log = logging.getLogger(__name__)

Durability = Literal["process", "power"]
OverflowPolicy = Literal["reject_new", "drop_oldest"]

DEFAULT_MAX_MESSAGES: Final = 100_000
DEFAULT_MAX_BYTES: Final = 256 * 1024 * 1024
DEFAULT_ACK_BATCH: Final = 256
DEFAULT_MAX_REFUSED: Final = 10_000
RECOVERY_LOG_ATTRIBUTE: Final = "iotref_outbox_recovery"
"""Set on the log record of a recovery (see :attr:`Outbox.recovery`), for a program that
says it in its own words to leave that record out."""
OUTBOX_FILE_NAME: Final = "outbox.sqlite3"
_SCHEMA_VERSION: Final = 1
_RATE_WINDOW_S: Final = 10.0
_PAGE_SIZE: Final = 8192

_INSERT: Final = (
    "INSERT INTO outbox (seq, topic, payload, size, enqueued_at, message_id)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
_READ_RECORDS: Final = (
    "SELECT seq, topic, payload, enqueued_at, attempts, message_id FROM outbox"
    " WHERE seq > ? ORDER BY seq LIMIT ?"
)
_READ_PENDING: Final = "SELECT seq, topic, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?"
_DELETE_RANGE: Final = "DELETE FROM outbox WHERE seq BETWEEN ? AND ? RETURNING size"
_SET_HIGH: Final = (
    "INSERT INTO outbox_meta (id, high_seq) VALUES (1, ?)"
    " ON CONFLICT(id) DO UPDATE SET high_seq = max(high_seq, excluded.high_seq)"
)
_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    size INTEGER NOT NULL,
    enqueued_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    message_id TEXT
)""",
    """CREATE TABLE IF NOT EXISTS refused (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    size INTEGER NOT NULL,
    enqueued_at REAL NOT NULL,
    attempts INTEGER NOT NULL,
    message_id TEXT,
    refused_at REAL NOT NULL,
    reason TEXT NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS outbox_meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    high_seq INTEGER NOT NULL
)""",
)
"""The tables, in the order a new outbox creates them (their root pages follow it)."""


class OutboxError(RuntimeError):
    """Base class of the outbox's errors."""


class OutboxFull(OutboxError):
    """The message does not fit and the policy is ``reject_new`` (or it is larger than the
    whole outbox). Nothing was written; the caller still owns the message."""

    def __init__(self, reason: str, *, depth: int, size: int) -> None:
        super().__init__(reason)
        self.depth = depth
        self.size = size


class OutboxLocked(OutboxError):
    """Another process (or another :class:`Outbox` object) holds this outbox."""


class OutboxClosed(OutboxError):
    """The outbox was closed."""


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """One stored message, as read back for publishing."""

    seq: int
    topic: str
    payload: bytes
    enqueued_at: float
    attempts: int
    message_id: str | None


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """A message to append: topic, payload and an optional id for tracing (the
    ``sendereventuuid``)."""

    topic: str
    payload: bytes
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What :meth:`Outbox.append` did: the new ``seq`` and how many of the oldest
    messages were dropped to make room (``drop_oldest`` only)."""

    seq: int
    dropped: int = 0


@dataclass(frozen=True, slots=True)
class RefusedRecord:
    """A message the platform refused for good, kept in the ``refused`` table."""

    seq: int
    topic: str
    payload: bytes
    enqueued_at: float
    attempts: int
    message_id: str | None
    refused_at: float
    reason: str


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """A snapshot. Counters (``accepted`` .. ``rejected``) count since this object was
    opened; ``depth``/``bytes``/``oldest_age_s`` describe what is stored now."""

    depth: int
    bytes: int
    oldest_age_s: float | None
    oldest_seq: int | None
    max_messages: int
    max_bytes: int
    overflow: OverflowPolicy
    durability: Durability
    accepted: int
    acked: int
    dropped_overflow: int
    rejected: int
    ack_rate: float
    """Acknowledged (removed) messages per second over the last ten seconds."""
    refused: int = 0
    """Messages moved to the ``refused`` table since this object was opened."""
    refused_kept: int = 0
    """Messages in the ``refused`` table now (earlier runs included)."""


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


class _RateMeter:
    """Events per second over a sliding window, in one-second buckets."""

    __slots__ = ("_buckets", "_clock", "_window")

    def __init__(self, clock: Callable[[], float], window: float = _RATE_WINDOW_S) -> None:
        self._clock = clock
        self._window = window
        self._buckets: deque[list[float]] = deque()

    def add(self, n: int) -> None:
        if n <= 0:
            return
        second = float(int(self._clock()))
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += n
        else:
            self._buckets.append([second, float(n)])
        self._trim(second)

    def _trim(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] <= now - self._window:
            self._buckets.popleft()

    def rate(self) -> float:
        now = self._clock()
        self._trim(float(int(now)))
        if not self._buckets:
            return 0.0
        span = min(self._window, max(1.0, now - self._buckets[0][0]))
        return sum(b[1] for b in self._buckets) / span


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
        self._rate = _RateMeter(clock)
        self._db: sqlite3.Connection | None = None
        self._marker: Marker | None = self._lock_marker()
        try:
            inspection = self._inspect()
            if inspection.damage is not None:
                self._db = self._salvage(inspection)
            else:
                self._db = self._open()
            db = self._db
            row = db.execute("SELECT count(*), coalesce(sum(size), 0) FROM outbox").fetchone()
            self._count: int = int(row[0])
            self._bytes: int = int(row[1])
            self._refused_kept: int = int(db.execute("SELECT count(*) FROM refused").fetchone()[0])
            self._last_seq: int = max(inspection.high_seq, self._stored_high(db))
            self._mark()
        except BaseException:
            if self._db is not None:
                self._db.close()
                self._db = None
            if self._marker is not None:
                self._marker.close()
                self._marker = None
            raise

    # ------------------------------------------------------------------ setup

    def _lock_marker(self) -> Marker:
        """Open and lock the marker: the sign that this object owns the outbox."""
        marker = Marker(marker_path(self.path))
        if not marker.try_lock():
            marker.close()
            raise OutboxLocked(f"{self.path} is in use by another sender")
        return marker

    def _inspect(self) -> Inspection:
        try:
            return inspect_outbox(self.path)
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise OutboxLocked(f"{self.path} is in use by another sender") from exc
            raise

    @staticmethod
    def _stored_high(db: sqlite3.Connection) -> int:
        """The highest sequence number the database knows of (queued, refused or
        deleted)."""
        row = db.execute(
            "SELECT max(coalesce((SELECT max(seq) FROM outbox), 0),"
            " coalesce((SELECT max(seq) FROM refused), 0),"
            " coalesce((SELECT max(high_seq) FROM outbox_meta), 0))"
        ).fetchone()
        return int(row[0])

    def _mark(self, *, clean: bool = False) -> None:
        """Record the state after a commit in the marker (see the module docstring)."""
        marker = self._marker
        if marker is not None:
            marker.write(self._last_seq, self._count, clean=clean)

    def _salvage(self, inspection: Inspection) -> sqlite3.Connection:
        """Set the damaged files aside, open a fresh outbox and queue in it every message
        that can be read from them; sets :attr:`recovery`."""
        damage = inspection.damage
        assert damage is not None
        now = self._clock()
        old_marker = self._marker
        try:
            base, moved = set_aside(self.path, now)
        except OSError as exc:
            raise OutboxError(
                f"{self.path} is damaged ({damage.detail}) and cannot be set aside: "
                f"{exc.strerror or exc}"
            ) from exc
        try:
            self._marker = self._lock_marker()
        finally:
            if old_marker is not None:
                old_marker.close()  # the damaged copy's marker, renamed with it
        salvage = salvage_rows(base, _SCHEMA)
        db = self._open()
        try:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT OR IGNORE INTO outbox"
                " (seq, topic, payload, size, enqueued_at, attempts, message_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (seq, topic, payload, len(payload) + len(topic.encode()), at, n, mid)
                    for seq, topic, payload, at, n, mid in salvage.rows
                ],
            )
            db.executemany(
                "INSERT OR IGNORE INTO refused (seq, topic, payload, size, enqueued_at,"
                " attempts, message_id, refused_at, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (seq, topic, payload, len(payload) + len(topic.encode()), at, n, mid, rt, why)
                    for seq, topic, payload, at, n, mid, rt, why in salvage.refused
                ],
            )
            db.execute(_SET_HIGH, (inspection.high_seq,))
            db.execute("COMMIT")
        except BaseException:
            db.close()
            raise
        marker = inspection.marker
        recovery = OutboxRecovery(
            kind=damage.kind,
            detail=damage.detail,
            expected=marker.depth if marker is not None else None,
            recovered=len(salvage.rows),
            recovered_refused=len(salvage.refused),
            kept_as=moved,
            at=now,
            notes=(*inspection.notes, *salvage.notes),
        )
        try:
            write_report(recovery, report_path(base))
        except OSError as exc:
            log.warning("cannot write the recovery report next to %s: %s", base, exc)
        log.warning("%s", recovery.summary(), extra={RECOVERY_LOG_ATTRIBUTE: True})
        self.recovery = recovery
        return db

    def _prepare_files(self) -> None:
        """Create the database file with mode 0600 (SQLite gives its WAL the same mode)
        and narrow the mode of existing files."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        for suffix in ("", WAL_SUFFIX, SHM_SUFFIX):
            target = self.path.with_name(self.path.name + suffix)
            try:
                mode = target.stat().st_mode & 0o777
                if mode & 0o077:
                    target.chmod(mode & 0o700)
            except FileNotFoundError:
                continue

    def _open(self) -> sqlite3.Connection:
        self._prepare_files()
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=0.2)
        try:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            # A new database only (an existing one keeps its size): 8 KiB pages waste less
            # room around rows of about 1 KB than 4 KiB ones, so appends and deletes write
            # fewer pages (about a quarter less SQLite time per message in batches).
            db.execute(f"PRAGMA page_size={_PAGE_SIZE}")
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise OutboxError(f"{self.path}: cannot switch to WAL mode (got {mode})")
            sync = "FULL" if self.durability == "power" else "NORMAL"
            db.execute(f"PRAGMA synchronous={sync}")
            db.execute("PRAGMA temp_store=MEMORY")
            db.execute("BEGIN IMMEDIATE")  # takes the exclusive lock now, not at first use
            for statement in _SCHEMA:
                db.execute(statement)
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            elif version != _SCHEMA_VERSION:
                raise OutboxError(f"{self.path}: outbox schema version {version} is unknown")
            db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            db.close()
            if "locked" in str(exc) or "busy" in str(exc):
                raise OutboxLocked(f"{self.path} is in use by another sender") from exc
            raise
        except BaseException:
            db.close()
            raise
        return db

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
            if self._count < self.max_messages and self._bytes + size <= self.max_bytes:
                dropped = 0  # the common case of _make_room_locked, inlined
            else:
                dropped = self._make_room_locked(db, 1, size)
            seq = self._last_seq + 1
            if dropped:
                db.execute("BEGIN IMMEDIATE")
                try:
                    self._drop_oldest_locked(db, dropped)
                    db.execute(_INSERT, (seq, topic, payload, size, self._clock(), message_id))
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            else:
                db.execute(_INSERT, (seq, topic, payload, size, self._clock(), message_id))
            self._last_seq = seq
            self._count += 1
            self._bytes += size
            self._accepted += 1
            self._mark()
            return AppendResult(seq, dropped)

    def append_many(self, entries: Sequence[OutboxEntry]) -> list[AppendResult]:
        """Store several messages in one transaction (one flush in ``"power"`` mode): all
        of them or, on :class:`OutboxFull` (``reject_new``), none."""
        if not entries:
            return []
        sizes = [len(e.payload) + len(e.topic.encode()) for e in entries]
        total = sum(sizes)
        with self._lock:
            db = self._conn()
            dropped = self._make_room_locked(db, len(entries), total)
            now = self._clock()
            db.execute("BEGIN IMMEDIATE")
            try:
                if dropped:
                    self._drop_oldest_locked(db, dropped)
                first = self._last_seq + 1
                db.executemany(
                    _INSERT,
                    [
                        (first + i, e.topic, e.payload, size, now, e.message_id)
                        for i, (e, size) in enumerate(zip(entries, sizes, strict=True))
                    ],
                )
                db.execute("COMMIT")
                results = [
                    AppendResult(first + i, dropped if i == 0 else 0) for i in range(len(entries))
                ]
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._last_seq = first + len(entries) - 1
            self._count += len(entries)
            self._bytes += total
            self._accepted += len(entries)
            self._mark()
            return results

    def _append_each(self, entries: Sequence[OutboxEntry]) -> list[AppendResult | OutboxFull]:
        """The outcome of appending each entry in turn with :meth:`append` (a result or the
        :class:`OutboxFull` it raised), committed in one transaction when all of them fit
        without dropping anything (then the outcomes are the same), else one by one.
        For the group commit of concurrent ``Telemetry.send()`` calls. Other errors
        (closed, SQLite) are raised."""
        sizes = [len(e.payload) + len(e.topic.encode()) for e in entries]
        total = sum(sizes)
        with self._lock:
            db = self._conn()
            if entries and self._fits(len(entries), total):
                now = self._clock()
                first = self._last_seq + 1
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.executemany(
                        _INSERT,
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
                self._bytes += total
                self._accepted += len(entries)
                self._mark()
                return [AppendResult(first + i) for i in range(len(entries))]
        outcomes: list[AppendResult | OutboxFull] = []
        for e in entries:
            try:
                outcomes.append(self.append(e.topic, e.payload, e.message_id))
            except OutboxFull as exc:
                outcomes.append(exc)
        return outcomes

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
            db.execute(_SET_HIGH, (max(int(seq) for seq, _ in rows),))
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

    def read_pending(self, after_seq: int = 0, limit: int = 500) -> list[tuple[int, str, bytes]]:
        """What :meth:`read_batch` returns, as bare ``(seq, topic, payload)`` tuples: the
        publisher's read-back, without a record object per message."""
        with self._lock:
            db = self._conn()
            pending = self._pending_acks
            skip = self._pending_after_locked(after_seq)
            rows: list[tuple[int, str, bytes]] = db.execute(
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
            db.execute(_SET_HIGH, (runs[-1][1],))
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
                    db.execute(_SET_HIGH, (seq,))
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
