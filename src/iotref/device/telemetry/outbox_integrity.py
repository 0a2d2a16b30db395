"""Checking an outbox's files when it is opened, and salvaging a damaged one.

An outbox is three files side by side: the SQLite database ``outbox.sqlite3``, its
write-ahead log ``outbox.sqlite3-wal`` (present while an outbox is open, and after a crash)
and the marker ``outbox.sqlite3-mark``, a 32-byte record the outbox rewrites after every
commit: the highest sequence number it has committed and how many messages were queued
(:class:`Marker`). The marker is what lets a truncated file be told from an empty outbox:
SQLite itself opens a database cut to 0 bytes as a new one, and silently ignores a WAL
that is cut short or whose header is gone.

What counts as damaged (:func:`inspect_outbox`, before the outbox is opened for writing):

* the database is not a SQLite file (no SQLite header, a header with an impossible page
  size, a length that is not a whole number of pages), SQLite cannot read it, or
  ``PRAGMA quick_check`` finds a fault;
* the WAL is shorter than its header, or its header is not a valid WAL header (wrong magic,
  page size or checksum);
* the database is empty while the WAL holds data (SQLite would ignore that WAL);
* the files hold fewer messages than the marker says were committed: their highest
  sequence number is below the marker's while the marker had messages queued (a database
  or WAL truncated to 0 or to a part, or replaced by an older copy).

Not counted as damage on its own: a WAL whose tail is not a whole frame. SQLite writes a
frame's header and its page in two writes, so a crash in the middle of a commit leaves a
partial frame; the transaction was not committed and its messages were never accepted.
If the tail was cut from committed data, the marker shows the loss. Lost acknowledgements
(a WAL cut after messages were acknowledged) only mean those messages are sent again, and
the platform drops the duplicates by ``sendereventuuid``; they are not reported.

What is done with a damaged outbox is in :mod:`iotref.device.telemetry.outbox_salvage`.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

try:
    import fcntl
except ImportError:  # not on POSIX: the database's own lock is the only one
    fcntl = None  # type: ignore[assignment]

MARKER_SUFFIX: Final = "-mark"
WAL_SUFFIX: Final = "-wal"
SHM_SUFFIX: Final = "-shm"
DAMAGED_INFIX: Final = ".damaged-"
REPORT_SUFFIX: Final = ".json"

_SQLITE_MAGIC: Final = b"SQLite format 3\x00"
_WAL_MAGIC: Final = (0x377F0682, 0x377F0683)
_WAL_HEADER: Final = 32
_WAL_FRAME_HEADER: Final = 24
_MARKER: Final = struct.Struct(">8sHHQQI")
_MARKER_MAGIC: Final = b"iotrefOB"
_MARKER_VERSION: Final = 1


def wal_path(path: Path) -> Path:
    return path.with_name(path.name + WAL_SUFFIX)


def marker_path(path: Path) -> Path:
    return path.with_name(path.name + MARKER_SUFFIX)


def file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------- the marker


@dataclass(frozen=True)
class MarkerState:
    """What the marker says about the last commit it saw."""

    high_seq: int
    """The highest sequence number committed so far."""
    depth: int
    """Messages queued after that commit."""
    clean: bool
    """The outbox was closed (not left by a crash)."""


def read_marker(path: Path) -> tuple[MarkerState | None, str | None]:
    """The marker at ``path`` (see :func:`marker_path`): its state, or ``(None, None)``
    when there is none, or ``(None, problem)`` when it is unreadable."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"the marker {path.name} cannot be read ({exc.strerror})"
    if not data:
        return None, None  # created by an outbox that never committed
    if len(data) < _MARKER.size:
        return None, f"the marker {path.name} is incomplete ({len(data)} bytes)"
    magic, version, flags, high, depth, crc = _MARKER.unpack_from(data)
    if magic != _MARKER_MAGIC or version != _MARKER_VERSION:
        return None, f"the marker {path.name} is not an iotref outbox marker"
    if zlib.crc32(data[: _MARKER.size - 4]) != crc:
        return None, f"the marker {path.name} is damaged (checksum)"
    return MarkerState(high, depth, bool(flags & 1)), None


