"""The telemetry publisher over a fake connection: validation before queueing, the
in-flight window, strict order, re-publishing after reconnects and failures, permission
gating under both policies, overflow reporting and a bounded close."""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from iotref.device import stdlib_compat
from iotref.device.telemetry import group_commit
from iotref.device.telemetry import publisher as telemetry_module
from iotref.device.telemetry.messages import (
    to_json,
)
from iotref.device.telemetry.outbox import Outbox
from iotref.device.telemetry.outbox_errors import OutboxFull
from iotref.device.telemetry.outbox_records import AppendResult, OutboxEntry
from iotref.device.telemetry.permission import PermissionFlag
from iotref.device.telemetry.publisher import Telemetry
from iotref.device.telemetry.results import MessageTooLarge, SendStatus, TelemetryClosed
from iotref.device.telemetry.wakeup import Wakeup
from iotref.protocol.message_schemas import InvalidMessage
from tests.support.telemetry_fakes import (
    FakeConnection,
    PublishFailed,
    counter_of,
    message,
    settle,
)

T = TypeVar("T")
TOPIC = "telemetry/org-1/client-1"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30))


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    ob = Outbox(tmp_path / "outbox.sqlite3")
    yield ob
    ob.close()


def test_send_validates_stores_publishes_and_removes_on_ack(outbox: Outbox) -> None:
    async def main() -> None:
        conn = FakeConnection()
        async with Telemetry(conn, outbox, TOPIC) as tel:
            result = await tel.send(message(1))
            assert result.status is SendStatus.QUEUED and result.queued and result.seq
            await settle(lambda: len(conn.published) == 1)
            topic, payload = conn.published[0]
            assert topic == TOPIC
            assert b" " not in payload and json.loads(payload) == message_like(payload)
            assert outbox.depth == 1  # not removed before the PUBACK
            conn.ack_all()
            await settle(lambda: outbox.depth == 0)
            stats = tel.stats()
            assert (stats.queued, stats.published, stats.acked) == (1, 1, 1)

    run(main())


def message_like(payload: bytes) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(payload)
    assert decoded["headerversion"] == 3
    return decoded


def test_invalid_message_is_refused_before_queueing(outbox: Outbox) -> None:
    async def main() -> None:
        conn = FakeConnection()
        async with Telemetry(conn, outbox, TOPIC) as tel:
            bad = message(1)
            bad["payload"]["signalstatus"]["deviceinfo"]["status"] = "Bogus"
            with pytest.raises(InvalidMessage) as info:
                await tel.send(bad)
            assert "$.payload.signalstatus.deviceinfo.status" in str(info.value)
            bad2 = message(2)
            del bad2["assetid"]
            with pytest.raises(InvalidMessage):
                await tel.send(bad2)
            assert outbox.depth == 0 and conn.published == []
            assert tel.stats().rejected_invalid == 2

    run(main())


def test_window_bounds_in_flight_and_order_is_strict(outbox: Outbox) -> None:
    async def main() -> None:
        conn = FakeConnection()
        async with Telemetry(conn, outbox, TOPIC, window=100, batch=32) as tel:
            for i in range(350):
                await tel.send(message(i))
            await settle(lambda: len(conn.published) == 100)
            await asyncio.sleep(0.01)
            assert len(conn.published) == 100 and tel.in_flight == 100
            # Acks in any order free room; the window never overflows.
            conn.ack(*range(99, 59, -1))
            await settle(lambda: len(conn.published) >= 130)
            assert tel.in_flight <= 100
            while len(conn.published) < 350 or conn.in_flight:
                conn.ack_all()
                assert tel.in_flight <= 100
                await asyncio.sleep(0.001)
            await settle(lambda: outbox.depth == 0)
            assert conn.counters() == list(range(350))

    run(main())


