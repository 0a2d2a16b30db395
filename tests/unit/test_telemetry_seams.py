"""The telemetry publisher's seams (iotref.device.telemetry.seams): the publisher works with
any message store and connection that keep the Protocols' contracts, and the stores that
ship (the SQLite outbox, the fleet's memory outbox) keep the MessageStore contract."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from iotref.device.telemetry.messages import to_json
from iotref.device.telemetry.outbox import Outbox
from iotref.device.telemetry.outbox_errors import OutboxFull
from iotref.device.telemetry.outbox_records import (
    AppendResult,
    Durability,
    OutboxEntry,
    OutboxStats,
    PendingMessage,
)
from iotref.device.telemetry.publisher import Telemetry
from iotref.device.telemetry.seams import MessageStore
from iotref.fleet.memory_outbox import MemoryOutbox
from tests.support.telemetry_fakes import FakeConnection, counter_of, message, settle

TOPIC = "telemetry/org-1/client-1"


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


class ListStore:
    """A MessageStore in memory, as small as the contract allows: a dict in ``seq`` order,
    an optional capacity (``reject_new``), and a log of the store calls."""

    def __init__(self, durability: Durability = "process", capacity: int | None = None) -> None:
        self.durability: Durability = durability
        self.capacity = capacity
        self.rows: dict[int, tuple[str, bytes]] = {}
        self.refused: dict[int, str] = {}
        self.attempts: dict[int, int] = {}
        self.calls: list[tuple[str, int]] = []
        self.last_seq = 0
        self.acked = 0
        self.closed = False

    @property
    def depth(self) -> int:
        return len(self.rows)

    pending_acks = 0

    def append(self, topic: str, payload: bytes, message_id: str | None = None) -> AppendResult:
        self.calls.append(("append", 1))
        return self._store(topic, payload)

    def _store(self, topic: str, payload: bytes) -> AppendResult:
        if self.capacity is not None and len(self.rows) >= self.capacity:
            raise OutboxFull("full", depth=len(self.rows), size=0)
        self.last_seq += 1
        self.rows[self.last_seq] = (topic, payload)
        return AppendResult(self.last_seq)

    def append_many(self, entries: Sequence[OutboxEntry]) -> list[AppendResult]:
        self.calls.append(("append_many", len(entries)))
        if self.capacity is not None and len(self.rows) + len(entries) > self.capacity:
            raise OutboxFull("full", depth=len(self.rows), size=0)
        return [self._store(e.topic, e.payload) for e in entries]

    def append_each(self, entries: Sequence[OutboxEntry]) -> list[AppendResult | OutboxFull]:
        self.calls.append(("append_each", len(entries)))
        outcomes: list[AppendResult | OutboxFull] = []
        for e in entries:
            try:
                outcomes.append(self._store(e.topic, e.payload))
            except OutboxFull as exc:
                outcomes.append(exc)
        return outcomes

    def read_pending(self, after_seq: int = 0, limit: int = 500) -> list[PendingMessage]:
        seqs = [seq for seq in self.rows if seq > after_seq][:limit]
        return [(seq, *self.rows[seq]) for seq in seqs]

    def mark_attempted(self, first_seq: int, last_seq: int) -> None:
        for seq in range(first_seq, last_seq + 1):
            self.attempts[seq] = self.attempts.get(seq, 0) + 1

    def ack(self, seq: int) -> None:
        if self.rows.pop(seq, None) is not None:
            self.acked += 1

    def flush_acks(self) -> int:
        return 0

    def refuse(self, seq: int, reason: str) -> bool:
        if self.rows.pop(seq, None) is None:
            return False
        self.refused[seq] = reason
        return True

    def stats(self) -> OutboxStats:
        return OutboxStats(
            depth=len(self.rows),
            bytes=sum(len(t) + len(p) for t, p in self.rows.values()),
            oldest_age_s=None,
            oldest_seq=next(iter(self.rows), None),
            max_messages=self.capacity or 1 << 62,
            max_bytes=1 << 62,
            overflow="reject_new",
            durability=self.durability,
            accepted=self.last_seq,
            acked=self.acked,
            dropped_overflow=0,
            rejected=0,
            ack_rate=0.0,
            refused=len(self.refused),
        )

    def close(self) -> None:
        self.closed = True


def _as_store(store: ListStore) -> MessageStore:
    return store  # the publisher sees it as the Protocol, nothing more


def stored_counters(store: ListStore) -> list[int]:
    return [counter_of(payload) for _, payload in store.rows.values()]


# --------------------------------------------------------------------------- the publisher


def test_the_publisher_drains_a_backlog_and_new_sends_from_any_store() -> None:
    store = ListStore()
    for i in range(3):  # an earlier run's backlog
        store.append(TOPIC, to_json(message(i)))

    async def main() -> None:
        conn = FakeConnection(auto_ack=True)
        async with Telemetry(conn, _as_store(store), TOPIC) as tel:
            for i in range(3, 8):
                assert (await tel.send(message(i))).queued
            await settle(lambda: store.depth == 0)
            stats = tel.stats()
        assert conn.counters() == list(range(8))  # the backlog first, all in order
        assert store.acked == 8 and stats.delivered == 8 and stats.queued == 5
        assert conn.callbacks == []  # close() unregistered from the connection

    run(main())


def test_concurrent_sends_share_commits_through_the_stores_append_each() -> None:
    store = ListStore(durability="power")  # a commit is dear: concurrent sends are grouped

    async def sender(tel: Telemetry, base: int) -> None:
        for i in range(10):
            await tel.send(message(base + i))

    async def main() -> None:
        async with Telemetry(FakeConnection(), _as_store(store), TOPIC, close_timeout=0.1) as tel:
            await asyncio.gather(*(sender(tel, 100 * k) for k in range(4)))
            assert tel.stats().queued == 40

    run(main())
    groups = [n for call, n in store.calls if call == "append_each"]
    assert groups and max(groups) > 1  # several sends in one commit
    assert sum(groups) + store.calls.count(("append", 1)) == 40
    counters = stored_counters(store)
    assert sorted(counters) == sorted(100 * k + i for k in range(4) for i in range(10))
    for k in range(4):  # each sender's messages stored in its order
        mine = [c for c in counters if c // 100 == k]
        assert mine == sorted(mine)


def test_a_store_that_is_full_refuses_the_send_and_keeps_what_it_has() -> None:
    store = ListStore(capacity=2)

    async def main() -> None:
        async with Telemetry(FakeConnection(), _as_store(store), TOPIC, close_timeout=0.1) as tel:
            await tel.send(message(0))
            await tel.send(message(1))
            with pytest.raises(OutboxFull):
                await tel.send(message(2))
            with pytest.raises(OutboxFull):  # send_many: all or nothing
                await tel.send_many([message(3)])
            assert tel.stats().queued == 2

    run(main())
    assert stored_counters(store) == [0, 1]


class Refusal(Exception):
    reason_code = 0x87  # NOT_AUTHORIZED: refused for good


def test_a_message_refused_for_good_leaves_through_the_stores_refuse() -> None:
    store = ListStore()

    async def main() -> None:
        conn = FakeConnection()
        async with Telemetry(conn, _as_store(store), TOPIC) as tel:
            for i in range(3):
                await tel.send(message(i))
            await settle(lambda: len(conn.published) == 3)
            conn.fail_all(Refusal("PUBACK NOT_AUTHORIZED (0x87)"))
            await settle(lambda: store.depth == 0)
            assert tel.stats().refused == 3

    run(main())
    assert sorted(store.refused) == [1, 2, 3] and store.acked == 0
    assert all("0x87" in reason for reason in store.refused.values())


def test_republished_messages_are_counted_as_attempts_in_the_store() -> None:
    store = ListStore()

    async def main() -> None:
        conn = FakeConnection()
        async with Telemetry(conn, _as_store(store), TOPIC) as tel:
            for i in range(3):
                await tel.send(message(i))
            await settle(lambda: conn.in_flight == 3)
            conn.drop()  # fails what is in flight
            await conn.reconnect()
            await settle(lambda: conn.in_flight == 3)
            conn.ack_all()
            await settle(lambda: store.depth == 0)

    run(main())
    assert store.attempts == {1: 1, 2: 1, 3: 1}  # each re-published once


class Pace:
    """A PublishPace the test refills: ``ready()`` is what is left; the fake connection's
    publishes spend it, as the real connection charges its limiter."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.asked = 0

    def ready(self) -> int:
        self.asked += 1
        return self.tokens

    def delay(self) -> float:
        return 0.002

    def byte_room(self) -> float:
        return math.inf


