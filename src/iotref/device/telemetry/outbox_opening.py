"""Opening an outbox: taking its marker's lock (one owner at a time), checking its files,
and rebuilding a damaged one from whatever messages can still be read."""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from iotref.device.telemetry.outbox_database import (
    SCHEMA,
    is_lock_error,
    open_database,
    restore,
    stored_high_seq,
)
from iotref.device.telemetry.outbox_errors import OutboxError, OutboxLocked
from iotref.device.telemetry.outbox_integrity import (
    Inspection,
    Marker,
    inspect_outbox,
    marker_path,
)
from iotref.device.telemetry.outbox_records import Durability
from iotref.device.telemetry.outbox_salvage import (
    OutboxRecovery,
    report_path,
    salvage_rows,
    set_aside,
    write_report,
)

log = logging.getLogger(__name__)

RECOVERY_LOG_ATTRIBUTE: Final = "iotref_outbox_recovery"
"""Set on the log record of a recovery, for a program that says it in its own words to
leave that record out."""


@dataclass(frozen=True)
class OpenedOutbox:
    """An outbox's files, open and owned."""

    db: sqlite3.Connection
    marker: Marker
    """Locked: the sign that this process owns the outbox."""
    high_seq: int
    """The highest sequence number the files or the marker know of."""
    recovery: OutboxRecovery | None
    """What was done about damaged files; None when they were sound."""


def lock_marker(path: Path) -> Marker:
    """Open and lock the marker of the outbox at ``path``; raises :class:`OutboxLocked`
    when another process (or object) holds it."""
    marker = Marker(marker_path(path))
    if not marker.try_lock():
        marker.close()
        raise OutboxLocked(f"{path} is in use by another sender")
    return marker


def open_outbox(path: Path, durability: Durability, now: float) -> OpenedOutbox:
    """Lock, check and open the outbox at ``path``, rebuilding it first when damaged
    (``now``: the time recorded for a recovery). On failure nothing stays open."""
    marker: Marker | None = lock_marker(path)
    db: sqlite3.Connection | None = None
    recovery = None
    try:
        inspection = _inspect(path)
        if inspection.damage is not None:
            kept_as = _set_aside(path, inspection, now)
            damaged_marker, marker = marker, None
            try:
                marker = lock_marker(path)  # a new one: the old one went with the files
            finally:
                assert damaged_marker is not None
                damaged_marker.close()
            db, recovery = _rebuild(path, durability, inspection, kept_as, now)
        else:
            db = open_database(path, durability)
        high = max(inspection.high_seq, stored_high_seq(db))
    except BaseException:
        if db is not None:
            db.close()
        if marker is not None:
            marker.close()
        raise
    assert marker is not None
    return OpenedOutbox(db, marker, high, recovery)


def _inspect(path: Path) -> Inspection:
    try:
        return inspect_outbox(path)
    except sqlite3.OperationalError as exc:
        if is_lock_error(exc):
            raise OutboxLocked(f"{path} is in use by another sender") from exc
        raise


def _set_aside(path: Path, inspection: Inspection, now: float) -> tuple[Path, tuple[Path, ...]]:
    """Rename the damaged files (see :func:`set_aside`)."""
    assert inspection.damage is not None
    try:
        return set_aside(path, now)
    except OSError as exc:
        raise OutboxError(
            f"{path} is damaged ({inspection.damage.detail}) and cannot be set aside: "
            f"{exc.strerror or exc}"
        ) from exc


def _rebuild(
    path: Path,
    durability: Durability,
    inspection: Inspection,
    kept_as: tuple[Path, tuple[Path, ...]],
    now: float,
) -> tuple[sqlite3.Connection, OutboxRecovery]:
    """Open a fresh outbox and queue in it every message that can be read from the
    damaged files set aside as ``kept_as`` (the database's new name, every file moved)."""
    damage = inspection.damage
    assert damage is not None
    base, moved = kept_as
    salvage = salvage_rows(base, SCHEMA)
    db = open_database(path, durability)
    try:
        restore(db, salvage, inspection.high_seq)
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
    return db, recovery
