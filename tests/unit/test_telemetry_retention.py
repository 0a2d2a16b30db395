"""Retention of the sandbox's telemetry store: the oldest stored messages go first, by
count and by age, in bounded chunks; the counters of what arrived never go down."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

import pytest

from iotref.sandbox.telemetry.record import Record
from iotref.sandbox.telemetry.store import NO_RETENTION, Retention, TelemetryStore
from iotref.sandbox.telemetry.writer import BatchWriter

CLIENT = "iotref-0123456789abcdef0123"
TOPIC = f"connectprint/telemetry/org-1/{CLIENT}"
T0 = 1_700_000_000.0


def record(received_at: float, sendereventuuid: str | None = None, valid: bool = True) -> Record:
    return Record(
        received_at, TOPIC, CLIENT, "org-1", None, sendereventuuid or str(uuid.uuid4()), valid,
        None if valid else [{"path": "$", "reason": "bad"}], "status", None, 2, "press-1",
        None, "Production", 1.0, 2.0, 3.0, b"{}",
    )  # fmt: skip


def store_with(tmp_path: Path, **limits: Any) -> TelemetryStore:
    return TelemetryStore(tmp_path / "telemetry.db", Retention(**limits))


def stored_ids(store: TelemetryStore) -> list[int]:
    return sorted(m["id"] for m in store.messages(limit=1_000_000))


def test_count_limit_keeps_the_newest_and_counters_stay(tmp_path: Path) -> None:
    store = store_with(tmp_path, max_messages=5, max_age_seconds=None)
    store.write_batch([record(T0 + i) for i in range(8)])
    store.write_batch([record(T0 + 8, valid=False), record(T0 + 9)])
    before = store.totals()
    device_before = store.device(CLIENT)
    assert store.prune(now=T0 + 10) == 5
    assert stored_ids(store) == [6, 7, 8, 9, 10]
    assert (
        store.totals()
        == before
        == {
            "received": 10,
            "stored": 10,
            "valid": 9,
            "invalid": 1,
            "duplicates": 0,
        }
    )
    assert store.device(CLIENT) == device_before
    assert store.retention_status() == {
        "max_messages": 5,
        "max_age_seconds": None,
        "pruned": 5,
        "prune_passes": 1,
    }
    assert store.prune(now=T0 + 10) == 0  # nothing beyond the limit any more
    store.close()


def test_age_limit_removes_what_was_received_before_the_cutoff(tmp_path: Path) -> None:
    store = store_with(tmp_path, max_messages=None, max_age_seconds=100)
    store.write_batch([record(T0 + i * 10) for i in range(10)])  # T0 .. T0+90
    assert store.prune(now=T0 + 150) == 5  # older than T0+50 go: T0 .. T0+40
    assert [m["received_at"] for m in reversed(store.messages())] == [
        T0 + i * 10 for i in range(5, 10)
    ]
    assert store.prune(now=T0 + 150) == 0
    assert store.prune(now=T0 + 1000) == 5
    assert store.count_rows() == 0
    assert store.totals()["received"] == 10
    store.close()


def test_both_limits_apply(tmp_path: Path) -> None:
    store = store_with(tmp_path, max_messages=3, max_age_seconds=100)
    store.write_batch([record(T0 + i) for i in range(10)])
    assert store.prune(now=T0 + 105) == 7  # 5 too old, then 2 beyond the count
    assert stored_ids(store) == [8, 9, 10]
    store.close()


def test_pruning_goes_in_bounded_chunks_one_transaction_each(tmp_path: Path) -> None:
    store = store_with(tmp_path, max_messages=10, max_age_seconds=None, chunk=7)
    store.write_batch([record(T0 + i) for i in range(40)])
    statements: list[str] = []
    store._write.set_trace_callback(statements.append)
    assert store.prune(now=T0 + 40) == 30
    deletes = [s for s in statements if s.startswith("DELETE")]
    assert len(deletes) == 5  # 7 + 7 + 7 + 7 + 2
    assert statements.count("BEGIN IMMEDIATE") == 5
    assert stored_ids(store) == list(range(31, 41))
    store.close()


def test_a_pass_stops_after_its_time_budget(tmp_path: Path) -> None:
    store = store_with(tmp_path, max_messages=10, max_age_seconds=None, chunk=5, pass_seconds=0)
    store.write_batch([record(T0 + i) for i in range(40)])
    assert store.prune(now=T0 + 40) == 5  # one chunk per pass at least, then the budget
    assert store.prune(now=T0 + 40) == 5
    assert store.count_rows() == 30
    store.close()


def test_age_chunks_are_bounded_too(tmp_path: Path) -> None:
    store = store_with(tmp_path, max_messages=None, max_age_seconds=10, chunk=4)
    store.write_batch([record(T0 + i) for i in range(20)])
    statements: list[str] = []
    store._write.set_trace_callback(statements.append)
    assert store.prune(now=T0 + 25) == 15  # received before T0+15
    assert len([s for s in statements if s.startswith("DELETE")]) == 4  # 4 + 4 + 4 + 3
    store.close()


def test_maybe_prune_runs_at_most_every_interval(tmp_path: Path) -> None:
    store = store_with(tmp_path, max_messages=2, max_age_seconds=None, interval_seconds=3600)
    store.write_batch([record(T0 + i) for i in range(5)])
    assert store.maybe_prune() == 3
    store.write_batch([record(T0 + i) for i in range(5, 10)])
    assert store.maybe_prune() == 0  # not due yet
    assert store.count_rows() == 7
    assert store.prune() == 5
    store.close()


def test_a_copy_of_a_pruned_message_is_stored_again_as_new(tmp_path: Path) -> None:
    store = store_with(tmp_path, max_messages=2, max_age_seconds=None)
    old = record(T0, "11111111-1111-4111-8111-111111111111")
    store.write_batch([old, record(T0 + 1), record(T0 + 2)])
    assert store.write_batch([record(T0 + 3, old.sendereventuuid)])[0][1] is None  # still kept
    assert store.prune(now=T0 + 3) == 1
    again = store.write_batch([record(T0 + 4, old.sendereventuuid)])
    assert again[0][1] == 4  # the index forgot it: a new message, a new id
    totals = store.totals()
    assert (totals["received"], totals["stored"], totals["duplicates"]) == (5, 4, 1)
    assert store.prune(now=T0 + 4) == 1
    assert store.count_rows() == 2
    store.close()


def test_the_kept_count_survives_a_restart(tmp_path: Path) -> None:
    store = store_with(tmp_path, max_messages=None, max_age_seconds=None)
    store.write_batch([record(T0 + i) for i in range(6)])
    store.close()
    reopened = store_with(tmp_path, max_messages=4, max_age_seconds=None)
    assert reopened.prune(now=T0 + 6) == 2
    assert reopened.totals()["received"] == 6
    reopened.close()


def test_no_retention_prunes_nothing(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path / "telemetry.db", NO_RETENTION)
    store.write_batch([record(T0 + i) for i in range(5)])
    assert store.maybe_prune() == 0
    assert store.prune(now=T0 + 10**9) == 0
    assert store.retention_status()["max_messages"] is None
    store.close()


def test_the_writer_prunes_between_batches_and_logs_once_per_pass(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = store_with(tmp_path, max_messages=3, max_age_seconds=None, interval_seconds=0)
    writer = BatchWriter(store, lambda events: None, lambda: False)
    with caplog.at_level(logging.INFO, logger="iotref.sandbox.telemetry.store"):
        writer([record(T0 + i) for i in range(5)])
        writer([record(T0 + 5)])
    assert store.count_rows() == 3
    assert store.totals()["received"] == 6
    lines = [r.getMessage() for r in caplog.records if "retention" in r.getMessage()]
    assert len(lines) == 2 and "pruned 2 " in lines[0] and "pruned 1 " in lines[1]
    store.close()