class PacedConnection(FakeConnection):
    def publish_future(self, topic: str, payload: bytes, qos: int = 1) -> asyncio.Future[None]:
        pace = self.rate_limiter
        assert isinstance(pace, Pace) and pace.tokens > 0, "published over the pace"
        pace.tokens -= 1
        return super().publish_future(topic, payload, qos)


def test_the_publisher_publishes_only_what_the_connections_pace_lets_go() -> None:
    pace = Pace(tokens=3)
    store = ListStore()

    async def main() -> None:
        conn = PacedConnection(auto_ack=True, pace=pace)
        async with Telemetry(conn, _as_store(store), TOPIC) as tel:
            for i in range(10):
                await tel.send(message(i))
            await settle(lambda: len(conn.published) == 3)
            await asyncio.sleep(0.05)  # the drainer waits for the pace, not publishing
            assert len(conn.published) == 3 and store.depth == 7 and pace.asked > 1
            pace.tokens = 7
            await settle(lambda: store.depth == 0)
        assert conn.counters() == list(range(10))

    run(main())


# --------------------------------------------------------------------------- the contract

StoreFactory = Callable[[Path], Any]


def _sqlite_outbox(tmp_path: Path) -> Outbox:
    return Outbox(tmp_path / "outbox.sqlite3", ack_batch=1000)  # acks stay buffered