def first_occurrences(values: list[int]) -> list[int]:
    seen: set[int] = set()
    out = []
    for v in values:
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def test_reconnect_republishes_everything_unacked_in_order(outbox: Outbox) -> None:
    async def main() -> None:
        conn = FakeConnection()
        async with Telemetry(conn, outbox, TOPIC, window=100, batch=16) as tel:
            for i in range(40):
                await tel.send(message(i))
            await settle(lambda: len(conn.published) == 40)
            conn.ack(3, 0, 1, 7, 2)  # out of order; 4..6 and 8.. unacked
            await asyncio.sleep(0)
            conn.drop()
            for i in range(40, 60):  # sends while offline are stored
                await tel.send(message(i))
            await asyncio.sleep(0.01)
            assert len(conn.published) == 40
            before = len(conn.published)
            await conn.reconnect()
            await settle(lambda: len(conn.published) >= before + 55)
            again = conn.counters()[before:]
            assert again == [4, 5, 6, *range(8, 60)]
            while conn.in_flight or outbox.depth:
                conn.ack_all()
                await asyncio.sleep(0.001)
            assert first_occurrences(conn.counters()) == list(range(60))
            stats = tel.stats()
            assert stats.republished == 35 and stats.failed >= 1 and stats.depth == 0

    run(main())


def test_reconnect_with_pending_futures_republishes_and_late_acks_still_count(
    outbox: Outbox,
) -> None:
    async def main() -> None:
        conn = FakeConnection()
        async with Telemetry(conn, outbox, TOPIC, window=10) as tel:
            for i in range(5):
                await tel.send(message(i))
            await settle(lambda: len(conn.published) == 5)
            old = list(conn.pending)
            await conn.reconnect(session_present=True)  # no failure reported
            await settle(lambda: len(conn.published) == 10)
            assert conn.counters() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
            for _, fut in old:  # the old session's PUBACKs arrive after all
                fut.set_result(None)
            await settle(lambda: outbox.depth == 0)
            conn.ack_all()
            await asyncio.sleep(0.01)
            assert outbox.depth == 0 and tel.stats().acked == 10

    run(main())


