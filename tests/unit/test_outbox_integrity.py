"""A damaged outbox is found at open, set aside (renamed, never deleted, 0600) and every
readable message is queued again in a fresh outbox, in order, with its own sequence number
and message id: a database cut to 0 bytes, a WAL cut to 0 or to half, a file that is not a
database, a database whose header or first page is garbage, a corrupt page in the middle.
Sound outboxes (fresh, reopened, left by a crash, with an interrupted last frame) are not
taken for damaged. Also: the refused table."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from iotref.device.telemetry.outbox import Outbox
from iotref.device.telemetry.outbox_errors import OutboxLocked
from iotref.device.telemetry.outbox_integrity import inspect_outbox
from iotref.device.telemetry.outbox_salvage import read_reports

QUEUED = 300
FIRST_RUN = 150
TOPIC = "connectprint/telemetry/org/client"


def payload(n: int) -> bytes:
    return json.dumps({"n": n, "pad": "x" * 900}).encode()


def fill(path: Path, first: int, last: int) -> Outbox:
    ob = Outbox(path)
    for n in range(first, last + 1):
        ob.append(TOPIC, payload(n), f"uuid-{n}")
    return ob


def closed_outbox(folder: Path) -> Path:
    """300 messages queued, outbox closed (everything in the database file)."""
    folder.mkdir()
    fill(folder / "outbox.sqlite3", 1, QUEUED).close()
    return folder / "outbox.sqlite3"


def crashed_outbox(folder: Path) -> Path:
    """150 messages queued by a run that closed, 150 more by one that crashed: the files
    as a SIGKILL leaves them (the last 150 in the WAL only)."""
    live = folder.with_name(folder.name + "-live")
    live.mkdir()
    fill(live / "outbox.sqlite3", 1, FIRST_RUN).close()
    ob = fill(live / "outbox.sqlite3", FIRST_RUN + 1, QUEUED)
    shutil.copytree(live, folder)  # while it is open: what a crash leaves
    ob.close()
    assert (folder / "outbox.sqlite3-wal").stat().st_size > 0
    return folder / "outbox.sqlite3"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def reopened(path: Path) -> tuple[Outbox, list[int]]:
    """The outbox opened again, and the seqs it holds; checks that every message kept
    its order and its message id."""
    ob = Outbox(path)
    records = ob.read_batch(0, 10 * QUEUED)
    seqs = [r.seq for r in records]
    assert seqs == sorted(seqs)
    for r in records:
        assert r.message_id == f"uuid-{r.seq}"
        assert json.loads(r.payload)["n"] == r.seq
        assert r.topic == TOPIC
    return ob, seqs


def check_kept(path: Path, ob: Outbox, kind: str) -> None:
    """The damaged files are kept (0600), with a report next to them; the fresh outbox
    is 0600 and numbering goes on above what was there."""
    recovery = ob.recovery
    assert recovery is not None and recovery.kind == kind, recovery
    assert recovery.kept_as, recovery
    for kept in recovery.kept_as:
        assert kept.exists() and ".damaged-" in kept.name
        assert mode(kept) == 0o600, kept
    assert mode(path) == 0o600
    reports = read_reports(path)
    assert [r.summary() for r in reports] == [recovery.summary()]
    summary = recovery.summary()
    assert f"recovered {recovery.recovered} of {QUEUED}" in summary
    assert str(recovery.kept_as[0]) in summary and "\n" not in summary
    new = ob.append(TOPIC, b"{}", "after")
    assert new.seq == QUEUED + 1  # never reuses a number the platform may have seen


def test_a_database_cut_to_zero_bytes_after_a_clean_close(tmp_path: Path) -> None:
    path = closed_outbox(tmp_path / "store")
    os.truncate(path, 0)
    ob, seqs = reopened(path)
    # everything was in the database file: nothing can be recovered, and it is said
    assert seqs == [] and ob.recovery is not None and ob.recovery.recovered == 0
    assert ob.recovery.expected == QUEUED
    assert "0 bytes" in ob.recovery.detail
    check_kept(path, ob, "missing_file")
    ob.close()


def test_a_database_cut_to_zero_bytes_after_a_crash_is_read_from_its_wal(
    tmp_path: Path,
) -> None:
    path = crashed_outbox(tmp_path / "store")
    os.truncate(path, 0)
    ob, seqs = reopened(path)
    # the second run's messages live in the WAL: read through a rebuilt first page
    assert ob.recovery is not None
    assert set(range(FIRST_RUN + 1, QUEUED + 1)) <= set(seqs), seqs
    assert ob.recovery.recovered == len(seqs) < QUEUED
    check_kept(path, ob, "db_truncated")
    ob.close()


def test_a_wal_cut_to_zero_bytes_keeps_what_was_checkpointed(tmp_path: Path) -> None:
    path = crashed_outbox(tmp_path / "store")
    os.truncate(path.with_name("outbox.sqlite3-wal"), 0)
    ob, seqs = reopened(path)
    assert seqs == list(range(1, FIRST_RUN + 1))
    assert ob.recovery is not None and ob.recovery.recovered == FIRST_RUN
    check_kept(path, ob, "missing_messages")
    ob.close()


def test_a_wal_cut_to_half_keeps_the_commits_in_the_first_half(tmp_path: Path) -> None:
    path = crashed_outbox(tmp_path / "store")
    wal = path.with_name("outbox.sqlite3-wal")
    os.truncate(wal, wal.stat().st_size // 2)
    ob, seqs = reopened(path)
    recovered = len(seqs)
    assert FIRST_RUN < recovered < QUEUED
    assert seqs == list(range(1, recovered + 1))  # a prefix, in order, no gap
    assert ob.recovery is not None and ob.recovery.recovered == recovered
    check_kept(path, ob, "missing_messages")
    ob.close()


def test_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = closed_outbox(tmp_path / "store")
    path.write_bytes(os.urandom(300_000))
    ob, seqs = reopened(path)
    assert seqs == []
    assert ob.recovery is not None and "not a SQLite database" in ob.recovery.detail
    check_kept(path, ob, "not_a_database")
    ob.close()


def test_a_file_that_is_not_a_database_and_no_marker(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    folder.mkdir()
    path = folder / "outbox.sqlite3"
    path.write_text("this is a text file, not an outbox\n" * 10)
    ob = Outbox(path)
    assert ob.recovery is not None and ob.recovery.kind == "not_a_database"
    assert ob.recovery.expected is None and ob.recovery.recovered == 0
    assert "recovered 0 message(s)" in ob.recovery.summary()
    assert ob.recovery.kept_as[0].read_text().startswith("this is a text file")
    ob.close()


@pytest.mark.parametrize("garbage", [100, 8192], ids=["header", "first-page"])
def test_a_garbage_header_or_first_page_is_rebuilt_and_every_row_read(
    tmp_path: Path, garbage: int
) -> None:
    path = closed_outbox(tmp_path / "store")
    with path.open("r+b") as handle:
        handle.write(os.urandom(garbage))
    ob, seqs = reopened(path)
    assert seqs == list(range(1, QUEUED + 1))
    assert ob.recovery is not None and ob.recovery.recovered == QUEUED
    assert any("rebuilt first page" in note for note in ob.recovery.notes)
    check_kept(path, ob, "not_a_database")
    ob.close()


def test_a_corrupt_page_in_the_middle_loses_only_its_rows(tmp_path: Path) -> None:
    path = closed_outbox(tmp_path / "store")
    with path.open("r+b") as handle:
        handle.seek(8192 * 6)
        handle.write(os.urandom(8192))
    ob, seqs = reopened(path)
    recovered = len(seqs)
    assert QUEUED - 20 <= recovered < QUEUED  # one 8 KiB page holds about 8 rows
    assert seqs[0] == 1 and seqs[-1] == QUEUED
    check_kept(path, ob, "integrity")
    ob.close()


def test_sound_outboxes_are_not_taken_for_damaged(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh" / "outbox.sqlite3"
    fresh.parent.mkdir()
    ob = Outbox(fresh)
    assert ob.recovery is None and ob.depth == 0
    ob.close()
    assert mode(fresh) == 0o600

    path = closed_outbox(tmp_path / "closed")
    ob, seqs = reopened(path)
    assert ob.recovery is None and seqs == list(range(1, QUEUED + 1))
    ob.close()

    crashed = crashed_outbox(tmp_path / "crashed")
    ob, seqs = reopened(crashed)
    assert ob.recovery is None and seqs == list(range(1, QUEUED + 1))
    ob.close()

    # A crash between the two writes of a frame leaves a partial frame at the end of the
    # WAL: an uncommitted transaction, not damage.
    torn = crashed_outbox(tmp_path / "torn")
    with torn.with_name("outbox.sqlite3-wal").open("ab") as handle:
        handle.write(os.urandom(24))
    finding = inspect_outbox(torn)
    assert finding.damage is None and any("partial frame" in n for n in finding.notes)
    ob, seqs = reopened(torn)
    assert ob.recovery is None and seqs == list(range(1, QUEUED + 1))
    ob.close()
    assert not list(tmp_path.rglob("*.damaged-*"))


def test_acknowledged_messages_do_not_look_like_lost_ones(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    ob = fill(path, 1, 50)
    ob.ack_many(range(1, 51))
    ob.close()
    ob = Outbox(path)
    assert ob.recovery is None and ob.depth == 0
    assert ob.append(TOPIC, b"{}").seq == 51  # numbering goes on across runs
    ob.close()


def test_an_outbox_in_use_is_refused_not_inspected_as_damaged(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    ob = fill(path, 1, 10)
    with pytest.raises(OutboxLocked):
        Outbox(path)
    ob.close()
    assert not list(tmp_path.glob("*.damaged-*"))


def test_existing_files_are_narrowed_to_0600(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    fill(path, 1, 3).close()
    path.chmod(0o644)
    ob = Outbox(path)
    ob.append(TOPIC, b"{}")
    assert mode(path) == 0o600
    assert mode(path.with_name("outbox.sqlite3-wal")) == 0o600
    assert mode(path.with_name("outbox.sqlite3-mark")) == 0o600
    ob.close()


def test_refused_messages_are_moved_kept_in_order_and_bounded(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    ob = Outbox(path, max_refused=3)
    for n in range(1, 7):
        ob.append(TOPIC, payload(n), f"uuid-{n}")
    assert ob.refuse(2, "the broker refused it: not authorized (0x87)")
    assert not ob.refuse(2, "twice")  # no longer queued
    ob.ack(3)
    assert not ob.refuse(3, "acked already")
    assert [r.seq for r in ob.read_batch()] == [1, 4, 5, 6]
    for seq in (4, 5, 6):
        assert ob.refuse(seq, "refused")
    kept = ob.refused_records()
    assert [r.seq for r in kept] == [4, 5, 6]  # the oldest beyond max_refused went
    assert kept[0].message_id == "uuid-4" and kept[0].reason == "refused"
    stats = ob.stats()
    assert (stats.depth, stats.refused, stats.refused_kept) == (1, 4, 3)
    ob.close()
    ob = Outbox(path)  # kept across runs; numbering never falls back
    assert [r.seq for r in ob.refused_records()] == [4, 5, 6]
    assert ob.stats().refused_kept == 3 and ob.append(TOPIC, b"{}").seq == 7
    ob.close()