STORES: dict[str, StoreFactory] = {
    "sqlite-outbox": _sqlite_outbox,
    "fleet-memory-outbox": lambda _: MemoryOutbox(),
    "list-store": lambda _: ListStore(),
}


@pytest.fixture(params=sorted(STORES))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MessageStore]:
    made: MessageStore = STORES[request.param](tmp_path)
    yield made
    made.close()


def entries(*payloads: bytes) -> list[OutboxEntry]:
    return [OutboxEntry(TOPIC, p) for p in payloads]


def test_appends_number_strictly_upwards_and_read_back_in_order(store: MessageStore) -> None:
    one = store.append(TOPIC, b"a")
    many = store.append_many(entries(b"b", b"c"))
    each = store.append_each(entries(b"d", b"e"))
    seqs = [one.seq] + [r.seq for r in many] + [r.seq for r in each if isinstance(r, AppendResult)]
    assert seqs == sorted(set(seqs)) and len(seqs) == 5
    assert store.read_pending(0, 10) == [
        (seq, TOPIC, p) for seq, p in zip(seqs, [b"a", b"b", b"c", b"d", b"e"], strict=True)
    ]
    assert store.read_pending(seqs[1], 2) == [(seqs[2], TOPIC, b"c"), (seqs[3], TOPIC, b"d")]
    assert store.depth == 5


def test_an_acknowledged_message_is_never_read_back_even_before_the_flush(
    store: MessageStore,
) -> None:
    seqs = [r.seq for r in store.append_many(entries(b"a", b"b", b"c"))]
    store.ack(seqs[1])
    store.ack(10_000)  # unknown: nothing happens
    assert [row[0] for row in store.read_pending(0, 10)] == [seqs[0], seqs[2]]
    store.flush_acks()
    assert store.pending_acks == 0 and store.depth == 2
    assert store.append(TOPIC, b"d").seq > seqs[2]  # numbers are never reused


def test_a_refused_message_leaves_the_queue_once(store: MessageStore) -> None:
    seqs = [r.seq for r in store.append_many(entries(b"a", b"b"))]
    store.mark_attempted(seqs[0], seqs[1])
    assert store.refuse(seqs[0], "0x87 NOT_AUTHORIZED") is True
    assert store.refuse(seqs[0], "again") is False
    store.ack(seqs[1])
    assert store.refuse(seqs[1], "acknowledged meanwhile") is False
    assert store.read_pending(0, 10) == []
    assert store.stats().refused == 1


def test_closed_is_said_after_close(store: MessageStore) -> None:
    assert store.closed is False
    store.close()
    assert store.closed is True
