"""The durable outbox: order, acks, bounds and overflow policies, durability across a
SIGKILL, and (property-based) that any interleaving of appends and acks keeps order and
loses nothing."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from iotref.device.telemetry.outbox import Outbox
from iotref.device.telemetry.outbox_errors import OutboxClosed, OutboxFull, OutboxLocked
from iotref.device.telemetry.outbox_records import OutboxEntry

TOPIC = "t/org/client"


def payloads(outbox: Outbox) -> list[bytes]:
    return [r.payload for r in outbox.read_batch(0, 1_000_000)]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "outbox.sqlite3"


def test_append_read_in_order_and_ack_out_of_order(db_path: Path) -> None:
    with Outbox(db_path) as ob:
        seqs = [ob.append(TOPIC, f"m{i}".encode(), f"id{i}").seq for i in range(10)]
        assert seqs == sorted(seqs) and len(set(seqs)) == 10
        batch = ob.read_batch(0, 4)
        assert [r.payload for r in batch] == [b"m0", b"m1", b"m2", b"m3"]
        assert batch[0].topic == TOPIC and batch[0].message_id == "id0"
        assert [r.seq for r in ob.read_batch(batch[-1].seq, 100)] == seqs[4:]
        for seq in (seqs[5], seqs[0], seqs[9], seqs[2]):
            ob.ack(seq)
        # Buffered acks are already invisible to readers.
        assert payloads(ob) == [b"m1", b"m3", b"m4", b"m6", b"m7", b"m8"]
        assert ob.depth == 6
        stats = ob.stats()
        assert stats.accepted == 10 and stats.acked == 4
        assert stats.bytes == sum(len(p) + len(TOPIC) for p in payloads(ob))


def test_rows_survive_reopen_and_seq_keeps_growing(db_path: Path) -> None:
    with Outbox(db_path) as ob:
        first = [ob.append(TOPIC, b"a").seq, ob.append(TOPIC, b"b").seq]
        ob.ack(first[0])
    with Outbox(db_path) as ob:
        assert payloads(ob) == [b"b"]
        assert ob.depth == 1 and ob.stats().bytes == 1 + len(TOPIC)
        assert ob.append(TOPIC, b"c").seq > first[1]
        assert payloads(ob) == [b"b", b"c"]


def test_seq_never_reused_within_a_process_even_when_empty(db_path: Path) -> None:
    with Outbox(db_path) as ob:
        a = ob.append(TOPIC, b"a").seq
        ob.ack(a)
        ob.flush_acks()
        assert ob.depth == 0
        b = ob.append(TOPIC, b"b").seq
        assert b > a
        ob.ack(a)  # a late duplicate PUBACK of the old message
        assert payloads(ob) == [b"b"]


def test_wal_mode_and_synchronous_levels(tmp_path: Path) -> None:
    for durability, level in (("process", 1), ("power", 2)):
        path = tmp_path / f"{durability}.sqlite3"
        with Outbox(path, durability=durability) as ob:  # type: ignore[arg-type]
            db = ob._conn()
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert db.execute("PRAGMA synchronous").fetchone()[0] == level
        with sqlite3.connect(path) as other:
            assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_new_outbox_has_8k_pages_and_an_existing_one_keeps_its_own(tmp_path: Path) -> None:
    with Outbox(tmp_path / "new.sqlite3") as ob:
        assert ob._conn().execute("PRAGMA page_size").fetchone()[0] == 8192
    old = tmp_path / "old.sqlite3"
    with sqlite3.connect(old) as db:  # an outbox made with SQLite's default pages
        db.execute("PRAGMA page_size=4096")
        db.execute("PRAGMA journal_mode=WAL")
    with Outbox(old) as ob:
        ob.append(TOPIC, b"kept")
    with Outbox(old) as ob:
        assert ob._conn().execute("PRAGMA page_size").fetchone()[0] == 4096
        assert payloads(ob) == [b"kept"]


def test_second_owner_is_refused(db_path: Path) -> None:
    with Outbox(db_path), pytest.raises(OutboxLocked):
        Outbox(db_path)
    Outbox(db_path).close()  # free again after close


def test_closed_outbox_refuses_work(db_path: Path) -> None:
    ob = Outbox(db_path)
    ob.close()
    ob.close()
    with pytest.raises(OutboxClosed):
        ob.append(TOPIC, b"x")


def test_reject_new_by_count(db_path: Path) -> None:
    with Outbox(db_path, max_messages=3) as ob:
        for i in range(3):
            ob.append(TOPIC, bytes([i]))
        with pytest.raises(OutboxFull) as info:
            ob.append(TOPIC, b"new")
        assert info.value.depth == 3
        assert payloads(ob) == [b"\x00", b"\x01", b"\x02"]
        stats = ob.stats()
        assert stats.rejected == 1 and stats.accepted == 3 and stats.dropped_overflow == 0
        # An ack makes room again (even before its batch is written).
        ob.ack(ob.read_batch(0, 1)[0].seq)
        ob.append(TOPIC, b"new")
        assert payloads(ob) == [b"\x01", b"\x02", b"new"]


def test_reject_new_by_bytes(db_path: Path) -> None:
    size = 100 + len(TOPIC)
    with Outbox(db_path, max_bytes=3 * size) as ob:
        for _ in range(3):
            ob.append(TOPIC, b"x" * 100)
        with pytest.raises(OutboxFull):
            ob.append(TOPIC, b"y")
        assert ob.stats().bytes == 3 * size


def test_drop_oldest_by_count_and_bytes(db_path: Path) -> None:
    size = 10 + len(TOPIC)
    with Outbox(db_path, max_messages=5, max_bytes=4 * size, overflow="drop_oldest") as ob:
        results = [ob.append(TOPIC, f"{i:010d}".encode()) for i in range(4)]
        assert all(r.dropped == 0 for r in results)
        r = ob.append(TOPIC, b"4444444444")  # bytes bound: one must go
        assert r.dropped == 1
        assert payloads(ob)[0] == b"0000000001"
        r = ob.append(TOPIC, b"x" * (10 + 2 * size))  # needs the room of three
        assert r.dropped == 3
        assert payloads(ob) == [b"4444444444", b"x" * (10 + 2 * size)]
        stats = ob.stats()
        assert stats.dropped_overflow == 4 and stats.rejected == 0
        assert stats.bytes <= 4 * size


def test_message_larger_than_the_outbox_is_always_refused(db_path: Path) -> None:
    with Outbox(db_path, max_bytes=50, overflow="drop_oldest") as ob:
        ob.append(TOPIC, b"small")
        with pytest.raises(OutboxFull):
            ob.append(TOPIC, b"x" * 100)
        assert payloads(ob) == [b"small"]


def test_append_many_is_all_or_nothing(db_path: Path) -> None:
    with Outbox(db_path, max_messages=5) as ob:
        got = ob.append_many([OutboxEntry(TOPIC, f"{i}".encode(), f"u{i}") for i in range(4)])
        assert [g.seq for g in got] == list(range(got[0].seq, got[0].seq + 4))
        with pytest.raises(OutboxFull):
            ob.append_many([OutboxEntry(TOPIC, b"a"), OutboxEntry(TOPIC, b"b")])
        assert payloads(ob) == [b"0", b"1", b"2", b"3"]
        assert ob.append_many([]) == []


def test_append_each_commits_a_fitting_group_in_one_transaction(db_path: Path) -> None:
    with Outbox(db_path, max_messages=10) as ob:
        ob.append(TOPIC, b"first")
        got = ob.append_each([OutboxEntry(TOPIC, b"%d" % i, f"u{i}") for i in range(4)])
        assert [type(g).__name__ for g in got] == ["AppendResult"] * 4
        seqs = [g.seq for g in got if not isinstance(g, OutboxFull)]
        assert seqs == list(range(seqs[0], seqs[0] + 4)) and seqs[0] == ob.last_seq - 3
        assert all(not isinstance(g, OutboxFull) and g.dropped == 0 for g in got)
        assert payloads(ob) == [b"first", b"0", b"1", b"2", b"3"]
        assert [r.message_id for r in ob.read_batch(0, 10)][1:] == ["u0", "u1", "u2", "u3"]
        stats = ob.stats()
        assert stats.depth == 5 and stats.accepted == 5 and stats.rejected == 0
        assert ob.append_each([]) == []


def test_append_each_that_does_not_fit_behaves_like_appends_one_by_one(db_path: Path) -> None:
    with Outbox(db_path, max_messages=3) as ob:
        ob.append(TOPIC, b"a")
        got = ob.append_each([OutboxEntry(TOPIC, b"%d" % i) for i in range(4)])
        assert [isinstance(g, OutboxFull) for g in got] == [False, False, True, True]
        assert payloads(ob) == [b"a", b"0", b"1"]
        stats = ob.stats()
        assert stats.accepted == 3 and stats.rejected == 2  # counted once each
    size = 1 + len(TOPIC)
    with Outbox(db_path.with_name("drop.sqlite3"), max_messages=3, overflow="drop_oldest") as ob:
        for i in range(3):
            ob.append(TOPIC, b"%d" % i)
        got = ob.append_each([OutboxEntry(TOPIC, b"x"), OutboxEntry(TOPIC, b"y")])
        # Each message evicted the one it needed room for, as separate appends would.
        assert [g.dropped for g in got if not isinstance(g, OutboxFull)] == [1, 1]
        assert payloads(ob) == [b"2", b"x", b"y"]
        assert ob.stats().bytes == 3 * size and ob.stats().dropped_overflow == 2
    ob.close()
    with pytest.raises(OutboxClosed):
        ob.append_each([OutboxEntry(TOPIC, b"z")])


def test_mark_attempted_and_stats_age(db_path: Path) -> None:
    now = [1000.0]
    with Outbox(db_path, clock=lambda: now[0]) as ob:
        a = ob.append(TOPIC, b"a").seq
        b = ob.append(TOPIC, b"b").seq
        ob.mark_attempted(a, b)
        ob.mark_attempted(b, b)
        assert [r.attempts for r in ob.read_batch()] == [1, 2]
        now[0] += 42.5
        stats = ob.stats()
        assert stats.oldest_age_s == pytest.approx(42.5)
        assert stats.oldest_seq == a
        ob.ack_many([a, b])
        stats = ob.stats()
        assert stats.depth == 0 and stats.oldest_age_s is None
        assert stats.ack_rate > 0


def test_acks_are_batched(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite3", ack_batch=3) as ob:
        seqs = [ob.append(TOPIC, b"p").seq for _ in range(5)]
        ob.ack(seqs[0])
        ob.ack(seqs[1])
        assert ob.pending_acks == 2
        ob.ack(seqs[2])
        assert ob.pending_acks == 0  # the third one wrote the batch
        ob.ack(seqs[3])
    with Outbox(tmp_path / "o.sqlite3") as ob:  # close() wrote the buffered ack
        assert [r.seq for r in ob.read_batch()] == [seqs[4]]


def test_read_pending_gives_bare_rows_and_skips_acked_ones(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite3", ack_batch=100) as ob:
        seqs = [ob.append(TOPIC, b"m%d" % i).seq for i in range(8)]
        assert ob.read_pending(0, 3) == [(s, TOPIC, b"m%d" % i) for i, s in enumerate(seqs[:3])]
        # Acked but not yet deleted, after the cursor: skipped, and the limit still filled.
        ob.ack(seqs[3])
        ob.ack(seqs[5])
        assert ob.pending_acks == 2
        assert [row[0] for row in ob.read_pending(seqs[2], 3)] == [seqs[4], seqs[6], seqs[7]]
        assert [row[0] for row in ob.read_pending(seqs[6], 10)] == [seqs[7]]


def test_acks_in_any_order_delete_exactly_the_acked_rows(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite3", ack_batch=1000) as ob:
        seqs = [ob.append(TOPIC, b"m%d" % i).seq for i in range(20)]
        acked = [seqs[i] for i in (7, 0, 1, 2, 19, 9, 10, 8, 15, 3)]
        for seq in acked:  # runs 0-3, 7-10, 15 and 19, acked out of order
            ob.ack(seq)
        ob.ack(seqs[1])  # twice
        assert ob.flush_acks() == len(acked)
        ob.ack(seqs[2])  # again, after its row is gone: nothing else goes with it
        ob.ack(seqs[4])
        assert ob.flush_acks() == 1
        left = [s for s in seqs if s not in acked and s != seqs[4]]
        assert [r.seq for r in ob.read_batch(0, 100)] == left
        stats = ob.stats()
        assert stats.depth == len(left) and stats.acked == len(acked) + 1
        assert stats.bytes == sum(len(p) + len(TOPIC) for p in payloads(ob))


_CRASH_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from iotref.device.telemetry.outbox import Outbox, OutboxEntry
    path, durability, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ob = Outbox(path, durability=durability)
    for i in range(n):
        ob.append("t/o/c", b"%d" % i, "id%d" % i)
    ob.append_many([OutboxEntry("t/o/c", b"many%d" % i) for i in range(3)])
    for rec in ob.read_batch(0, 10):
        ob.ack(rec.seq)
    ob.flush_acks()
    ob.ack(ob.read_batch(0, 1)[0].seq)   # buffered, never written: re-published later
    print("appended", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.parametrize("durability", ["process", "power"])
def test_accepted_messages_survive_sigkill(tmp_path: Path, durability: str) -> None:
    path = tmp_path / "outbox.sqlite3"
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH_SCRIPT, str(path), durability, "200"],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == -9, proc.stderr
    assert proc.stdout.strip() == b"appended"
    with Outbox(path) as ob:
        got = payloads(ob)
    # 10 acked and written; the 11th ack was only buffered: it is still there.
    assert got == [b"%d" % i for i in range(10, 200)] + [b"many0", b"many1", b"many2"]


class OutboxMachine(RuleBasedStateMachine):
    """Appends, acks in any order, ack flushes, batched reads and reopenings, against a
    model: what is read back is always exactly the unacknowledged messages in order."""

    def __init__(self) -> None:
        super().__init__()
        self.dir: Path | None = None
        self.ob: Outbox | None = None
        self.model: dict[int, bytes] = {}
        self.counter = 0

    @initialize(tmp=st.just(None))
    def setup(self, tmp: None) -> None:
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="outbox-prop-"))
        self.ob = Outbox(self.dir / "o.sqlite3", ack_batch=4, max_messages=40)

    @rule(n=st.integers(1, 5))
    def append(self, n: int) -> None:
        assert self.ob is not None
        for _ in range(n):
            payload = b"%d" % self.counter
            self.counter += 1
            try:
                seq = self.ob.append(TOPIC, payload).seq
            except OutboxFull:
                assert len(self.model) + 1 > 40
                continue
            assert all(seq > s for s in self.model)
            self.model[seq] = payload

    @rule(n=st.integers(2, 6))
    def append_many(self, n: int) -> None:
        assert self.ob is not None
        entries = [OutboxEntry(TOPIC, b"m%d" % (self.counter + i)) for i in range(n)]
        self.counter += n
        try:
            results = self.ob.append_many(entries)
        except OutboxFull:
            assert len(self.model) + n > 40
            return
        for r, e in zip(results, entries, strict=True):
            self.model[r.seq] = e.payload

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def ack_some(self, data: st.DataObject) -> None:
        assert self.ob is not None
        seqs = data.draw(st.lists(st.sampled_from(sorted(self.model)), min_size=1, max_size=8))
        for seq in seqs:  # duplicates and any order allowed
            self.ob.ack(seq)
            self.model.pop(seq, None)

    @rule()
    def flush(self) -> None:
        assert self.ob is not None
        self.ob.flush_acks()

    @rule()
    def reopen(self) -> None:
        assert self.ob is not None and self.dir is not None
        self.ob.close()
        self.ob = Outbox(self.dir / "o.sqlite3", ack_batch=4, max_messages=40)

    @rule(after=st.integers(0, 5), limit=st.integers(1, 10))
    def read_window(self, after: int, limit: int) -> None:
        assert self.ob is not None
        expected = sorted(self.model)
        start = expected[after] if after < len(expected) else (expected[-1] if expected else 0)
        got = self.ob.read_batch(start, limit)
        assert [r.seq for r in got] == [s for s in expected if s > start][:limit]
        assert self.ob.read_pending(start, limit) == [(r.seq, r.topic, r.payload) for r in got]

    @invariant()
    def everything_in_order(self) -> None:
        if self.ob is None:
            return
        got = self.ob.read_batch(0, 10_000)
        assert [(r.seq, r.payload) for r in got] == sorted(self.model.items())
        assert self.ob.depth == len(self.model)

    def teardown(self) -> None:
        if self.ob is not None:
            self.ob.close()
        if self.dir is not None:
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)


TestOutboxProperties = OutboxMachine.TestCase
TestOutboxProperties.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