def test_failure_while_connected_backs_off_and_retries(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(telemetry_module, "_RETRY_MIN_S", 0.05)

    async def main() -> None:
        conn = FakeConnection()
        async with Telemetry(conn, outbox, TOPIC) as tel:
            for i in range(3):
                await tel.send(message(i))
            await settle(lambda: len(conn.published) == 3)
            conn.fail_all(PublishFailed("PUBACK reason code 0x87"))
            await asyncio.sleep(0.01)
            assert len(conn.published) == 3  # holding off
            await settle(lambda: len(conn.published) == 6)
            assert conn.counters()[3:] == [0, 1, 2]
            assert "0x87" in (tel.stats().last_error or "")
            conn.ack_all()
            await settle(lambda: outbox.depth == 0)

    run(main())


def test_permission_hold_keeps_messages_and_publishes_when_granted(outbox: Outbox) -> None:
    async def main() -> None:
        conn = FakeConnection(auto_ack=True)
        flag = PermissionFlag(False)
        async with Telemetry(conn, outbox, TOPIC, permission=flag) as tel:
            results = [await tel.send(message(i)) for i in range(20)]
            assert all(r.status is SendStatus.QUEUED for r in results)
            await asyncio.sleep(0.02)
            assert conn.published == [] and outbox.depth == 20
            assert tel.stats().permission is False
            flag.set(True)
            await settle(lambda: outbox.depth == 0)
            assert conn.counters() == list(range(20))

    run(main())


def test_permission_drop_discards_new_messages_and_says_so(outbox: Outbox) -> None:
    async def main() -> None:
        conn = FakeConnection()
        async with Telemetry(conn, outbox, TOPIC, policy="drop") as tel:
            tel.set_permission(False)
            for i in range(3):  # queued before: held, not dropped
                tel.set_permission(True)
                conn.connected = False
                assert (await tel.send(message(i))).queued
                conn.connected = True
                tel.set_permission(False)
            dropped = [await tel.send(message(i)) for i in range(3, 8)]
            assert all(r.status is SendStatus.DROPPED_NO_PERMISSION for r in dropped)
            assert all(r.seq is None for r in dropped)
            with pytest.raises(InvalidMessage):  # still validated first
                await tel.send({"nope": 1})
            await asyncio.sleep(0.02)
            assert conn.published == [] and outbox.depth == 3
            stats = tel.stats()
            assert stats.dropped_no_permission == 5 and stats.queued == 3
            conn.auto_ack = True
            tel.set_permission(True)
            await settle(lambda: outbox.depth == 0)
            assert conn.counters() == [0, 1, 2]
            assert (await tel.send(message(9))).queued

    run(main())


def test_permission_withdrawn_mid_stream_stops_publishing(outbox: Outbox) -> None:
    async def main() -> None:
        conn = FakeConnection()
        flag = PermissionFlag(True)
        async with Telemetry(conn, outbox, TOPIC, permission=flag, window=5) as tel:
            for i in range(20):
                await tel.send(message(i))
            await settle(lambda: len(conn.published) == 5)
            flag.set(False)
            conn.ack_all()
            await asyncio.sleep(0.02)
            assert len(conn.published) == 5 and outbox.depth == 15
            flag.set(True)
            while outbox.depth:
                conn.ack_all()
                await asyncio.sleep(0.001)
            assert conn.counters() == list(range(20))
            assert tel.stats().permission is True

    run(main())


def test_outbox_full_reject_new_raises_and_is_reported(tmp_path: Path) -> None:
    async def main() -> None:
        with Outbox(tmp_path / "o.sqlite3", max_messages=5) as ob:
            conn = FakeConnection(connected=False)
            async with Telemetry(conn, ob, TOPIC) as tel:
                for i in range(5):
                    await tel.send(message(i))
                msg = message(5)
                with pytest.raises(OutboxFull):
                    await tel.send(msg)
                stats = tel.stats()
                assert stats.rejected_full == 1 and stats.depth == 5
                assert stats.dropped_overflow == 0

    run(main())


def test_outbox_full_drop_oldest_reports_evictions(tmp_path: Path) -> None:
    async def main() -> None:
        with Outbox(tmp_path / "o.sqlite3", max_messages=5, overflow="drop_oldest") as ob:
            conn = FakeConnection(connected=False)
            async with Telemetry(conn, ob, TOPIC) as tel:
                results = [await tel.send(message(i)) for i in range(8)]
                assert [r.evicted for r in results] == [0] * 5 + [1, 1, 1]
                assert tel.stats().dropped_overflow == 3
                conn.auto_ack = True
                await conn.reconnect()
                await settle(lambda: ob.depth == 0)
                assert conn.counters() == [3, 4, 5, 6, 7]

    run(main())


def test_close_waits_for_in_flight_acks_bounded(outbox: Outbox) -> None:
    async def main() -> None:
        conn = FakeConnection()
        tel = Telemetry(conn, outbox, TOPIC)
        for i in range(4):
            await tel.send(message(i))
        await settle(lambda: len(conn.published) == 4)
        asyncio.get_running_loop().call_later(0.05, conn.ack_all)
        assert await tel.close(1.0) is True
        assert outbox.depth == 0
        with pytest.raises(TelemetryClosed):
            await tel.send(message(9))

        conn2 = FakeConnection()
        tel2 = Telemetry(conn2, outbox, TOPIC)
        for i in range(4):
            await tel2.send(message(i))
        await settle(lambda: len(conn2.published) == 4)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await tel2.close(0.1) is False  # never acked: left for the next run
        assert loop.time() - started < 1.0
        assert outbox.depth == 4

    run(main())


def test_close_drain_publishes_the_backlog(outbox: Outbox) -> None:
    async def main() -> None:
        conn = FakeConnection(auto_ack=True, connected=False)
        tel = Telemetry(conn, outbox, TOPIC)
        for i in range(30):
            await tel.send(message(i))
        await conn.reconnect()
        assert await tel.close(5.0, drain=True) is True
        assert outbox.depth == 0 and sorted(set(conn.counters())) == list(range(30))

    run(main())


def test_backlog_of_a_previous_run_is_published_first(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"

    async def first() -> None:
        with Outbox(path) as ob:
            tel = Telemetry(FakeConnection(connected=False), ob, TOPIC)
            for i in range(10):
                await tel.send(message(i))
            await tel.close(0.1)

    async def second() -> None:
        with Outbox(path) as ob:
            conn = FakeConnection(auto_ack=True)
            async with Telemetry(conn, ob, TOPIC) as tel:
                await tel.send(message(10))
                await settle(lambda: ob.depth == 0)
                assert conn.counters() == list(range(11))

    run(first())
    run(second())


def test_send_many_stores_in_one_go(outbox: Outbox) -> None:
    async def main() -> None:
        conn = FakeConnection(auto_ack=True)
        async with Telemetry(conn, outbox, TOPIC) as tel:
            results = await tel.send_many([message(i) for i in range(10)])
            assert [r.seq for r in results] == list(range(results[0].seq or 0, 11))
            bad = [message(10), {"x": 1}]
            with pytest.raises(InvalidMessage):
                await tel.send_many(bad)
            await settle(lambda: outbox.depth == 0)
            assert conn.counters() == list(range(10))

    run(main())


def test_set_permission_needs_the_default_flag(outbox: Outbox) -> None:
    tel = Telemetry(FakeConnection(), outbox, TOPIC, permission=PermissionFlag(True))
    tel.set_permission(False)
    assert tel.permission is False

    class Source:
        allowed = True

        def add_listener(self, cb: Callable[[bool], None]) -> None:
            pass

    tel2 = Telemetry(FakeConnection(), outbox, TOPIC, permission=Source())
    with pytest.raises(TypeError):
        tel2.set_permission(False)
    with pytest.raises(ValueError, match="policy"):
        Telemetry(FakeConnection(), outbox, TOPIC, policy="later")  # type: ignore[arg-type]


def test_drop_oldest_while_publishing_never_publishes_evicted_messages(tmp_path: Path) -> None:
    async def main() -> None:
        with Outbox(tmp_path / "o.sqlite3", max_messages=3, overflow="drop_oldest") as ob:
            conn = FakeConnection()
            async with Telemetry(conn, ob, TOPIC, window=1) as tel:
                await tel.send(message(0))
                await settle(lambda: len(conn.published) == 1)
                results = [await tel.send(message(i)) for i in range(1, 6)]
                assert [r.evicted for r in results] == [0, 0, 1, 1, 1]
                while ob.depth:
                    conn.ack_all()
                    await asyncio.sleep(0.001)
                # 0 was in flight when evicted; 1 and 2 were evicted before publishing.
                assert conn.counters() == [0, 3, 4, 5]
                assert tel.stats().dropped_overflow == 3

    run(main())


def test_permission_lost_in_the_middle_of_a_batch_keeps_order(outbox: Outbox) -> None:
    class Flaky:
        """Allowed for the first ``n`` checks, then withdrawn until re-granted."""

        def __init__(self, n: int) -> None:
            self.checks = 0
            self.n = n
            self.listeners: list[Callable[[bool], None]] = []

        @property
        def allowed(self) -> bool:
            self.checks += 1
            return self.checks <= self.n

        def add_listener(self, cb: Callable[[bool], None]) -> None:
            self.listeners.append(cb)

        def grant(self) -> None:
            self.n = 10**9
            for cb in self.listeners:
                cb(True)

    async def main() -> None:
        conn = FakeConnection(auto_ack=True)
        source = Flaky(5)
        async with Telemetry(conn, outbox, TOPIC, permission=source, window=100) as tel:
            await tel.send(message(0))  # lets the drainer find the outbox empty first
            await settle(lambda: outbox.depth == 0)
            for i in range(1, 40):
                await tel.send(message(i))
            await asyncio.sleep(0.02)
            assert 0 < len(conn.published) < 40
            source.grant()
            await settle(lambda: outbox.depth == 0)
            assert conn.counters() == list(range(40))

    run(main())


# --------------------------------------------------------------------------- fast paths


class CountingOutbox(Outbox):
    """Counts transactions: appends alone and group commits."""

    appends = 0
    groups: list[int]

    def append_each(self, entries: Sequence[OutboxEntry]) -> list[AppendResult | OutboxFull]:
        self.groups.append(len(entries))
        return super().append_each(entries)


@pytest.fixture
def counting(tmp_path: Path) -> Iterator[CountingOutbox]:
    ob = CountingOutbox(tmp_path / "counting.sqlite3", durability="power")
    ob.groups = []
    yield ob
    ob.close()


def test_concurrent_senders_share_commits_and_return_after_them(
    counting: CountingOutbox,
) -> None:
    async def sender(tel: Telemetry, base: int) -> list[int]:
        seqs = []
        for i in range(20):
            result = await tel.send(message(base + i))
            assert result.queued and result.seq is not None
            # Committed when send() returns: the row is stored.
            assert [r.seq for r in counting.read_batch(result.seq - 1, 1)] == [result.seq]
            seqs.append(result.seq)
        return seqs

    async def main() -> None:
        conn = FakeConnection(auto_ack=True)
        async with Telemetry(conn, counting, TOPIC) as tel:
            per_task = await asyncio.gather(*(sender(tel, 1000 * k) for k in range(5)))
            for seqs in per_task:
                assert seqs == sorted(seqs)  # each task's messages in its order
            everything = sorted(s for seqs in per_task for s in seqs)
            assert everything == list(range(everything[0], everything[0] + 100))
            # The first task sends alone until the second one shows up; from then on the
            # others' sends are committed together.
            grouped = sum(counting.groups)
            assert grouped >= 60 and max(counting.groups) >= 4
            assert len(counting.groups) + (100 - grouped) <= 45  # transactions, not 100
            await settle(lambda: counting.depth == 0)
            assert tel.stats().queued == 100
            # Publication order is seq order, and per task the order it sent in.
            counters = conn.counters()
            assert len(counters) == 100
            for k in range(5):
                mine = [c for c in counters if c // 1000 == k]
                assert mine == list(range(1000 * k, 1000 * k + 20))

    run(main())


def test_a_single_sender_stops_grouping_after_a_few_solo_commits(
    counting: CountingOutbox,
) -> None:
    async def main() -> None:
        conn = FakeConnection(auto_ack=True)
        async with Telemetry(conn, counting, TOPIC) as tel:
            await tel.send(message(0))  # this task: commits alone, right away
            await asyncio.create_task(tel.send(message(1)))  # another task: grouping on
            assert tel._group_commit is not None and tel._group_commit._grouping
            for i in range(2, 12):
                await tel.send(message(i))
            assert not tel._group_commit._grouping
            assert counting.groups == [1] * group_commit.SOLO_LIMIT
            assert tel.stats().queued == 12

    run(main())


def test_a_sender_cancelled_before_the_group_commit_is_not_stored(
    counting: CountingOutbox,
) -> None:
    async def main() -> None:
        conn = FakeConnection()
        async with Telemetry(conn, counting, TOPIC, close_timeout=0.1) as tel:
            await tel.send(message(0))
            task = asyncio.create_task(tel.send(message(1)))  # groups: another task
            other = asyncio.create_task(tel.send(message(2)))
            await asyncio.sleep(0)  # both wait for the commit that runs next
            task.cancel()
            assert (await other).queued
            with pytest.raises(asyncio.CancelledError):
                await task
            assert counting.groups == [1]
            assert [json.loads(r.payload)["payload"]["signalstatus"]["deviceinfo"]["speed"]
                    for r in counting.read_batch(0, 10)] == [0, 2]  # fmt: skip
            assert tel.stats().queued == 2

    run(main())


def test_a_group_that_does_not_fit_gets_the_outcomes_of_single_appends(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        ob = Outbox(tmp_path / "small.sqlite3", max_messages=3, durability="power")
        conn = FakeConnection()
        try:
            async with Telemetry(conn, ob, TOPIC, close_timeout=0.1) as tel:
                await tel.send(message(0))
                outcomes = await asyncio.gather(
                    *(asyncio.create_task(tel.send(message(i))) for i in range(1, 4)),
                    return_exceptions=True,
                )
                assert [type(o).__name__ for o in outcomes] == [
                    "SendResult",
                    "SendResult",
                    "OutboxFull",
                ]
                stats = tel.stats()
                assert stats.queued == 3 and stats.rejected_full == 1 and stats.depth == 3
        finally:
            ob.close()

    run(main())


def test_sends_are_not_grouped_with_process_durability(tmp_path: Path) -> None:
    class Counting(Outbox):
        groups = 0

        def append_each(self, entries: Sequence[OutboxEntry]) -> list[AppendResult | OutboxFull]:
            Counting.groups += 1
            return super().append_each(entries)

    async def main() -> None:
        ob = Counting(tmp_path / "process.sqlite3")
        try:
            async with Telemetry(FakeConnection(auto_ack=True), ob, TOPIC) as tel:
                results = await asyncio.gather(*(tel.send(message(i)) for i in range(10)))
                assert [r.seq for r in results] == list(range(1, 11))
                assert Counting.groups == 0 and tel._group_commit is None
        finally:
            ob.close()

    run(main())


def spy_on_read_pending(outbox: Outbox, monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Record the sequence numbers of every ``read_pending`` of ``outbox``."""
    reads: list[list[int]] = []
    read_pending = outbox.read_pending

    def spy(after_seq: int, limit: int) -> list[tuple[int, str, bytes]]:
        rows = read_pending(after_seq, limit)
        reads.append([row[0] for row in rows])
        return rows

    monkeypatch.setattr(outbox, "read_pending", spy)
    return reads


def test_a_rewind_with_a_full_memory_tail_republishes_everything_in_order(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The publisher stalls (no PUBACKs) while the sender runs far ahead: the memory tail
    fills up (``2 * window``) and later messages are only in the outbox; a reconnect then
    drops the tail and everything unacknowledged is read back from the oldest, in order."""
    reads = spy_on_read_pending(outbox, monkeypatch)

    async def main() -> None:
        conn = FakeConnection()
        async with Telemetry(conn, outbox, TOPIC, window=5, batch=5) as tel:
            await asyncio.sleep(0.01)  # the first read: empty, so the tail is all there is
            for i in range(40):
                await tel.send(message(i))
            await settle(lambda: tel.in_flight == 5)
            # At most 2 * window in memory, then the tail was full: the rest is stored only.
            assert tel._tail and len(tel._tail) <= 10 and not tel._tail_valid
            reads.clear()
            conn.drop()
            await conn.reconnect()
            while len(set(conn.counters())) < 40 or conn.in_flight:
                conn.ack_all()
                await asyncio.sleep(0.001)
            await settle(lambda: outbox.depth == 0)
            assert first_occurrences(conn.counters()) == list(range(40))
            assert conn.counters()[:5] == list(range(5))  # the first pass, never acked

    run(main())
    assert reads[0][0] == 1  # the rewind dropped the tail: read back from the oldest


def test_the_tail_is_published_before_the_rest_is_read_back(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = spy_on_read_pending(outbox, monkeypatch)

    async def main() -> None:
        conn = FakeConnection()
        async with Telemetry(conn, outbox, TOPIC, window=5, batch=5) as tel:
            await asyncio.sleep(0.01)  # the first read: empty, so the tail is all there is
            reads.clear()
            for i in range(40):  # no pause: the publisher falls behind by more than 10
                tel._since_yield = 0
                await tel.send(message(i))
            while len(conn.published) < 40 or conn.in_flight:
                conn.ack_all()
                await asyncio.sleep(0.001)
            assert conn.counters() == list(range(40))

    run(main())
    read_back = [seq for batch in reads for seq in batch]
    # What did not fit the memory tail was read from the outbox, each message once.
    assert read_back and len(read_back) == len(set(read_back)) and read_back == sorted(read_back)
    assert read_back[-1] == 40
    assert read_back[0] > 5  # not from the oldest: what was in memory was not read again


def test_the_drainers_wakeup_is_an_event_for_one_waiter() -> None:
    async def main() -> None:
        wake = Wakeup()
        wake.set()
        assert wake.is_set()
        await wake.wait()  # set: returns at once
        wake.clear()
        assert not wake.is_set()
        waiter = asyncio.ensure_future(wake.wait())
        await asyncio.sleep(0)
        assert not waiter.done()
        wake.set()
        await waiter
        wake.clear()
        with pytest.raises(TimeoutError):  # the drainer's timed waits cancel the wait
            async with stdlib_compat.timeout(0):
                await wake.wait()
        waiter = asyncio.ensure_future(wake.wait())  # and it can wait again
        await asyncio.sleep(0)
        wake.set()
        await waiter

    run(main())


def test_a_publisher_has_no_instance_dict_but_can_be_referenced_weakly(tmp_path: Path) -> None:
    # A fleet holds thousands of publishers: an instance dict costs ~1.6 kB each.
    with Outbox(tmp_path / "o.sqlite3") as ob:
        tel = Telemetry(FakeConnection(), ob, TOPIC)
        assert not hasattr(tel, "__dict__")
        assert weakref.ref(tel)() is tel


# --------------------------------------------------------------------------- refusals


class Refused(Exception):
    """A failed publish as the real connection reports it (``reason_code`` from the
    PUBACK, or awscrt's ``error_name``)."""

    def __init__(
        self, text: str, *, reason_code: int | None = None, error_name: str | None = None
    ) -> None:
        super().__init__(text)
        self.reason_code = reason_code
        self.error_name = error_name


class RefusingConnection(FakeConnection):
    """Acknowledges every publish at once, except those whose counter is in ``refuse``:
    they fail with the given exception, on every attempt (as a broker that refuses a
    message for good does). ``raise_now`` fails them at the call instead (as awscrt does
    for an invalid publish)."""

    def __init__(self, refuse: dict[int, Exception], *, raise_now: bool = False) -> None:
        super().__init__(auto_ack=True)
        self.refuse = refuse
        self.raise_now = raise_now
        self.attempts: list[int] = []

    def publish_future(self, topic: str, payload: bytes, qos: int = 1) -> asyncio.Future[None]:
        n = counter_of(payload)
        self.attempts.append(n)
        if n not in self.refuse:
            return super().publish_future(topic, payload, qos)
        if self.raise_now:
            raise self.refuse[n]
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.published.append((topic, payload))
        asyncio.get_running_loop().call_soon(fut.set_exception, self.refuse[n])
        return fut


@pytest.mark.parametrize(
    ("refusal", "raise_now"),
    [
        (Refused("PUBACK NOT_AUTHORIZED (0x87)", reason_code=0x87), False),
        (Refused("PUBACK TOPIC_NAME_INVALID (0x90)", reason_code=0x90), False),
        (Refused("PUBACK PAYLOAD_FORMAT_INVALID (0x99)", reason_code=0x99), False),
        (
            Refused(
                "failed: AWS_ERROR_MQTT5_PACKET_VALIDATION",
                error_name=("AWS_ERROR_MQTT5_PACKET_VALIDATION"),
            ),
            False,
        ),
        (
            Refused("cannot publish", error_name="AWS_ERROR_MQTT5_PUBLISH_OPTIONS_VALIDATION"),
            True,
        ),
    ],
    ids=["0x87", "0x90", "0x99", "packet-validation", "refused-at-the-call"],
)
def test_a_message_refused_for_good_is_moved_aside_and_the_rest_go_on_in_order(
    outbox: Outbox, refusal: Exception, raise_now: bool
) -> None:
    async def main() -> None:
        conn = RefusingConnection({5: refusal}, raise_now=raise_now)
        async with Telemetry(conn, outbox, TOPIC) as tel:
            for i in range(10):
                await tel.send(message(i))
            await settle(lambda: outbox.depth == 0)
            stats = tel.stats()
            assert stats.refused == 1 and stats.refused_kept == 1
            assert stats.acked == 9 and stats.failed == 0
            assert "refused for good" in (stats.last_error or "")
        assert conn.attempts.count(5) == 1  # never retried
        acked = [n for n in conn.attempts if n != 5]
        assert acked == [0, 1, 2, 3, 4, 6, 7, 8, 9]  # the ones after it, in order
        (kept,) = outbox.refused_records()
        assert counter_of(kept.payload) == 5 and kept.message_id == message_id_of(kept.payload)
        assert kept.reason.startswith(("the broker refused it", "the MQTT library refused"))

    run(main())


def message_id_of(payload: bytes) -> str:
    return str(json.loads(payload)["sendereventuuid"])


@pytest.mark.parametrize("code", [0x80, 0x83, 0x91, 0x97])
def test_a_transient_refusal_is_retried_not_moved(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    monkeypatch.setattr(telemetry_module, "_RETRY_MIN_S", 0.01)

    async def main() -> None:
        conn = RefusingConnection({2: Refused(f"0x{code:02X}", reason_code=code)})
        async with Telemetry(conn, outbox, TOPIC) as tel:
            for i in range(4):
                await tel.send(message(i))
            await settle(lambda: conn.attempts.count(2) >= 3)
            assert outbox.depth >= 1 and tel.stats().refused == 0
            assert outbox.refused_records() == []
            del conn.refuse[2]  # the broker's trouble is over
            await settle(lambda: outbox.depth == 0)
        first = [n for i, n in enumerate(conn.attempts) if n not in conn.attempts[:i]]
        assert first == [0, 1, 2, 3]

    run(main())


def test_send_refuses_a_message_over_the_payload_limit_at_once(outbox: Outbox) -> None:
    async def main() -> None:
        conn = FakeConnection(auto_ack=True)
        async with Telemetry(conn, outbox, TOPIC) as tel:
            big = message(1)
            big["payload"]["signalstatus"]["deviceinfo"]["statusdetails"] = "x" * 200_000
            with pytest.raises(MessageTooLarge) as refused:
                await tel.send(big)
            assert refused.value.limit == 128 * 1024
            assert refused.value.size == len(to_json(big)) > 200_000
            assert f"{refused.value.size:,} bytes" in str(refused.value)
            assert "131,072" in str(refused.value)
            with pytest.raises(MessageTooLarge):
                await tel.send_many([message(2), big])
            assert outbox.depth == 0 and tel.stats().rejected_too_large == 2
            await tel.send(message(3))
            await settle(lambda: outbox.depth == 0)
            assert conn.counters() == [3]

    run(main())


def test_a_stored_message_over_the_limit_is_moved_aside_without_publishing(
    outbox: Outbox,
) -> None:
    async def main() -> None:
        # queued by an earlier version that did not check the size
        for i in range(3):
            payload = to_json(message(i))
            if i == 1:
                payload += b" " * (128 * 1024)
            outbox.append(TOPIC, payload)
        conn = FakeConnection(auto_ack=True)
        async with Telemetry(conn, outbox, TOPIC) as tel:
            await tel.start()
            await settle(lambda: outbox.depth == 0)
            assert tel.stats().refused == 1
        assert conn.counters() == [0, 2]
        (kept,) = outbox.refused_records()
        assert "over the platform's limit of 131,072" in kept.reason

    run(main())
