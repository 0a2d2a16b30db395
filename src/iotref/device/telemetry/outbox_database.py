"""The outbox's SQLite database: its tables, opening it (WAL, exclusive locking, files
mode 0600), the highest sequence number it knows of, and writing salvaged messages into a
fresh one."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Final

from iotref.device.telemetry.outbox_errors import OutboxError, OutboxLocked
from iotref.device.telemetry.outbox_integrity import SHM_SUFFIX, WAL_SUFFIX
from iotref.device.telemetry.outbox_records import Durability
from iotref.device.telemetry.outbox_salvage import Salvage

SCHEMA_VERSION: Final = 1
PAGE_SIZE: Final = 8192
"""Of a new database: 8 KiB pages waste less room around rows of about 1 KB than 4 KiB
ones, so appends and deletes write fewer pages."""

INSERT: Final = (
    "INSERT INTO outbox (seq, topic, payload, size, enqueued_at, message_id)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
SET_HIGH_SEQ: Final = (
    "INSERT INTO outbox_meta (id, high_seq) VALUES (1, ?)"
    " ON CONFLICT(id) DO UPDATE SET high_seq = max(high_seq, excluded.high_seq)"
)
"""Remember the highest sequence number deleted, so that numbering never goes back."""
SCHEMA: Final = (
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


def is_lock_error(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite refused because another connection holds the database."""
    return "locked" in str(exc) or "busy" in str(exc)


def prepare_files(path: Path) -> None:
    """Create the database file with mode 0600 (SQLite gives its WAL the same mode) and
    narrow the mode of existing files."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    for suffix in ("", WAL_SUFFIX, SHM_SUFFIX):
        target = path.with_name(path.name + suffix)
        try:
            mode = target.stat().st_mode & 0o777
            if mode & 0o077:
                target.chmod(mode & 0o700)
        except FileNotFoundError:
            continue


def open_database(path: Path, durability: Durability) -> sqlite3.Connection:
    """Open (or create) the outbox database at ``path`` and take its exclusive lock.

    Raises :class:`OutboxLocked` when another connection holds it, :class:`OutboxError`
    when it cannot use WAL or has an unknown schema version."""
    prepare_files(path)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0.2)
    try:
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        db.execute(f"PRAGMA page_size={PAGE_SIZE}")  # a new database only
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise OutboxError(f"{path}: cannot switch to WAL mode (got {mode})")
        sync = "FULL" if durability == "power" else "NORMAL"
        db.execute(f"PRAGMA synchronous={sync}")
        db.execute("PRAGMA temp_store=MEMORY")
        db.execute("BEGIN IMMEDIATE")  # takes the exclusive lock now, not at first use
        for statement in SCHEMA:
            db.execute(statement)
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        elif version != SCHEMA_VERSION:
            raise OutboxError(f"{path}: outbox schema version {version} is unknown")
        db.execute("COMMIT")
    except sqlite3.OperationalError as exc:
        db.close()
        if is_lock_error(exc):
            raise OutboxLocked(f"{path} is in use by another sender") from exc
        raise
    except BaseException:
        db.close()
        raise
    return db


def stored_high_seq(db: sqlite3.Connection) -> int:
    """The highest sequence number the database knows of (queued, refused or deleted)."""
    row = db.execute(
        "SELECT max(coalesce((SELECT max(seq) FROM outbox), 0),"
        " coalesce((SELECT max(seq) FROM refused), 0),"
        " coalesce((SELECT max(high_seq) FROM outbox_meta), 0))"
    ).fetchone()
    return int(row[0])


def restore(db: sqlite3.Connection, salvage: Salvage, high_seq: int) -> None:
    """Write the messages salvaged from a damaged outbox into the fresh database ``db``,
    queued and refused ones alike, with their sequence numbers, in one transaction."""
    db.execute("BEGIN IMMEDIATE")
    try:
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
        db.execute(SET_HIGH_SEQ, (high_seq,))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