class Marker:
    """The outbox's marker file, open for rewriting: one ``pwrite`` of 32 bytes (no
    ``fsync``) per commit. It is written after the commit, so it may lag the database by
    the last commit after a crash, never lead it (but see the module docstring on power
    cuts with ``durability="process"``)."""

    __slots__ = ("_fd", "path")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        with contextlib.suppress(OSError):
            os.fchmod(self._fd, 0o600)

    def try_lock(self) -> bool:
        """Take the marker's exclusive ``flock``; False if another holder has it."""
        if fcntl is None or self._fd is None:
            return True
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def write(self, high_seq: int, depth: int, *, clean: bool = False) -> None:
        if self._fd is None:
            return
        head = _MARKER.pack(_MARKER_MAGIC, _MARKER_VERSION, int(clean), high_seq, depth, 0)
        body = head[: _MARKER.size - 4]
        os.pwrite(self._fd, body + struct.pack(">I", zlib.crc32(body)), 0)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


# --------------------------------------------------------------------------- inspection


@dataclass(frozen=True)
class Damage:
    """Why an outbox's files are taken as damaged."""

    kind: str
    """``missing_file``, ``not_a_database``, ``header``, ``wal_header``, ``db_truncated``,
    ``unreadable``, ``integrity`` or ``missing_messages``."""
    detail: str
    """One sentence for a person."""


@dataclass(frozen=True)
class Inspection:
    """What :func:`inspect_outbox` found."""

    damage: Damage | None
    marker: MarkerState | None
    high_seq: int
    """The highest sequence number the files or the marker know of (numbering goes on
    above it)."""
    depth: int | None = None
    """Messages queued in the files (None when they could not be read)."""
    refused: int | None = None
    """Messages kept in the refused table."""
    notes: tuple[str, ...] = ()


def _db_header_problem(path: Path, size: int) -> Damage | None:
    if size < 100:
        return Damage("header", f"{path.name} is {size} bytes, shorter than a SQLite header")
    with path.open("rb") as handle:
        head = handle.read(100)
    if head[:16] != _SQLITE_MAGIC:
        return Damage("not_a_database", f"{path.name} is not a SQLite database (no header)")
    raw = struct.unpack_from(">H", head, 16)[0]
    page_size = 65536 if raw == 1 else raw
    if page_size < 512 or page_size & (page_size - 1):
        return Damage("header", f"{path.name} has a damaged header (page size {raw})")
    if size % page_size:
        return Damage(
            "header",
            f"{path.name} is {size} bytes, not a whole number of {page_size}-byte pages "
            "(truncated)",
        )
    return None


def wal_header(path: Path) -> tuple[int, int] | None:
    """``(page size, checkpoint sequence)`` of a valid WAL header at ``path``, else None."""
    try:
        with path.open("rb") as handle:
            head = handle.read(_WAL_HEADER)
    except OSError:
        return None
    if len(head) < _WAL_HEADER:
        return None
    magic, _version, page_size, ckpt = struct.unpack_from(">IIII", head)
    if magic not in _WAL_MAGIC or page_size < 512 or page_size & (page_size - 1):
        return None
    big = magic & 1
    if _wal_checksum(head[:24], bool(big)) != struct.unpack_from(">II", head, 24):
        return None
    return page_size, ckpt


def _wal_checksum(data: bytes, big_endian: bool) -> tuple[int, int]:
    """SQLite's WAL checksum (file format, section 4.1) of ``data`` from zero."""
    fmt = ">II" if big_endian else "<II"
    s0 = s1 = 0
    for i in range(0, len(data), 8):
        x0, x1 = struct.unpack_from(fmt, data, i)
        s0 = (s0 + x0 + s1) & 0xFFFFFFFF
        s1 = (s1 + x1 + s0) & 0xFFFFFFFF
    return s0, s1


