"""Connection policy without a broker: backoff, the takeover heuristic, topic matching,
failure descriptions, settings and the awscrt options they produce, the thread-to-loop
bridge, and the Connection's behaviour before it is started."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import os
import random
import threading
import weakref
from pathlib import Path

import pytest
from awscrt import io, mqtt5

from iotref.device.backoff import Backoff, backoff_cap, full_jitter
from iotref.device.connection import native_publish
from iotref.device.connection.awscrt_options import build_client_options, build_tls_context
from iotref.device.connection.connection import Connection
from iotref.device.connection.diagnostics import describe_failure
from iotref.device.connection.errors import ConnectionClosed, ConnectionFailed, PublishFailed
from iotref.device.connection.loop_bridge import LoopBridge
from iotref.device.connection.settings import ConnectionSettings
from iotref.device.connection.state import ConnectionEvent, ConnectionState, IncomingMessage
from iotref.device.connection.subscriptions import Subscription, topic_matches
from iotref.device.connection.takeover import TakeoverDetector
from iotref.device.errors import IotrefError, StoreError
from tests.support.fake_clock import FakeClock

HANGUP = "AWS_ERROR_MQTT_UNEXPECTED_HANGUP"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def settings(tmp_path: Path, **kw: object) -> ConnectionSettings:
    base: dict[str, object] = {
        "endpoint": "broker.example",
        "port": 8883,
        "client_id": "iotref-0123",
        "cert_path": tmp_path / "c.pem",
        "key_path": tmp_path / "k.pem",
        "ca_path": tmp_path / "ca.pem",
    }
    base.update(kw)
    return ConnectionSettings(**base)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- backoff


def test_backoff_cap_grows_exponentially_and_is_capped() -> None:
    assert [backoff_cap(n, 0.5, 30) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff_cap(10_000, 0.5, 30) == 30


def test_full_jitter_stays_within_zero_and_cap() -> None:
    rng = random.Random(7)
    for attempt in range(12):
        cap = backoff_cap(attempt, 0.5, 30)
        delays = [full_jitter(attempt, 0.5, 30, rng) for _ in range(300)]
        assert all(0 <= d <= cap for d in delays)
        # full jitter: spread over the whole range, not clustered near the cap
        assert min(delays) < cap * 0.1 and max(delays) > cap * 0.9


def test_backoff_object_resets() -> None:
    b = Backoff(1, 8, rng=random.Random(1))
    caps = []
    for _ in range(5):
        caps.append(b.cap)
        b.next_delay()
    assert caps == [1, 2, 4, 8, 8]
    b.reset()
    assert b.cap == 1
    with pytest.raises(ValueError):
        Backoff(0, 1)


def test_backoffs_share_one_generator_reseeded_in_a_forked_child() -> None:
    """Backoffs without their own rng share one (a fleet keeps one per device alive);
    a forked child draws a different sequence from its parent."""
    a, b = Backoff(1, 8), Backoff(1, 8)
    assert a.rng is b.rng
    assert Backoff(1, 8, rng=random.Random(3)).rng is not a.rng
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report its next draws and leave at once
        os.close(read)
        os.write(write, repr([a.rng.random() for _ in range(4)]).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child_draws = pipe.read()
    os.waitpid(pid, 0)
    assert child_draws != repr([a.rng.random() for _ in range(4)])


# --------------------------------------------------------------------------- takeover


def test_session_taken_over_reason_code_is_a_takeover_at_once() -> None:
    d = TakeoverDetector(3, 60, 10, clock=FakeClock(1000.0))
    d.connected()
    assert d.disconnected("AWS_ERROR_MQTT5_DISCONNECT_RECEIVED", 0x8E) is not None


def test_repeated_early_hangups_are_a_takeover() -> None:
    clock = FakeClock(1000.0)
    d = TakeoverDetector(3, 60, 10, clock=clock)
    results = []
    for _ in range(3):
        d.connected()
        clock.now += 1.0
        results.append(d.disconnected(HANGUP, None))
        clock.now += 2.0
    assert results[:2] == [None, None]
    assert results[2] is not None and "3 connections" in results[2]


def test_long_lived_connections_do_not_count() -> None:
    clock = FakeClock(1000.0)
    d = TakeoverDetector(3, 60, 10, clock=clock)
    for _ in range(5):
        d.connected()
        clock.now += 11.0
        assert d.disconnected(HANGUP, None) is None


def test_timeouts_and_other_errors_do_not_count() -> None:
    clock = FakeClock(1000.0)
    d = TakeoverDetector(2, 60, 10, clock=clock)
    for name in ("AWS_ERROR_MQTT5_PING_RESPONSE_TIMEOUT", "AWS_IO_SOCKET_TIMEOUT", None):
        d.connected()
        clock.now += 1
        assert d.disconnected(name, None) is None
    # other DISCONNECT reason codes neither
    d.connected()
    assert d.disconnected("AWS_ERROR_MQTT5_DISCONNECT_RECEIVED", 0x87) is None


def test_hangups_spread_over_more_than_the_window_do_not_count() -> None:
    clock = FakeClock(1000.0)
    d = TakeoverDetector(3, 60, 10, clock=clock)
    for _ in range(6):
        d.connected()
        clock.now += 1
        assert d.disconnected(HANGUP, None) is None
        clock.now += 40


def test_disconnect_without_a_connect_does_not_count_and_limit_zero_disables() -> None:
    clock = FakeClock(1000.0)
    d = TakeoverDetector(1, 60, 10, clock=clock)
    assert d.disconnected(HANGUP, None) is None  # never connected
    off = TakeoverDetector(0, 60, 10, clock=clock)
    for _ in range(5):
        off.connected()
        assert off.disconnected(HANGUP, None) is None
    off.connected()
    assert off.disconnected(None, 0x8E) is not None  # the broker's word still counts


# --------------------------------------------------------------------------- topics


@pytest.mark.parametrize(
    ("flt", "topic", "match"),
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a/b/c", True),
        ("a/#", "a", True),
        ("#", "$aws/things/x", False),
        ("+/things/x", "$aws/things/x", False),
        ("$aws/things/+/shadow/update/delta", "$aws/things/t1/shadow/update/delta", True),
        ("$aws/things/t1/shadow/get/accepted", "$aws/things/t1/shadow/get/rejected", False),
    ],
)
def test_topic_matches(flt: str, topic: str, match: bool) -> None:
    assert topic_matches(flt, topic) is match


# --------------------------------------------------------------------------- failures


def test_failure_descriptions(tmp_path: Path) -> None:
    s = settings(tmp_path)
    tls = describe_failure(s, "AWS_IO_TLS_ERROR_NEGOTIATION_FAILURE", None)
    assert tls.kind == "tls" and "broker.example:8883" in tls.reason and tls.next_step
    refused = describe_failure(s, "AWS_ERROR_MQTT5_CONNACK_CONNECTION_REFUSED", 0x87)
    assert refused.kind == "refused" and "NOT_AUTHORIZED" in refused.reason
    down = describe_failure(s, "AWS_IO_SOCKET_CONNECTION_REFUSED", None)
    assert down.kind == "unreachable"
    dns = describe_failure(s, "AWS_IO_DNS_QUERY_FAILED", None)
    assert dns.kind == "unreachable"
    hangup = describe_failure(s, HANGUP, None)
    assert hangup.kind == "refused"
    assert isinstance(tls, IotrefError)


def test_missing_files_are_a_config_failure(tmp_path: Path) -> None:
    with pytest.raises(ConnectionFailed) as info:
        build_tls_context(settings(tmp_path))
    assert info.value.kind == "config"
    assert "c.pem" in info.value.reason


# --------------------------------------------------------------------------- settings


def test_settings_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="port"):
        settings(tmp_path, port=0)
    with pytest.raises(ValueError, match="backoff"):
        settings(tmp_path, min_backoff_s=5, max_backoff_s=1)
    with pytest.raises(ValueError, match="client_id"):
        settings(tmp_path, client_id="")


def test_settings_from_store(tmp_path: Path) -> None:
    (tmp_path / "properties.json").write_text(
        json.dumps(
            {
                "mqtt_endpoint": "a1b2-ats.iot.eu-central-1.amazonaws.com",
                "mqtt_port": 8883,
                "machine_region": "eu-central-1",
                "telemetry_topic": "t",
                "client_id": "iotref-abc",
                "org_id": "o",
                "machine_id": "m",
                "site_id": "s",
            }
        )
    )
    s = ConnectionSettings.from_store(tmp_path, port=443, alpn=True)
    assert s.endpoint == "a1b2-ats.iot.eu-central-1.amazonaws.com"
    assert (s.port, s.alpn, s.client_id) == (443, True, "iotref-abc")
    assert s.cert_path == tmp_path / "deviceCert.pem"
    assert s.key_path == tmp_path / "devicePrivateKey.pem"
    assert s.ca_path == tmp_path / "amazonRootCA1.pem"


def test_settings_from_a_missing_or_broken_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="properties.json"):
        ConnectionSettings.from_store(tmp_path)
    (tmp_path / "properties.json").write_text('{"mqtt_endpoint": "x"}')
    with pytest.raises(StoreError, match="lacks"):
        ConnectionSettings.from_store(tmp_path)
    (tmp_path / "properties.json").write_text("[")
    with pytest.raises(StoreError):
        ConnectionSettings.from_store(tmp_path)


def test_client_options(tmp_path: Path) -> None:
    s = settings(tmp_path, min_backoff_s=0.25, max_backoff_s=20, keepalive_s=45)
    o = build_client_options(s)
    assert o.retry_jitter_mode == io.ExponentialBackoffJitterMode.FULL
    assert (o.min_reconnect_delay_ms, o.max_reconnect_delay_ms) == (250, 20_000)
    assert o.session_behavior == mqtt5.ClientSessionBehaviorType.REJOIN_POST_SUCCESS
    assert o.disable_metrics is True
    assert o.connect_options.client_id == "iotref-0123"
    assert o.connect_options.keep_alive_interval_sec == 45
    assert o.connect_options.session_expiry_interval_sec == 3600
    assert o.connect_options.username is None
    clean = build_client_options(settings(tmp_path, session_expiry_s=0))
    assert clean.session_behavior == mqtt5.ClientSessionBehaviorType.CLEAN


# --------------------------------------------------------------------------- bridge, state


@pytest.mark.anyio
async def test_loop_bridge_keeps_order_across_threads() -> None:
    loop = asyncio.get_running_loop()
    bridge = LoopBridge(loop)
    seen: list[int] = []
    done = asyncio.Event()

    def record(i: int) -> None:
        seen.append(i)
        if i == 999:
            done.set()

    def produce() -> None:
        for i in range(1000):
            bridge.post(record, i)

    thread = threading.Thread(target=produce)
    thread.start()
    await asyncio.wait_for(done.wait(), 5)
    thread.join()
    assert seen == list(range(1000))


@pytest.mark.anyio
async def test_unstarted_connection(tmp_path: Path) -> None:
    events: list[ConnectionEvent] = []
    conn = Connection(settings(tmp_path), on_event=events.append)
    assert conn.state is ConnectionState.STOPPED and not conn.connected
    with pytest.raises(PublishFailed):
        await conn.publish("a/b", b"x")
    with pytest.raises(ConnectionFailed) as info:
        await conn.start()  # the certificate files do not exist
    assert info.value.kind == "config"
    assert conn.stats.last_error is not None
    with pytest.raises(RuntimeError):
        await conn.start()
    await conn.stop()


@pytest.mark.anyio
async def test_handlers_of_one_filter_are_added_and_removed_in_order(tmp_path: Path) -> None:
    conn = Connection(settings(tmp_path))
    seen: list[str] = []

    def first(message: IncomingMessage) -> None:
        seen.append("first")

    def second(message: IncomingMessage) -> None:
        seen.append("second")

    for handler in (first, second, first):  # registered now, subscribed on connect
        await conn.subscribe("a/+", handler)
    await conn.unsubscribe("a/+", first)  # the first of the two
    conn._on_message(IncomingMessage("a/b", b"x", 1))
    assert seen == ["second", "first"]
    await conn.unsubscribe("a/+", second)
    await conn.unsubscribe("a/+", second)  # not there any more: nothing happens
    conn._on_message(IncomingMessage("a/c", b"x", 1))
    assert seen == ["second", "first", "first"]
    await conn.unsubscribe("a/+", first)
    conn._on_message(IncomingMessage("a/d", b"x", 1))
    assert seen == ["second", "first", "first"]


def test_per_connection_objects_have_no_instance_dict(tmp_path: Path) -> None:
    # A fleet holds thousands of connections: an instance dict costs ~1 kB each.
    conn = Connection(settings(tmp_path))
    objects = [conn, conn._detector, conn._counters, conn._attempt, Subscription("a/b", 1)]
    objects.append(LoopBridge(asyncio.new_event_loop()))
    try:
        for obj in objects:
            assert not hasattr(obj, "__dict__"), type(obj).__name__
        assert weakref.ref(conn)() is conn  # applications may still refer to it weakly
    finally:
        objects[-1]._loop.close()  # type: ignore[attr-defined]


class StoppingCrtClient:
    """awscrt's client as :meth:`Connection.stop` sees it: ``stop()`` is a request, and
    awscrt reports "stopped" later, from one of its own threads."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.stops = 0
        self.threads: list[threading.Thread] = []

    def stop(self) -> None:
        self.stops += 1
        self.report_stopped()

    def report_stopped(self) -> None:
        thread = threading.Thread(
            target=self.conn._crt_stopped, args=(mqtt5.LifecycleStoppedData(),)
        )
        self.threads.append(thread)
        thread.start()

    def join(self) -> None:
        for thread in self.threads:
            thread.join()


