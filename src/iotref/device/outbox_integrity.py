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

Salvaging (:func:`set_aside` and :func:`salvage_rows`): the damaged files are renamed
``outbox.sqlite3.damaged-<UTC time>`` (``-wal``, ``-mark`` alike, mode 0600), never
deleted; every message that can still be read from them is read in sequence order, with
its sequence number, topic, payload, timestamps and message id. When SQLite cannot open
the database (its first page is damaged, or it was truncated while its WAL survived), the
rows are read from a scratch copy whose first page is rebuilt from the outbox's own
schema. A region SQLite reports as corrupt is skipped and reading goes on after it.
:class:`iotref.device.outbox.Outbox` then writes them into a fresh outbox and keeps an
:class:`OutboxRecovery`, also stored next to the damaged files as JSON for ``iotref
status``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import struct
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

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
_PAGE_SIZES: Final = (8192, 4096, 16384, 32768, 65536, 2048, 1024, 512)
_BTREE_PAGE_TYPES: Final = (0x02, 0x05, 0x0A, 0x0D)
_PROBE_LIMIT: Final = 62

OutboxRow = tuple[int, str, bytes, float, int, str | None]
"""A message read back: ``(seq, topic, payload, enqueued_at, attempts, message_id)``."""
RefusedRow = tuple[int, str, bytes, float, int, str | None, float, str]
"""A refused message read back: an :data:`OutboxRow` plus ``(refused_at, reason)``."""


def wal_path(path: Path) -> Path:
    return path.with_name(path.name + WAL_SUFFIX)


def marker_path(path: Path) -> Path:
    return path.with_name(path.name + MARKER_SUFFIX)


def _size(path: Path) -> int | None:
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
def _read_only_connection(path: Path) -> Iterator[sqlite3.Connection]:
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


def _table_exists(db: sqlite3.Connection, name: str) -> bool:
    row = db.execute("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?", (name,))
    return row.fetchone() is not None


def inspect_outbox(path: Path) -> Inspection:
    """Check the outbox at ``path`` without changing its files (see the module
    docstring). Raises :class:`sqlite3.OperationalError` ("locked"/"busy") when another
    process holds it, :class:`OSError` when its files cannot be read."""
    marker, marker_problem = read_marker(marker_path(path))
    notes: list[str] = [marker_problem] if marker_problem else []
    known_high = marker.high_seq if marker else 0
    db_size = _size(path)
    wal = wal_path(path)
    wal_size = _size(wal)

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
        with _read_only_connection(path) as db:
            verdict = str(db.execute("PRAGMA quick_check(1)").fetchone()[0])
            if verdict != "ok":
                first = " ".join(line for line in verdict.splitlines() if "***" not in line)
                return damaged("integrity", f"{path.name} failed SQLite's check: {first}")
            depth = high = refused = 0
            if _table_exists(db, "outbox"):
                depth, top = db.execute(
                    "SELECT count(*), coalesce(max(seq), 0) FROM outbox"
                ).fetchone()
                high = int(top)
            if _table_exists(db, "outbox_meta"):
                row = db.execute("SELECT coalesce(max(high_seq), 0) FROM outbox_meta").fetchone()
                high = max(high, int(row[0]))
            if _table_exists(db, "refused"):
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


# --------------------------------------------------------------------------- salvage