def _wal_problem(path: Path, size: int, notes: list[str]) -> Damage | None:
    if size < _WAL_HEADER:
        return Damage("wal_header", f"{path.name} is {size} bytes, shorter than a WAL header")
    header = wal_header(path)
    if header is None:
        return Damage("wal_header", f"{path.name} has a damaged header; SQLite would ignore it")
    page_size = header[0]
    torn = (size - _WAL_HEADER) % (page_size + _WAL_FRAME_HEADER)
    if torn:
        notes.append(
            f"{path.name} ends in a partial frame ({torn} bytes): an interrupted write, "
            "ignored by SQLite"
        )
    return None


def _read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.2)


@contextlib.contextmanager
def read_only_connection(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection that neither checkpoints nor removes the WAL; the
    shared-memory file it may create is removed again afterwards."""
    shm = path.with_name(path.name + SHM_SUFFIX)
    had_shm = shm.exists()
    db = _read_only(path)
    try:
        yield db
    finally:
        db.close()
        if not had_shm:
            with contextlib.suppress(OSError):
                shm.unlink()


def table_exists(db: sqlite3.Connection, name: str) -> bool:
    row = db.execute("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?", (name,))
    return row.fetchone() is not None


def inspect_outbox(path: Path) -> Inspection:
    """Check the outbox at ``path`` without changing its files (see the module
    docstring). Raises :class:`sqlite3.OperationalError` ("locked"/"busy") when another
    process holds it, :class:`OSError` when its files cannot be read."""
    marker, marker_problem = read_marker(marker_path(path))
    notes: list[str] = [marker_problem] if marker_problem else []
    known_high = marker.high_seq if marker else 0
    db_size = file_size(path)
    wal = wal_path(path)
    wal_size = file_size(wal)

    def damaged(kind: str, detail: str) -> Inspection:
        return Inspection(Damage(kind, detail), marker, known_high, notes=tuple(notes))

    if not db_size and not wal_size:
        if marker is not None and marker.depth > 0:
            state = "missing" if db_size is None else "empty (0 bytes)"
            return damaged(
                "missing_file",
                f"{path.name} is {state}, but it held {marker.depth} queued message(s)",
            )
        return Inspection(None, marker, known_high, 0, 0, tuple(notes))
    if not db_size:
        return damaged(
            "db_truncated",
            f"{path.name} is empty while its WAL holds {wal_size} bytes (SQLite would ignore them)",
        )
    problem = _db_header_problem(path, db_size)
    if problem is None and wal_size:
        problem = _wal_problem(wal, wal_size, notes)
    if problem is not None:
        return damaged(problem.kind, problem.detail)
    try:
        with read_only_connection(path) as db:
            verdict = str(db.execute("PRAGMA quick_check(1)").fetchone()[0])
            if verdict != "ok":
                first = " ".join(line for line in verdict.splitlines() if "***" not in line)
                return damaged("integrity", f"{path.name} failed SQLite's check: {first}")
            depth = high = refused = 0
            if table_exists(db, "outbox"):
                depth, top = db.execute(
                    "SELECT count(*), coalesce(max(seq), 0) FROM outbox"
                ).fetchone()
                high = int(top)
            if table_exists(db, "outbox_meta"):
                row = db.execute("SELECT coalesce(max(high_seq), 0) FROM outbox_meta").fetchone()
                high = max(high, int(row[0]))
            if table_exists(db, "refused"):
                refused, top = db.execute(
                    "SELECT count(*), coalesce(max(seq), 0) FROM refused"
                ).fetchone()
                high = max(high, int(top))
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise
        return damaged("unreadable", f"SQLite cannot read {path.name}: {exc}")
    except sqlite3.DatabaseError as exc:
        return damaged("unreadable", f"SQLite cannot read {path.name}: {exc}")
    if marker is not None and marker.depth > 0 and high < marker.high_seq:
        return damaged(
            "missing_messages",
            f"the outbox's last commit reached message #{marker.high_seq} with "
            f"{marker.depth} queued, but its files hold messages only up to #{high} "
            "(truncated or replaced)",
        )
    return Inspection(None, marker, max(high, known_high), int(depth), int(refused), tuple(notes))