@pytest.mark.anyio
async def test_stop_waits_until_awscrt_reports_the_client_stopped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[ConnectionEvent] = []
    conn = Connection(settings(tmp_path), on_event=events.append)
    client = StoppingCrtClient(conn)
    conn._client = client
    conn._bridge = LoopBridge(asyncio.get_running_loop())
    conn._started = conn._ever_connected = True
    conn._state = ConnectionState.CONNECTED
    await conn.stop()
    client.join()
    assert client.stops == 1
    assert "did not report stopped" not in caplog.text  # woken by the report, no timeout
    assert conn.state is ConnectionState.STOPPED and events[-1].state is ConnectionState.STOPPED
    await conn.stop()  # again: nothing left to stop
    assert client.stops == 1


@pytest.mark.anyio
async def test_stop_after_awscrt_stopped_by_itself_does_not_stop_it_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A takeover: the awscrt thread stopped the client right away (see _crt_disconnection).
    conn = Connection(settings(tmp_path))
    client = StoppingCrtClient(conn)
    conn._client = client
    conn._bridge = LoopBridge(asyncio.get_running_loop())
    conn._started = conn._ever_connected = True
    conn._state = ConnectionState.CONNECTED
    conn._takeover_reason = "the broker reported SESSION_TAKEN_OVER"
    client.report_stopped()
    client.join()
    for _ in range(100):
        if conn.taken_over:
            break
        await asyncio.sleep(0.01)
    assert conn.taken_over
    await conn.stop()
    assert client.stops == 0 and "did not report stopped" not in caplog.text
    assert conn.state is ConnectionState.TAKEN_OVER