@dataclass(frozen=True)
class OutboxRecovery:
    """What happened when a damaged outbox was found: said in one line by
    :meth:`summary`, kept as JSON next to the damaged files (:func:`read_reports`)."""

    kind: str
    detail: str
    expected: int | None
    """Messages queued according to the marker (None without one)."""
    recovered: int
    """Messages read back and queued again in the fresh outbox."""
    recovered_refused: int
    kept_as: tuple[Path, ...]
    """The damaged files, renamed."""
    at: float
    notes: tuple[str, ...] = field(default=())

    def summary(self) -> str:
        of = f" of {self.expected} queued" if self.expected is not None else ""
        kept = self.kept_as[0] if self.kept_as else None
        more = f" (+{len(self.kept_as) - 1} file(s) beside it)" if len(self.kept_as) > 1 else ""
        where = f"; the damaged copy is kept as {kept}{more}" if kept else ""
        return (
            f"the outbox was damaged ({self.detail}); recovered {self.recovered}{of} "
            f"message(s) into a fresh outbox{where}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "detail": self.detail,
            "expected": self.expected,
            "recovered": self.recovered,
            "recovered_refused": self.recovered_refused,
            "kept_as": [str(p) for p in self.kept_as],
            "at": self.at,
            "notes": list(self.notes),
            "summary": self.summary(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OutboxRecovery:
        return cls(
            kind=str(data["kind"]),
            detail=str(data["detail"]),
            expected=None if data.get("expected") is None else int(data["expected"]),
            recovered=int(data["recovered"]),
            recovered_refused=int(data.get("recovered_refused", 0)),
            kept_as=tuple(Path(p) for p in data.get("kept_as", [])),
            at=float(data["at"]),
            notes=tuple(str(n) for n in data.get("notes", [])),
        )


def set_aside(path: Path, now: float) -> tuple[Path, tuple[Path, ...]]:
    """Rename the outbox's files (database, WAL, shared memory, marker) to
    ``<name>.damaged-<UTC time>[-n]`` (+ the same suffixes), mode 0600. Returns the
    damaged database's new name and every file moved (the database first when it
    existed). Nothing is deleted."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    base = path.with_name(f"{path.name}{DAMAGED_INFIX}{stamp}")
    n = 1
    while any(
        base.with_name(base.name + s).exists()
        or base.with_name(base.name + s + REPORT_SUFFIX).exists()
        for s in ("", WAL_SUFFIX, MARKER_SUFFIX)
    ):
        n += 1
        base = path.with_name(f"{path.name}{DAMAGED_INFIX}{stamp}-{n}")
    moved: list[Path] = []
    for suffix in ("", WAL_SUFFIX, SHM_SUFFIX, MARKER_SUFFIX):
        source = path.with_name(path.name + suffix)
        if not source.exists():
            continue
        target = base.with_name(base.name + suffix)
        source.rename(target)
        with contextlib.suppress(OSError):
            target.chmod(0o600)
        moved.append(target)
    return base, tuple(moved)


def report_path(kept_db: Path) -> Path:
    """Where the JSON report of a recovery lies, next to the damaged database."""
    return kept_db.with_name(kept_db.name + REPORT_SUFFIX)


def write_report(recovery: OutboxRecovery, target: Path) -> None:
    """Store ``recovery`` as JSON at ``target`` (mode 0600, written atomically)."""
    tmp = target.with_name(target.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(recovery.to_json(), handle, indent=2)
    tmp.replace(target)


def read_reports(path: Path) -> list[OutboxRecovery]:
    """The recoveries of the outbox at ``path`` whose reports are still there, oldest
    first (unreadable reports are skipped)."""
    found = []
    for report in sorted(path.parent.glob(f"{path.name}{DAMAGED_INFIX}*{REPORT_SUFFIX}")):
        try:
            found.append(OutboxRecovery.from_json(json.loads(report.read_text("utf-8"))))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(found, key=lambda r: r.at)


@dataclass
class Salvage:
    """What :func:`salvage_rows` could read."""

    rows: list[OutboxRow] = field(default_factory=list)
    refused: list[RefusedRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def salvage_rows(db_path: Path, schema: Sequence[str]) -> Salvage:
    """Every message readable from the (set-aside) outbox at ``db_path`` and its WAL,
    in sequence order. ``schema`` is the outbox's ``CREATE TABLE`` statements, in the
    order a new outbox runs them (to rebuild a first page). Never raises for damage."""
    result = Salvage()
    opened = False
    if (_size(db_path) or 0) > 0:
        try:
            with _read_only_connection(db_path) as db:
                if _table_exists(db, "outbox"):
                    opened = True
                    result.rows = _read_rows(db, "outbox", 6, result.notes)
                    if _table_exists(db, "refused"):
                        refused = _read_rows(db, "refused", 8, result.notes)
                        result.refused = [r for r in refused if _is_refused(r)]
        except sqlite3.DatabaseError as exc:
            result.notes.append(f"SQLite cannot open it as it is: {exc}")
    if opened:
        return result
    rebuilt = _read_with_rebuilt_first_page(db_path, schema, result.notes)
    if len(rebuilt) > len(result.rows):
        result.rows = rebuilt
    return result


_COLUMNS: Final = {
    "outbox": "seq, topic, payload, enqueued_at, attempts, message_id",
    "refused": "seq, topic, payload, enqueued_at, attempts, message_id, refused_at, reason",
}


def _is_row(row: Sequence[Any]) -> bool:
    return (
        isinstance(row[0], int)
        and isinstance(row[1], str)
        and isinstance(row[2], bytes)
        and isinstance(row[3], int | float)
        and isinstance(row[4], int)
        and (row[5] is None or isinstance(row[5], str))
    )


def _is_refused(row: Sequence[Any]) -> bool:
    return isinstance(row[6], int | float) and isinstance(row[7], str)


def _read_rows(db: sqlite3.Connection, table: str, width: int, notes: list[str]) -> list[Any]:
    """The rows of ``table`` in ``seq`` order, going on after regions SQLite reports as
    corrupt (found by probing further and further ahead)."""
    columns = _COLUMNS[table]
    rows: list[Any] = []
    after = 0  # sequence numbers start at 1
    skipped = 0
    while True:
        try:
            for row in db.execute(
                f"SELECT {columns} FROM {table} WHERE seq > ? ORDER BY seq", (after,)
            ):
                if len(row) == width and _is_row(row):
                    rows.append(tuple(row))
                else:
                    skipped += 1
                after = int(row[0]) if isinstance(row[0], int) else after + 1
            break
        except sqlite3.DatabaseError:
            resume = _probe(db, table, after)
            skipped += 1
            if resume is None:
                break
            after = resume - 1
    if skipped:
        notes.append(f"{skipped} unreadable region(s) or row(s) of {table} skipped")
    return rows


def _first_after(db: sqlite3.Connection, table: str, start: int) -> int | None:
    """The first ``seq`` above ``start``; -1 when there is none; None when SQLite fails
    on the way to it."""
    try:
        row = db.execute(
            f"SELECT seq FROM {table} WHERE seq > ? ORDER BY seq LIMIT 1", (start,)
        ).fetchone()
    except sqlite3.DatabaseError:
        return None
    return -1 if row is None else int(row[0])


def _probe(db: sqlite3.Connection, table: str, after: int) -> int | None:
    """The first readable ``seq`` after a corrupt region that starts past ``after``:
    tries ``after + 2**k`` for growing ``k``, then narrows the last step down by
    bisection so that little readable is skipped. None when nothing further is
    readable."""
    failed = after
    for k in range(_PROBE_LIMIT):
        start = after + (1 << k)
        found = _first_after(db, table, start)
        if found is None:
            failed = start
            continue
        if found < 0:
            return None
        low, high = failed, start  # fails at low, succeeds at high
        while high - low > 1:
            middle = (low + high) // 2
            candidate = _first_after(db, table, middle)
            if candidate is None:
                low = middle
            else:
                high, found = middle, candidate
        return found if found >= 0 else None
    return None


def _page_size(db_path: Path, size: int, wal: Path) -> int | None:
    header = wal_header(wal)
    if header is not None:
        return header[0]
    if size == 0:
        return None
    with db_path.open("rb") as handle:
        head = handle.read(100)
        raw = struct.unpack_from(">H", head, 16)[0] if len(head) >= 18 else 0
        declared = 65536 if raw == 1 else raw
        candidates = [declared] if declared in _PAGE_SIZES else []
        for page_size in [*candidates, *_PAGE_SIZES]:
            if size % page_size or size < 2 * page_size:
                continue
            handle.seek(page_size)  # page 2: the outbox table's root in a new outbox
            if handle.read(1)[0] in _BTREE_PAGE_TYPES:
                return page_size
    return None


def _first_page(page_size: int, schema: Sequence[str], *, wal: bool, pages: int) -> bytes:
    """Page 1 of a new outbox with ``schema`` (so its tables have the root pages a new
    outbox gives them), set for ``pages`` pages and, with ``wal``, WAL mode."""
    with tempfile.TemporaryDirectory(prefix="iotref-outbox-template-") as tmp:
        template = Path(tmp) / "template.sqlite3"
        db = sqlite3.connect(template, isolation_level=None)
        try:
            db.execute(f"PRAGMA page_size={page_size}")
            for statement in schema:
                db.execute(statement)
        finally:
            db.close()
        page = bytearray(template.read_bytes()[:page_size])
    if wal:
        page[18] = page[19] = 2
    struct.pack_into(">I", page, 28, pages)
    page[92:96] = page[24:28]  # the page count above is valid for this change counter
    return bytes(page)


def _read_with_rebuilt_first_page(
    db_path: Path, schema: Sequence[str], notes: list[str]
) -> list[OutboxRow]:
    size = _size(db_path) or 0
    wal = wal_path(db_path)
    page_size = _page_size(db_path, size, wal)
    if page_size is None:
        notes.append("no page of the outbox table could be found")
        return []
    has_wal = wal_header(wal) is not None
    with tempfile.TemporaryDirectory(prefix="iotref-outbox-salvage-", dir=db_path.parent) as tmp:
        scratch = Path(tmp) / "scratch.sqlite3"
        pages = max(1, size // page_size)
        first = _first_page(page_size, schema, wal=has_wal, pages=pages)
        with scratch.open("wb") as out:
            out.write(first)
            if size > page_size:
                with db_path.open("rb") as source:
                    source.seek(page_size)
                    shutil.copyfileobj(source, out)
        if has_wal:
            shutil.copyfile(wal, wal_path(scratch))
        try:
            with _read_only_connection(scratch) as db:
                rows: list[OutboxRow] = _read_rows(db, "outbox", 6, notes)
        except sqlite3.DatabaseError as exc:
            notes.append(f"the rebuilt copy cannot be read either: {exc}")
            return []
    notes.append("read through a copy with a rebuilt first page")
    return rows
