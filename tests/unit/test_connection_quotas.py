"""The connection's side of the platform's per-connection quotas, without a broker (awscrt's
client replaced by a fake that answers at once): every publish is charged to the pace, a
PUBACK "quota exceeded" slows it down and is retried by the publisher until the message
is taken, SUBSCRIBEs carry at most 8 topic filters (also when resubscribing after a
reconnect), a 51st topic filter is refused before anything is sent, and connection
attempts of several connections share a connect gate."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from awscrt import mqtt5

from iotref.device.connection.connection import Connection
from iotref.device.connection.errors import PublishFailed, SubscribeFailed
from iotref.device.connection.loop_bridge import LoopBridge
from iotref.device.connection.publishes import QUOTA_EXCEEDED
from iotref.device.connection.rate_limit import ConnectGate
from iotref.device.connection.settings import ConnectionSettings
from iotref.device.connection.state import ConnectionState, IncomingMessage
from iotref.device.connection.subscriptions import MAX_FILTERS_PER_SUBSCRIBE, MAX_SUBSCRIPTIONS
from iotref.device.telemetry.outbox import Outbox
from iotref.device.telemetry.outbox_records import OutboxEntry
from iotref.device.telemetry.permission import PermissionFlag
from iotref.device.telemetry.publish_refusals import permanent_refusal
from iotref.device.telemetry.publisher import Telemetry
from iotref.protocol import limits
from iotref.protocol.token_bucket import TokenBucket
from tests.support.device_keys import self_signed
from tests.support.ports import free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def settings(tmp_path: Path, **kw: Any) -> ConnectionSettings:
    values: dict[str, Any] = {
        "endpoint": "broker.example",
        "port": 8883,
        "client_id": "iotref-quota-test",
        "cert_path": tmp_path / "c.pem",
        "key_path": tmp_path / "k.pem",
        "ca_path": tmp_path / "ca.pem",
    }
    values.update(kw)
    return ConnectionSettings(**values)


class FakeBroker:
    """awscrt's client as the connection uses it, answering every publish at once: PUBACK
    success, or "quota exceeded" when ``accept`` says no; SUBACK success for every
    filter. Records the topic filters of each SUBSCRIBE and the time of each publish."""

    def __init__(self, accept: Callable[[float], bool] | None = None) -> None:
        self.accept = accept or (lambda now: True)
        self.publishes: list[tuple[float, bytes, bool]] = []
        self.subscribes: list[list[str]] = []

    def publish(self, packet: mqtt5.PublishPacket) -> concurrent.futures.Future[object]:
        now = time.monotonic()
        taken = self.accept(now)
        self.publishes.append((now, bytes(packet.payload or b""), taken))
        code = mqtt5.PubackReasonCode.SUCCESS if taken else mqtt5.PubackReasonCode.QUOTA_EXCEEDED
        data = mqtt5.PublishCompletionData()
        data.puback = mqtt5.PubackPacket(reason_code=code)
        fut: concurrent.futures.Future[object] = concurrent.futures.Future()
        fut.set_result(data)
        return fut

    def subscribe(self, packet: mqtt5.SubscribePacket) -> concurrent.futures.Future[object]:
        self.subscribes.append([s.topic_filter for s in packet.subscriptions])
        fut: concurrent.futures.Future[object] = concurrent.futures.Future()
        fut.set_result(
            mqtt5.SubackPacket(
                reason_codes=[mqtt5.SubackReasonCode.GRANTED_QOS_1] * len(packet.subscriptions)
            )
        )
        return fut

    def taken(self) -> list[bytes]:
        return [payload for _, payload, ok in self.publishes if ok]


def connected(conn: Connection, broker: FakeBroker) -> Connection:
    conn._client = broker  # type: ignore[assignment]
    conn._loop = asyncio.get_running_loop()
    conn._bridge = LoopBridge(conn._loop)
    conn._started = True
    conn._state = ConnectionState.CONNECTED
    return conn


def test_the_quotas_are_paced_by_default(tmp_path: Path) -> None:
    conn = Connection(settings(tmp_path))
    limiter = conn.rate_limiter
    assert limiter is not None
    assert limiter.publish_limit == limits.PUBLISH_REQUESTS_PER_SECOND_PER_CONNECTION
    assert limiter.byte_limit == limits.THROUGHPUT_BYTES_PER_SECOND_PER_CONNECTION
    assert (
        Connection(settings(tmp_path, publish_rate_limit=None, throughput_limit=0)).rate_limiter
        is None
    )
    with pytest.raises(ValueError, match="publish_rate_limit must be 0"):
        settings(tmp_path, publish_rate_limit=-1)


async def test_every_publish_is_charged_to_the_pace(tmp_path: Path) -> None:
    broker = FakeBroker()
    conn = connected(Connection(settings(tmp_path)), broker)
    limiter = conn.rate_limiter
    assert limiter is not None
    assert limiter.ready() == 2  # the burst
    done: list[BaseException | None] = []
    conn.publish_callback("t/o/c", b"x" * 100, done.append)
    await conn.publish_nowait("t/o/c", b"y" * 100)
    # Neither waits (the caller paces), both are charged: nothing more may go now.
    assert limiter.ready() == 0 and limiter.delay() > 0
    wait = limiter.delay()
    started = time.monotonic()
    await conn.publish("t/o/c", b"z")  # publish() waits for the pace
    assert time.monotonic() - started >= 0.9 * wait
    await asyncio.sleep(0.01)
    assert done == [None] and len(broker.taken()) == 3


async def test_publish_waits_for_room_in_the_pace(tmp_path: Path) -> None:
    broker = FakeBroker()
    conn = connected(Connection(settings(tmp_path, publish_rate_limit=20.0)), broker)
    started = time.monotonic()
    for i in range(12):
        await conn.publish("t/o/c", b"%d" % i)
    elapsed = time.monotonic() - started
    # Pace 19.9 - 1 = 18.9/s with a burst of 1 (pacing(20)): eleven waits of 1/18.9 s.
    assert elapsed >= 11 / 18.9 * 0.95
    times = [t for t, _, _ in broker.publishes]
    assert all(b - a >= 1 / 18.9 * 0.9 for a, b in itertools.pairwise(times))


async def test_quota_exceeded_is_retried_and_slows_the_pace(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="iotref.connection")
    broker = FakeBroker(accept=lambda now: False)
    conn = connected(Connection(settings(tmp_path)), broker)
    limiter = conn.rate_limiter
    assert limiter is not None
    full = limiter.pace
    with pytest.raises(PublishFailed) as info:
        await conn.publish_nowait("t/o/c", b"x")
    assert info.value.reason_code == QUOTA_EXCEEDED
    assert permanent_refusal(info.value) is None  # a publisher tries it again
    assert conn.stats.throttled == 1
    assert limiter.slowed and limiter.pace == pytest.approx((full or 0) / 2, rel=0.01)
    assert "throttled a publish to t/o/c (quota exceeded, 0x97)" in caplog.text


async def test_a_platform_that_throttles_slows_telemetry_down_and_loses_nothing(
    tmp_path: Path,
) -> None:
    """A broker that allows half the device's pace (a bucket of 48/s, as if the quota were
    lower than configured): the device's publishes meet "quota exceeded", each one is
    published again, the pace halves and comes back; every message is taken in the end."""
    bucket = TokenBucket(48, 48, time.monotonic())

    def accept(now: float) -> bool:
        return bucket.take(1, now) == 1

    broker = FakeBroker(accept)
    conn = connected(Connection(settings(tmp_path)), broker)
    limiter = conn.rate_limiter
    assert limiter is not None
    slowed_seen: list[bool] = []
    total = 200
    with Outbox(tmp_path / "outbox.sqlite3") as outbox:
        outbox.append_many([OutboxEntry("t/o/c", b"%d" % i, None) for i in range(total)])
        tel = Telemetry(conn, outbox, "t/o/c", permission=PermissionFlag(True))
        await tel.start()
        deadline = time.monotonic() + 30
        while outbox.depth and time.monotonic() < deadline:
            slowed_seen.append(limiter.slowed)
            await asyncio.sleep(0.05)
        await tel.close(1)
        assert outbox.depth == 0
    taken = broker.taken()
    assert sorted(set(taken), key=int) == [b"%d" % i for i in range(total)]  # none lost
    refused = sum(1 for _, _, ok in broker.publishes if not ok)
    assert refused >= 1 and conn.stats.throttled == refused
    assert any(slowed_seen)
    # Slowing down keeps the refusals a small share of what is sent (a publisher that
    # kept its pace would have half of its publishes refused).
    assert refused <= 0.25 * len(broker.publishes), (refused, len(broker.publishes))


async def test_subscribes_carry_at_most_eight_topic_filters(tmp_path: Path) -> None:
    broker = FakeBroker()
    conn = connected(Connection(settings(tmp_path)), broker)
    seen: list[str] = []

    def handler(message: IncomingMessage) -> None:
        seen.append(message.topic)

    filters = [f"a/{i}" for i in range(20)]
    await conn.subscribe_many([(f, handler) for f in filters])
    assert [len(s) for s in broker.subscribes] == [8, 8, 4]
    assert [f for s in broker.subscribes for f in s] == filters
    assert all(len(s) <= MAX_FILTERS_PER_SUBSCRIBE for s in broker.subscribes)
    await conn.subscribe("a/0", handler)  # already subscribed: nothing sent
    assert len(broker.subscribes) == 3
    conn._on_message(IncomingMessage("a/0", b"x", 1))
    assert seen == ["a/0", "a/0"]  # the handler twice on a/0
    # After a reconnect without the session, every filter again, in SUBSCRIBEs of 8.
    broker.subscribes.clear()
    conn._state = ConnectionState.DISCONNECTED
    conn._on_success(False)
    for _ in range(50):
        if len(broker.subscribes) == 3:
            break
        await asyncio.sleep(0.01)
    assert [len(s) for s in broker.subscribes] == [8, 8, 4]


async def test_more_than_fifty_topic_filters_are_refused_before_anything_is_sent(
    tmp_path: Path,
) -> None:
    broker = FakeBroker()
    conn = connected(Connection(settings(tmp_path)), broker)

    def handler(message: IncomingMessage) -> None:
        pass

    await conn.subscribe_many([(f"b/{i}", handler) for i in range(MAX_SUBSCRIPTIONS - 1)])
    sent = len(broker.subscribes)
    with pytest.raises(SubscribeFailed) as info:
        await conn.subscribe_many([("b/x", handler), ("b/y", handler)])
    assert "51 topic filters" in info.value.reason
    assert "at most 50 per connection" in info.value.reason
    assert info.value.next_step and "wildcard" in info.value.next_step
    assert len(broker.subscribes) == sent and "b/x" not in conn._subscriptions._subs
    await conn.subscribe("b/x", handler)  # the fiftieth is fine
    with pytest.raises(SubscribeFailed, match="51 topic filters"):
        await conn.subscribe("b/z", handler)
    await conn.unsubscribe("b/x", max_wait_s=0)
    await conn.subscribe("b/z", handler)  # room again


async def test_connection_attempts_of_a_fleet_share_the_connect_gate(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "device")
    gate = ConnectGate(5.0)  # five attempts a second for all of them
    attempts: list[float] = []
    port = free_port()  # nothing listens: every attempt fails and is tried again

    def on_event(event: Any) -> None:
        if event.state is ConnectionState.CONNECTING:
            attempts.append(time.monotonic())

    conns = [
        Connection(
            ConnectionSettings(
                endpoint="localhost",
                port=port,
                client_id=f"iotref-gate-{i}",
                cert_path=cert,
                key_path=key,
                ca_path=cert,
            ),
            on_event=on_event,
            connect_gate=gate,
        )
        for i in range(6)
    ]
    try:
        await asyncio.gather(*(c.start(wait=False) for c in conns))
        await asyncio.sleep(2.0)
    finally:
        await asyncio.gather(*(c.stop() for c in conns))
    attempts.sort()
    assert len(attempts) >= 8
    # Never more than the gate's 5 a second (6 where both ends of a window fall on one;
    # an attempt starts on its slot or, when the loop is busy, a little after it).
    busiest = max(sum(1 for t in attempts if a <= t <= a + 1.0) for a in attempts)
    assert busiest <= 6, attempts
    # Without the gate, six connections would make six first attempts at once.
    assert attempts[5] - attempts[0] >= 0.8, attempts