# --------------------------------------------------------------------------- publish_callback


class FakeCrtClient:
    """Stands in for awscrt's client: publish() returns a concurrent future that the test
    completes from another thread, as awscrt does."""

    def __init__(self) -> None:
        self.packets: list[mqtt5.PublishPacket] = []
        self.futures: list[concurrent.futures.Future[object]] = []

    def publish(self, packet: mqtt5.PublishPacket) -> concurrent.futures.Future[object]:
        self.packets.append(packet)
        fut: concurrent.futures.Future[object] = concurrent.futures.Future()
        self.futures.append(fut)
        return fut


def _puback(code: mqtt5.PubackReasonCode) -> mqtt5.PublishCompletionData:
    data = mqtt5.PublishCompletionData()
    data.puback = mqtt5.PubackPacket(reason_code=code)
    return data


def _connected(tmp_path: Path) -> tuple[Connection, FakeCrtClient]:
    conn = Connection(settings(tmp_path))
    client = FakeCrtClient()
    conn._client = client
    conn._bridge = LoopBridge(asyncio.get_running_loop())
    conn._state = ConnectionState.CONNECTED
    return conn, client


@pytest.mark.anyio
async def test_publish_callback_reports_pubacks_refusals_and_errors_on_the_loop(
    tmp_path: Path,
) -> None:
    conn, client = _connected(tmp_path)
    loop_thread = threading.get_ident()
    outcomes: dict[int, BaseException | None] = {}
    threads: set[int] = set()

    def record(i: int, outcome: BaseException | None) -> None:
        threads.add(threading.get_ident())
        assert i not in outcomes, "called twice"
        outcomes[i] = outcome

    for i in range(3):
        conn.publish_callback("t/o/c", b"%d" % i, functools.partial(record, i))
    assert [p.qos for p in client.packets] == [mqtt5.QoS.AT_LEAST_ONCE] * 3
    assert [p.payload for p in client.packets] == [b"0", b"1", b"2"]

    def complete() -> None:
        client.futures[0].set_result(_puback(mqtt5.PubackReasonCode.SUCCESS))
        client.futures[1].set_result(_puback(mqtt5.PubackReasonCode.NOT_AUTHORIZED))
        client.futures[2].set_exception(RuntimeError("socket closed"))

    thread = threading.Thread(target=complete)
    thread.start()
    thread.join()
    for _ in range(100):
        if len(outcomes) == 3:
            break
        await asyncio.sleep(0.01)
    assert threads == {loop_thread}
    assert outcomes[0] is None
    refused = outcomes[1]
    assert isinstance(refused, PublishFailed) and refused.reason_code == 0x87
    assert isinstance(outcomes[2], PublishFailed) and outcomes[2].reason_code is None
    stats = conn.stats
    assert (stats.publishes, stats.pubacks, stats.publish_failures) == (3, 1, 2)


