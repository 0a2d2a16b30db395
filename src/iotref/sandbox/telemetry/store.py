"""Where the monitor keeps telemetry: its own SQLite file (``telemetry.db`` in the data
dir, WAL) with one row per distinct message (deduplicated by ``sendereventuuid``; invalid
ones too, with their issues), the per-device counters of what arrived, and the retention
that prunes stored messages (:class:`Retention`, :meth:`TelemetryStore.maybe_prune`; the
rules are in docs/configuration.md, "Telemetry retention"). One writer thread inserts
whole batches; readers use their own connection.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iotref.sandbox.telemetry.counters import (
    DEVICE_COLUMNS,
    DeviceCounters,
    bump_rate,
    rate_series,
)
from iotref.sandbox.telemetry.record import Record

log = logging.getLogger(__name__)


PAGE_SIZE = 16384
"""Database page size of a new ``telemetry.db`` (SQLite's default is 4096). Each message
adds a key to the ``sendereventuuid`` index at a random place: with bigger pages a batch
dirties fewer pages, and storing costs about a third less."""

CACHE_KIB = 32 * 1024
"""Page cache of the writing connection (SQLite's default is 2 MiB): the
``sendereventuuid`` index is written at random places, and with a bigger cache its pages
stay in memory instead of being read again for every batch."""

WAL_AUTOCHECKPOINT_PAGES = 4000
"""The writer copies the WAL into the database once it holds this many pages (64 MB of
16 KB pages; SQLite's default is 1,000). Fewer checkpoints copy an index page rewritten
by several batches fewer times. Together with :data:`CACHE_KIB`, storing a 100,000-message
burst costs about a fifth less."""

PRUNE_INTERVAL_SECONDS = 2.0
"""Least time between two retention passes."""

PRUNE_CHUNK = 10_000
"""Most rows one retention transaction deletes."""

PRUNE_PASS_SECONDS = 0.25
"""A retention pass stops starting new chunks after this long (the rest waits for the
next pass), so a backlog never holds the writer thread for long."""

DEFAULT_MAX_MESSAGES = 1_000_000
DEFAULT_MAX_AGE_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True, slots=True)
class Retention:
    """How many stored messages to keep (``max_messages``) and for how long
    (``max_age_seconds``); ``None`` or 0 for no limit."""

    max_messages: int | None = DEFAULT_MAX_MESSAGES
    max_age_seconds: float | None = DEFAULT_MAX_AGE_SECONDS
    interval_seconds: float = PRUNE_INTERVAL_SECONDS
    chunk: int = PRUNE_CHUNK
    pass_seconds: float = PRUNE_PASS_SECONDS

    @property
    def active(self) -> bool:
        return bool(self.max_messages) or bool(self.max_age_seconds)

    def to_json(self) -> dict[str, Any]:
        return {
            "max_messages": self.max_messages or None,
            "max_age_seconds": self.max_age_seconds or None,
        }


NO_RETENTION = Retention(max_messages=None, max_age_seconds=None)


_SCHEMA = [
    """
    CREATE TABLE IF NOT EXISTS telemetry_messages (
        id INTEGER PRIMARY KEY,
        received_at REAL NOT NULL,
        topic TEXT NOT NULL,
        client_id TEXT NOT NULL,
        org_id TEXT,
        topic_problem TEXT,
        sendereventuuid TEXT,
        valid INTEGER NOT NULL,
        errors TEXT,
        eventtype TEXT,
        eventsubtype TEXT,
        payloadversion INTEGER,
        assetid TEXT,
        assettimestamp TEXT,
        status TEXT,
        speed REAL,
        productioncounter REAL,
        totalproductioncounter REAL,
        body BLOB NOT NULL
    )
    """,
    "CREATE UNIQUE INDEX IF NOT EXISTS telemetry_messages_uuid "
    "ON telemetry_messages (sendereventuuid)",
    "CREATE INDEX IF NOT EXISTS telemetry_messages_client ON telemetry_messages (client_id, id)",
    """
    CREATE TABLE IF NOT EXISTS telemetry_devices (
        client_id TEXT PRIMARY KEY,
        org_id TEXT,
        topic_problem TEXT,
        received INTEGER NOT NULL,
        valid INTEGER NOT NULL,
        invalid INTEGER NOT NULL,
        duplicates INTEGER NOT NULL,
        first_seen REAL,
        last_seen REAL,
        last_status TEXT,
        last_speed REAL,
        last_productioncounter REAL,
        last_totalproductioncounter REAL,
        last_assettimestamp TEXT
    )
    """,
]

_INSERT = (
    "INSERT OR IGNORE INTO telemetry_messages (received_at, topic, client_id, org_id, "
    "topic_problem, sendereventuuid, valid, errors, eventtype, eventsubtype, payloadversion, "
    "assetid, assettimestamp, status, speed, productioncounter, totalproductioncounter, body) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_MAX_ID = "SELECT max(id) FROM telemetry_messages"


_UPSERT_DEVICE = (
    f"INSERT OR REPLACE INTO telemetry_devices ({', '.join(DEVICE_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in DEVICE_COLUMNS)})"
)

_MESSAGE_COLUMNS = (
    "id, received_at, topic, client_id, org_id, topic_problem, sendereventuuid, valid, errors, "
    "eventtype, eventsubtype, payloadversion, assetid, assettimestamp, status, speed, "
    "productioncounter, totalproductioncounter"
)


class TelemetryStore:
    """The telemetry database plus the in-memory counters (see the module docstring).

    :meth:`write_batch` runs on the writer thread; the other methods may run anywhere.
    """

    def __init__(self, path: Path, retention: Retention = NO_RETENTION) -> None:
        self.path = path
        self.retention = retention
        self._lock = threading.Lock()  # the counters
        self._write_lock = threading.Lock()
        self._write = self._connect(PAGE_SIZE)
        self._write.execute(f"PRAGMA cache_size=-{int(CACHE_KIB)}")
        self._write.execute(f"PRAGMA wal_autocheckpoint={int(WAL_AUTOCHECKPOINT_PAGES)}")
        for statement in _SCHEMA:
            self._write.execute(statement)
        self._read = self._connect()
        self._read_lock = threading.Lock()
        self.devices: dict[str, DeviceCounters] = {}
        self.rate: deque[list[int]] = deque()
        self.received = 0
        self.stored = 0
        self.duplicates = 0
        self.invalid = 0
        self.pruned = 0
        self.prune_passes = 0
        self._last_prune: float | None = None
        self._load_devices()
        self._rows = (
            int(self._write.execute("SELECT COUNT(*) FROM telemetry_messages").fetchone()[0])
            if retention.max_messages
            else 0
        )

    def _connect(self, page_size: int | None = None) -> sqlite3.Connection:
        conn = sqlite3.connect(
            str(self.path), check_same_thread=False, isolation_level=None, timeout=30
        )
        conn.row_factory = sqlite3.Row
        if page_size is not None:
            # Only takes effect when the file is created (before WAL mode is set).
            conn.execute(f"PRAGMA page_size={int(page_size)}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _load_devices(self) -> None:
        rows = self._write.execute(
            f"SELECT {', '.join(DEVICE_COLUMNS)} FROM telemetry_devices"
        ).fetchall()
        for row in rows:
            counters = DeviceCounters(**{name: row[name] for name in DEVICE_COLUMNS})
            self.devices[counters.client_id] = counters
            self.received += counters.received
            self.duplicates += counters.duplicates
            self.invalid += counters.invalid
            self.stored += counters.valid + counters.invalid

    def close(self) -> None:
        with self._write_lock:
            self._write.close()
        with self._read_lock:
            self._read.close()

    # ------------------------------------------------------------------ writing

    def write_batch(self, records: Sequence[Record]) -> list[tuple[Record, int | None]]:
        """Store ``records`` in one transaction and update the counters. Returns each
        record with its row id, or ``None`` for a duplicate (not stored)."""
        rows = [record.row() for record in records]
        conn = self._write
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                results = list(zip(records, self._insert(conn, rows), strict=True))
                with self._lock:
                    stored_before = self.stored
                    touched = [c.row() for c in self._count(results)]
                    self._rows += self.stored - stored_before
                conn.executemany(_UPSERT_DEVICE, touched)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        return results

    @staticmethod
    def _insert(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[int | None]:
        """Insert ``rows`` (in a transaction); each one's row id, ``None`` for a duplicate.

        All at once (``executemany``) first: SQLite numbers each new row one above the
        largest id so far, so when every row went in and the largest id grew by exactly
        their number, their ids are the next ones in order. Otherwise (some duplicate) the
        rows are inserted again one by one, which tells each row's fate."""
        last = conn.execute(_MAX_ID).fetchone()[0] or 0
        conn.execute("SAVEPOINT batch")
        changes = conn.total_changes
        conn.executemany(_INSERT, rows)
        if conn.total_changes - changes == len(rows):
            end = conn.execute(_MAX_ID).fetchone()[0] or 0
            if end == last + len(rows):
                conn.execute("RELEASE batch")
                return list(range(last + 1, end + 1))
        conn.execute("ROLLBACK TO batch")
        conn.execute("RELEASE batch")
        ids: list[int | None] = []
        for row in rows:
            cursor = conn.execute(_INSERT, row)
            ids.append(cursor.lastrowid if cursor.rowcount == 1 else None)
        return ids

    def _count(self, results: list[tuple[Record, int | None]]) -> list[DeviceCounters]:
        touched: dict[str, DeviceCounters] = {}
        per_second: dict[tuple[str, int], int] = {}  # (client id, second) -> messages
        devices = self.devices
        stored = invalid = 0
        for record, row_id in results:
            client_id = record.client_id
            counters = touched.get(client_id)
            if counters is None:
                counters = devices.get(client_id)
                if counters is None:
                    counters = DeviceCounters(client_id, first_seen=record.received_at)
                    devices[client_id] = counters
                touched[client_id] = counters
            key = (client_id, int(record.received_at))
            per_second[key] = per_second.get(key, 0) + 1
            counters.received += 1
            counters.last_seen = record.received_at
            counters.org_id = record.org_id
            counters.topic_problem = record.topic_problem
            if row_id is None:
                counters.duplicates += 1
                continue
            stored += 1
            if record.valid:
                counters.valid += 1
            else:
                counters.invalid += 1
                invalid += 1
            # Shared subscriptions may reorder a device's messages a little: the readings
            # shown as "last" are those of the latest assettimestamp.
            stamp = record.assettimestamp
            last = counters.last_assettimestamp
            if stamp is not None and last is not None and stamp < last:
                continue
            if record.status is not None:
                counters.last_status = record.status
            if record.speed is not None:
                counters.last_speed = record.speed
            if record.productioncounter is not None:
                counters.last_productioncounter = record.productioncounter
            if record.totalproductioncounter is not None:
                counters.last_totalproductioncounter = record.totalproductioncounter
            if stamp is not None:
                counters.last_assettimestamp = stamp
        for (client_id, second), count in per_second.items():
            bump_rate(devices[client_id].rate, second, count)
            bump_rate(self.rate, second, count)
        self.received += len(results)
        self.stored += stored
        self.duplicates += len(results) - stored
        self.invalid += invalid
        return list(touched.values())

    # ------------------------------------------------------------------ retention

    def maybe_prune(self, now: float | None = None) -> int:
        """A retention pass if one is due (writer thread only). Returns the rows removed."""
        if not self.retention.active:
            return 0
        moment = time.monotonic()
        last = self._last_prune
        if last is not None and moment - last < self.retention.interval_seconds:
            return 0
        self._last_prune = moment
        return self.prune(now)

    def prune(self, now: float | None = None) -> int:
        """Delete what the retention policy no longer keeps, oldest first, in chunks of
        at most ``retention.chunk`` rows, one transaction each, until nothing is left to
        delete or ``retention.pass_seconds`` have passed (at least one chunk). Writer
        thread only. Logs one line when it removed rows; returns how many."""
        retention = self.retention
        if not retention.active:
            return 0
        started = time.monotonic()
        cutoff: float | None = None
        if retention.max_age_seconds:
            cutoff = (time.time() if now is None else now) - retention.max_age_seconds
        removed = 0
        while True:
            chunk = 0
            if cutoff is not None:
                chunk = self._prune_old_chunk(cutoff)
            if not chunk and retention.max_messages:
                chunk = self._prune_excess_chunk(retention.max_messages)
            removed += chunk
            if not chunk or time.monotonic() - started >= retention.pass_seconds:
                break
        with self._lock:
            self.prune_passes += 1
            self.pruned += removed
        if removed:
            log.info(
                "telemetry retention: pruned %d stored messages in %.3f s (%d pruned in all; "
                "limits: %s messages, %s s)",
                removed,
                time.monotonic() - started,
                self.pruned,
                retention.max_messages or "no",
                retention.max_age_seconds or "no",
            )
        return removed

    def _delete(self, sql: str, params: tuple[Any, ...]) -> int:
        conn = self._write
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                deleted = conn.execute(sql, params).rowcount
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        with self._lock:
            self._rows = max(0, self._rows - deleted)
        return deleted

    def _prune_old_chunk(self, cutoff: float) -> int:
        """Delete up to one chunk of messages received before ``cutoff``, from the
        oldest; 0 once the oldest message is younger."""
        with self._write_lock:
            first = self._write.execute(
                "SELECT id, received_at FROM telemetry_messages ORDER BY id LIMIT 1"
            ).fetchone()
        if first is None or first["received_at"] >= cutoff:
            return 0
        return self._delete(
            "DELETE FROM telemetry_messages WHERE id < ? AND received_at < ?",
            (int(first["id"]) + self.retention.chunk, cutoff),
        )

    def _prune_excess_chunk(self, max_messages: int) -> int:
        """Delete up to one chunk of the oldest messages beyond ``max_messages``."""
        excess = min(self._rows - max_messages, self.retention.chunk)
        if excess <= 0:
            return 0
        with self._write_lock:
            row = self._write.execute(
                "SELECT id FROM telemetry_messages ORDER BY id LIMIT 1 OFFSET ?", (excess - 1,)
            ).fetchone()
        if row is None:  # fewer rows than counted (should not happen): count again
            with self._write_lock:
                count = self._write.execute("SELECT COUNT(*) FROM telemetry_messages").fetchone()
            with self._lock:
                self._rows = int(count[0])
            return 0
        return self._delete("DELETE FROM telemetry_messages WHERE id <= ?", (int(row[0]),))

    def retention_status(self) -> dict[str, Any]:
        """The retention settings and how many stored messages have been pruned."""
        with self._lock:
            return {
                **self.retention.to_json(),
                "pruned": self.pruned,
                "prune_passes": self.prune_passes,
            }

    def message_id(self, sendereventuuid: str) -> int | None:
        """The row id of the stored message with this ``sendereventuuid`` (writer side)."""
        with self._write_lock:
            row = self._write.execute(
                "SELECT id FROM telemetry_messages WHERE sendereventuuid = ?", (sendereventuuid,)
            ).fetchone()
        return None if row is None else int(row[0])

    # ------------------------------------------------------------------ reading

    def totals(self) -> dict[str, int]:
        with self._lock:
            return {
                "received": self.received,
                "stored": self.stored,
                "valid": self.stored - self.invalid,
                "invalid": self.invalid,
                "duplicates": self.duplicates,
            }

    def device_list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [c.to_json() for c in self.devices.values()]

    def device(self, client_id: str) -> dict[str, Any] | None:
        with self._lock:
            counters = self.devices.get(client_id)
            return None if counters is None else counters.to_json()

    def rates(
        self, client_id: str | None, seconds: int, now: float | None = None
    ) -> list[list[int]]:
        """Messages per second over the last ``seconds`` (all devices if ``client_id`` is
        None; an all-zero series for a device never seen)."""
        moment = time.time() if now is None else now
        with self._lock:
            if client_id is None:
                source: Iterable[list[int]] = list(self.rate)
            else:
                counters = self.devices.get(client_id)
                source = list(counters.rate) if counters is not None else []
        return rate_series(source, moment, seconds)

    def messages(
        self,
        client_id: str | None = None,
        *,
        limit: int = 50,
        before: int | None = None,
        invalid_only: bool = False,
    ) -> list[dict[str, Any]]:
        """Newest first, without bodies."""
        where: list[str] = []
        params: list[Any] = []
        if client_id is not None:
            where.append("client_id = ?")
            params.append(client_id)
        if before is not None:
            where.append("id < ?")
            params.append(before)
        if invalid_only:
            where.append("valid = 0")
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        sql = f"SELECT {_MESSAGE_COLUMNS} FROM telemetry_messages {clause} ORDER BY id DESC LIMIT ?"
        params.append(limit)
        with self._read_lock:
            rows = self._read.execute(sql, params).fetchall()
        return [_message_json(row) for row in rows]

    def message(self, message_id: int) -> dict[str, Any] | None:
        """One message with its body (``body``: the text if UTF-8, ``body_base64`` if not)."""
        with self._read_lock:
            row = self._read.execute(
                f"SELECT {_MESSAGE_COLUMNS}, body FROM telemetry_messages WHERE id = ?",
                (message_id,),
            ).fetchone()
        if row is None:
            return None
        out = _message_json(row)
        raw = bytes(row["body"])
        try:
            out["body"] = raw.decode("utf-8")
        except UnicodeDecodeError:
            import base64

            out["body_base64"] = base64.b64encode(raw).decode()
        return out

    def series(self, client_id: str, limit: int = 300) -> list[dict[str, Any]]:
        """The device's latest speed and counter readings (any of its assets), oldest
        first, each with the asset it belongs to."""
        with self._read_lock:
            rows = self._read.execute(
                "SELECT id, received_at, assetid, speed, productioncounter, "
                "totalproductioncounter "
                "FROM telemetry_messages WHERE client_id = ? AND (speed IS NOT NULL OR "
                "productioncounter IS NOT NULL OR totalproductioncounter IS NOT NULL) "
                "ORDER BY id DESC LIMIT ?",
                (client_id, limit),
            ).fetchall()
        return [
            {
                "id": row["id"],
                "t": row["received_at"],
                "assetid": row["assetid"],
                "speed": row["speed"],
                "productioncounter": row["productioncounter"],
                "totalproductioncounter": row["totalproductioncounter"],
            }
            for row in reversed(rows)
        ]

    def count_rows(self) -> int:
        with self._read_lock:
            row = self._read.execute("SELECT COUNT(*) FROM telemetry_messages").fetchone()
        return int(row[0])


def _message_json(row: sqlite3.Row) -> dict[str, Any]:
    errors = row["errors"]
    return {
        "id": row["id"],
        "received_at": row["received_at"],
        "topic": row["topic"],
        "client_id": row["client_id"],
        "org_id": row["org_id"],
        "topic_problem": row["topic_problem"],
        "sendereventuuid": row["sendereventuuid"],
        "valid": bool(row["valid"]),
        "errors": json.loads(errors) if errors else [],
        "eventtype": row["eventtype"],
        "eventsubtype": row["eventsubtype"],
        "payloadversion": row["payloadversion"],
        "assetid": row["assetid"],
        "assettimestamp": row["assettimestamp"],
        "status": row["status"],
        "speed": row["speed"],
        "productioncounter": row["productioncounter"],
        "totalproductioncounter": row["totalproductioncounter"],
    }
