"""Salvaging a damaged outbox, as found by
:func:`iotref.device.telemetry.outbox_integrity.inspect_outbox`.

:func:`set_aside` renames the damaged files ``outbox.sqlite3.damaged-<UTC time>``
(``-wal``, ``-mark`` alike, mode 0600); they are never deleted. :func:`salvage_rows` reads
every message that can still be read from them, in sequence order, with its sequence
number, topic, payload, timestamps and message id. When SQLite cannot open the database
(its first page is damaged, or it was truncated while its WAL survived), the rows are read
from a scratch copy whose first page is rebuilt from the outbox's own schema. A region
SQLite reports as corrupt is skipped and reading goes on after it.
:class:`iotref.device.telemetry.outbox.Outbox` then writes them into a fresh outbox and keeps an
:class:`OutboxRecovery`, also stored next to the damaged files as JSON for ``iotref
status`` (:func:`read_reports`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import struct
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from iotref.device.files import write_atomic
from iotref.device.telemetry.outbox_integrity import (
    DAMAGED_INFIX,
    MARKER_SUFFIX,
    REPORT_SUFFIX,
    SHM_SUFFIX,
    WAL_SUFFIX,
    file_size,
    read_only_connection,
    table_exists,
    wal_header,
    wal_path,
)

_PAGE_SIZES: Final = (8192, 4096, 16384, 32768, 65536, 2048, 1024, 512)
_BTREE_PAGE_TYPES: Final = (0x02, 0x05, 0x0A, 0x0D)
_PROBE_LIMIT: Final = 62

OutboxRow = tuple[int, str, bytes, float, int, str | None]
"""A message read back: ``(seq, topic, payload, enqueued_at, attempts, message_id)``."""
RefusedRow = tuple[int, str, bytes, float, int, str | None, float, str]
"""A refused message read back: an :data:`OutboxRow` plus ``(refused_at, reason)``."""


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
    write_atomic(target, json.dumps(recovery.to_json(), indent=2).encode())


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
    if (file_size(db_path) or 0) > 0:
        try:
            with read_only_connection(db_path) as db:
                if table_exists(db, "outbox"):
                    opened = True
                    result.rows = _read_rows(db, "outbox", 6, result.notes)
                    if table_exists(db, "refused"):
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
    size = file_size(db_path) or 0
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
            with read_only_connection(scratch) as db:
                rows: list[OutboxRow] = _read_rows(db, "outbox", 6, notes)
        except sqlite3.DatabaseError as exc:
            notes.append(f"the rebuilt copy cannot be read either: {exc}")
            return []
    notes.append("read through a copy with a rebuilt first page")
    return rows