@pytest.mark.anyio
async def test_publish_callback_pending_at_stop_fails_once_and_errors_are_contained(
    tmp_path: Path,
) -> None:
    conn, client = _connected(tmp_path)
    outcomes: list[BaseException | None] = []

    def broken(outcome: BaseException | None) -> None:
        raise RuntimeError("a buggy callback")

    conn.publish_callback("t/o/c", b"x", outcomes.append, 0)
    conn.publish_callback("t/o/c", b"y", broken)
    assert client.packets[0].qos == mqtt5.QoS.AT_MOST_ONCE
    conn._finish(ConnectionClosed("the connection was stopped"))  # what stop() does
    assert len(outcomes) == 1 and isinstance(outcomes[0], PublishFailed)
    # The late completion from awscrt is ignored: the callback ran already.
    client.futures[0].set_result(mqtt5.PublishCompletionData())
    await asyncio.sleep(0.05)
    assert len(outcomes) == 1
    assert conn.stats.publish_failures == 2


@pytest.mark.anyio
async def test_publish_callback_refuses_at_once_when_it_cannot_queue(tmp_path: Path) -> None:
    called: list[BaseException | None] = []
    conn = Connection(settings(tmp_path))
    with pytest.raises(PublishFailed, match="not started or stopped"):
        conn.publish_callback("a/b", b"x", called.append)
    conn2, _ = _connected(tmp_path)
    with pytest.raises(PublishFailed, match="QoS 2"):
        conn2.publish_callback("a/b", b"x", called.append, 2)
    assert called == []


def test_the_native_publish_is_used_with_the_awscrt_it_was_checked_against() -> None:
    # After an awscrt upgrade: compare the new mqtt5.Client.publish with the call in
    # Connection.publish_callback (arguments, completion callback), then update the hash.
    assert native_publish.raw_publish_function() is not None


def test_the_native_publish_is_not_used_with_another_awscrt_wrapper(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(native_publish, "KNOWN_CRT_PUBLISH_SHA256", "0" * 64)
    native_publish.raw_publish_function.cache_clear()
    try:
        assert native_publish.raw_publish_function() is None
    finally:
        monkeypatch.undo()
        native_publish.raw_publish_function.cache_clear()


def test_native_publish_completions_mean_what_the_wrapper_futures_mean(tmp_path: Path) -> None:
    conn = Connection(settings(tmp_path))
    publishes = conn._publishes
    outcomes: dict[int, BaseException | None] = {}
    cases = [
        # (qos, error code, PUBACK reason code)
        (1, 0, 0x00),
        (1, 0, 0x10),  # NO_MATCHING_SUBSCRIBERS: still a success
        (1, 0, 0x87),
        (1, 0, 0xEE),  # unknown to awscrt: treated as no reason code, as the wrapper does
        (1, 5134, 0),  # an awscrt error (the connection went away)
        (0, 0, None),
    ]
    for key, (qos, error, code) in enumerate(cases):
        publishes._callbacks[key] = functools.partial(outcomes.__setitem__, key)
        publishes._complete_native(key, "t/o/c", qos, error, code)
    publishes._complete_native(99, "t/o/c", 1, 0, 0)  # unknown key (already failed): ignored
    assert outcomes[0] is None and outcomes[1] is None and outcomes[3] is None
    assert outcomes[5] is None
    refused = outcomes[2]
    assert isinstance(refused, PublishFailed) and refused.reason_code == 0x87
    assert str(refused).startswith("the broker refused the publish to t/o/c: NOT_AUTHORIZED")
    failed = outcomes[4]
    assert isinstance(failed, PublishFailed) and failed.reason_code is None
    assert "publish to t/o/c failed: AWS_" in str(failed)
    stats = conn.stats
    assert (stats.pubacks, stats.publish_failures) == (3, 2)
    assert publishes._callbacks == {}
