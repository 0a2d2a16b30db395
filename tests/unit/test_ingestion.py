"""Unit tests of telemetry ingestion: the receiving side around awscrt (inbox, options,
forwarding, records from forwarded messages), record building (validation, topic checks),
the telemetry store (dedup, counters, rates) and the live feed."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from multiprocessing import Pipe
from pathlib import Path
from types import SimpleNamespace

import pytest
from awscrt import mqtt5

from iotref.device import thread_state
from iotref.protocol.message_schemas import MessageValidator
from iotref.sandbox.telemetry import record_builder
from iotref.sandbox.telemetry.connection_options import (
    RECEIVE_MAXIMUM,
    SESSION_EXPIRY_SECONDS,
    ReceiverSettings,
    client_options,
    subscription_granted,
)
from iotref.sandbox.telemetry.counters import bump_rate, rate_series
from iotref.sandbox.telemetry.feed import TelemetryFeed, event_of
from iotref.sandbox.telemetry.inbox import Inbox
from iotref.sandbox.telemetry.receiver import Receiver
from iotref.sandbox.telemetry.receiving_process import ReceivingClients
from iotref.sandbox.telemetry.record import Record
from iotref.sandbox.telemetry.record_builder import RecordBuilder, ThingDirectory
from iotref.sandbox.telemetry.store import TelemetryStore
from tests.support.ingestion_inputs import CLIENT, ORG, TOPIC, message


def builder(known: dict[str, str] | None = None) -> RecordBuilder:
    table = {CLIENT: ORG} if known is None else known
    return RecordBuilder(MessageValidator(), ThingDirectory(table.get))


# --------------------------------------------------------------------------- receiving


def received(topic: str, payload: bytes) -> SimpleNamespace:
    """What awscrt hands the publish callback (the part the inbox reads)."""
    return SimpleNamespace(publish_packet=SimpleNamespace(topic=topic, payload=payload))


def settings(connections: int = 2) -> ReceiverSettings:
    return ReceiverSettings(
        host="127.0.0.1",
        port=8883,
        ca_path="ca.pem",
        cert_path="cert.pem",
        key_path="key.pem",
        topic_filter="$share/iotref-ingest/connectprint/telemetry/#",
        client_ids=tuple(f"ingest-{i}" for i in range(connections)),
    )


def test_inbox_keeps_arrival_order_and_hands_out_batches() -> None:
    inbox = Inbox()
    for i in range(5):
        inbox.on_publish(received(f"t/{i}", b"%d" % i))  # type: ignore[arg-type]
    assert inbox.take(0, limit=3) == [("t/0", b"0"), ("t/1", b"1"), ("t/2", b"2")]
    assert inbox.take(0) == [("t/3", b"3"), ("t/4", b"4")]
    started = time.monotonic()
    assert inbox.take(0.05) == []
    assert time.monotonic() - started >= 0.04


def test_inbox_wakes_the_taker_at_once() -> None:
    inbox = Inbox()
    got: list[list[tuple[str, bytes]]] = []
    taker = threading.Thread(target=lambda: got.append(inbox.take(5)))
    taker.start()
    time.sleep(0.05)
    started = time.monotonic()
    inbox.on_publish(received("t", b"x"))  # type: ignore[arg-type]
    taker.join(5)
    assert got == [[("t", b"x")]]
    assert time.monotonic() - started < 1


def test_full_inbox_holds_the_callback_until_there_is_room() -> None:
    inbox = Inbox(limit=2)
    for i in range(2):
        inbox.on_publish(received("t", b"%d" % i))  # type: ignore[arg-type]
    third = threading.Thread(target=inbox.on_publish, args=(received("t", b"2"),))
    third.start()
    time.sleep(0.05)
    assert third.is_alive()  # not acknowledged yet: awscrt acks when the callback returns
    assert len(inbox.take(0, limit=1)) == 1
    third.join(5)
    assert not third.is_alive()
    assert [payload for _, payload in inbox.take(0)] == [b"1", b"2"]
    blocked = threading.Thread(target=inbox.on_publish, args=(received("t", b"3"),))
    inbox.on_publish(received("t", b"4"))  # type: ignore[arg-type]
    inbox.on_publish(received("t", b"5"))  # type: ignore[arg-type]
    blocked.start()
    inbox.close()  # stopping: nobody waits any more
    blocked.join(5)
    assert not blocked.is_alive()


def test_the_inbox_callback_keeps_its_thread_state() -> None:
    done: list[bool] = []

    def deliver() -> None:
        Inbox().on_publish(received(TOPIC, b"{}"))
        done.append(thread_state.is_kept())

    worker = threading.Thread(target=deliver)
    worker.start()
    worker.join(5)
    assert done == [True]


def test_client_options_for_the_platform_listener() -> None:
    options = client_options(settings(), "ingest-0", None)
    assert (options.host_name, options.port) == ("127.0.0.1", 8883)
    connect = options.connect_options
    assert connect.client_id == "ingest-0"
    assert connect.receive_maximum == RECEIVE_MAXIMUM == 200
    # A persistent session, rejoined on every connect: the broker queues for it while
    # the ingestion is away (a broker restart, a restart of the receiving process).
    assert connect.session_expiry_interval_sec == SESSION_EXPIRY_SECONDS == 3600
    assert connect.keep_alive_interval_sec == 30
    assert options.session_behavior == mqtt5.ClientSessionBehaviorType.REJOIN_ALWAYS
    assert (
        options.extended_validation_and_flow_control_options
        == mqtt5.ExtendedValidationAndFlowControlOptions.NONE
    )
    assert options.disable_metrics is True


def test_subscription_granted_only_with_good_reason_codes() -> None:
    assert subscription_granted(mqtt5.SubackPacket(reason_codes=[mqtt5.SubackReasonCode(1)]))
    assert not subscription_granted(mqtt5.SubackPacket(reason_codes=[]))
    assert not subscription_granted(mqtt5.SubackPacket(reason_codes=[mqtt5.SubackReasonCode(0x87)]))
    assert not subscription_granted(None)


def test_forwarder_sends_the_inbox_in_batches_then_ends() -> None:
    ours, theirs = Pipe()
    clients = ReceivingClients(settings(), theirs)
    for i in range(5):
        clients.inbox.on_publish(received(TOPIC, b"%d" % i))  # type: ignore[arg-type]
    forwarder = threading.Thread(target=clients._forward)
    forwarder.start()
    kind, received_at, batch = ours.recv()
    assert kind == "messages"
    assert abs(received_at - time.time()) < 5
    assert batch == [(TOPIC, b"%d" % i) for i in range(5)]
    clients.inbox.on_publish(received(TOPIC, b"last"))  # type: ignore[arg-type]
    clients._forwarding = False
    forwarder.join(5)
    assert not forwarder.is_alive()
    got = []
    while ours.poll(0.1):
        got.append(ours.recv())
    assert [item[2] for item in got] == [[(TOPIC, b"last")]]


def test_receiver_checks_forwarded_messages_and_tracks_subscriptions() -> None:
    announced: list[bool] = []
    receiver = Receiver(
        settings(2), builder(), lambda batch: None, on_subscribed=lambda: announced.append(True)
    )
    records = receiver._received(12.5, [(TOPIC, message()), (TOPIC, b"{oops")])
    assert [r.valid for r in records] == [True, False]
    assert {r.received_at for r in records} == {12.5}
    assert receiver.messages == 2
    receiver._state(0, True, logging.INFO, "subscribed")
    assert not receiver.subscribed.is_set()  # one of two connections
    receiver._state(1, True, logging.INFO, "subscribed")
    assert receiver.subscribed.is_set()
    assert announced == [True]  # once all are subscribed (the broker saves its sessions)
    receiver._state(0, False, logging.WARNING, "lost the broker connection")
    assert not receiver.subscribed.is_set()
    receiver._state(0, True, logging.INFO, "subscribed")
    assert announced == [True, True]


def test_receiver_stores_what_has_arrived_meanwhile_as_one_batch() -> None:
    ours, theirs = Pipe()
    batches: list[list[Record]] = []
    receiver = Receiver(settings(1), builder(), batches.append)
    theirs.send(("messages", 1.0, [(TOPIC, message(counter=1))]))
    theirs.send(("state", 0, True, logging.INFO, "subscribed"))
    theirs.send(("messages", 2.0, [(TOPIC, message(counter=2)), (TOPIC, b"{oops")]))
    theirs.send(("stopped",))
    receiver._pump(ours)  # returns at "stopped"
    assert len(batches) == 1
    assert [(r.received_at, r.valid) for r in batches[0]] == [
        (1.0, True),
        (2.0, True),
        (2.0, False),
    ]
    assert receiver.messages == 3
    assert receiver.subscribed.is_set()


def test_receiver_batches_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("iotref.sandbox.telemetry.receiver.WRITE_BATCH_LIMIT", 2)
    ours, theirs = Pipe()
    batches: list[list[Record]] = []
    receiver = Receiver(settings(1), builder(), batches.append)
    for counter in range(5):
        theirs.send(("messages", 1.0, [(TOPIC, message(counter=counter))]))
    theirs.close()  # the receiving process ended: what arrived is still stored
    receiver._pump(ours)
    assert [len(batch) for batch in batches] == [2, 2, 1]


# --------------------------------------------------------------------------- records


def test_valid_message_becomes_a_valid_record() -> None:
    raw = message(speed=1234.0, counter=5)
    record = builder().build(TOPIC, raw, 10.0)
    assert record.valid
    assert record.errors is None
    assert record.client_id == CLIENT
    assert record.org_id == ORG
    assert record.topic_problem is None
    assert record.sendereventuuid == json.loads(raw)["sendereventuuid"]
    assert (record.eventtype, record.eventsubtype, record.payloadversion) == (
        "generic.signal",
        "Status",
        2,
    )
    assert (record.status, record.speed, record.productioncounter) == ("Production", 1234.0, 5.0)
    assert record.totalproductioncounter == 1005.0
    assert record.body == raw


@pytest.mark.parametrize(
    ("topic", "problem"),
    [
        (f"connectprint/telemetry/other-org/{CLIENT}", "organization"),
        (f"connectprint/telemetry/{ORG}/iotref-stranger", "unknown client id"),
        (f"connectprint/telemetry/{ORG}", "topic is not"),
        (f"connectprint/telemetry/{ORG}/{CLIENT}/extra", "topic is not"),
    ],
)
def test_a_message_on_a_wrong_topic_is_never_valid(topic: str, problem: str) -> None:
    record = builder().build(topic, message(), 1.0)
    assert problem in (record.topic_problem or "")
    assert record.errors is None  # the body itself is fine
    assert not record.valid


def test_invalid_json_keeps_the_parser_reason() -> None:
    record = builder().build(TOPIC, b"{not json", 1.0)
    assert not record.valid
    assert record.errors is not None
    assert record.errors[0]["path"] == "$"
    assert "invalid JSON" in record.errors[0]["reason"]
    assert record.sendereventuuid is None


def test_schema_issues_have_path_and_reason() -> None:
    doc = json.loads(message())
    doc["payload"]["signalstatus"]["deviceinfo"]["speed"] = "fast"
    del doc["assetid"]
    record = builder().build(TOPIC, json.dumps(doc).encode(), 1.0)
    assert not record.valid
    paths = {e["path"] for e in record.errors or []}
    assert "$.assetid" in paths
    assert "$.payload.signalstatus.deviceinfo.speed" in paths
    assert all(e["reason"] for e in record.errors or [])
    assert record.speed is None  # not a number: not shown as a reading


def test_topic_checks() -> None:
    b = builder()
    assert b.topic_ids(TOPIC) == (CLIENT, ORG, None)
    client, org, problem = b.topic_ids(f"connectprint/telemetry/other-org/{CLIENT}")
    assert (client, org) == (CLIENT, "other-org")
    assert problem is not None and "organization" in problem
    client, _, problem = b.topic_ids("connectprint/telemetry/org-1/iotref-unknown")
    assert client == "iotref-unknown"
    assert problem == "unknown client id iotref-unknown"
    client, org, problem = b.topic_ids("connectprint/telemetry/a/b/c")
    assert org is None
    assert problem is not None and "topic is not" in problem
    _, _, problem = b.topic_ids("connectprint/telemetry")
    assert problem is not None


def test_checked_topics_are_remembered_and_problems_looked_at_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(record_builder, "TOPIC_CACHE_LIMIT", 3)
    lookups: list[str] = []
    table: dict[str, str] = {}

    def lookup(client_id: str) -> str | None:
        lookups.append(client_id)
        return table.get(client_id)

    things = ThingDirectory(lookup)
    b = RecordBuilder(MessageValidator(), things)
    raw = message()
    assert b.build(TOPIC, raw, 1.0).topic_problem == f"unknown client id {CLIENT}"
    things.remember(CLIENT, ORG)  # registered meanwhile
    record = b.build(TOPIC, raw, 2.0)
    assert (record.client_id, record.org_id, record.topic_problem) == (CLIENT, ORG, None)
    other = f"connectprint/telemetry/other-org/{CLIENT}"
    assert "organization" in (b.build(other, raw, 3.0).topic_problem or "")
    assert b.build(TOPIC, raw, 4.0).topic_problem is None
    for index in range(5):
        table[f"iotref-{index}"] = ORG
        topic = f"connectprint/telemetry/{ORG}/iotref-{index}"
        assert b.build(topic, raw, 5.0).topic_problem is None
        assert b.build(topic, raw, 5.0).client_id == f"iotref-{index}"
    assert lookups == [CLIENT] + [f"iotref-{index}" for index in range(5)]
    assert len(b._good_topics) <= 3


def test_unknown_client_lookup_is_rate_limited_and_remembered() -> None:
    calls: list[str] = []

    def lookup(client_id: str) -> str | None:
        calls.append(client_id)
        return None

    things = ThingDirectory(lookup)
    assert things.org_of("x") is None
    assert things.org_of("x") is None
    assert calls == ["x"]
    things.remember("x", "org")
    assert things.org_of("x") == "org"


# --------------------------------------------------------------------------- store


def test_store_dedups_counts_and_keeps_invalid(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path / "telemetry.db")
    b = builder()
    raw = message()
    first = b.build(TOPIC, raw, time.time())
    again = b.build(TOPIC, raw, time.time())
    bad = b.build(TOPIC, b"[1, 2]", time.time())
    results = store.write_batch([first, again, bad])
    assert results[0][1] is not None
    assert results[1][1] is None  # duplicate
    assert results[2][1] is not None
    more = store.write_batch([b.build(TOPIC, raw, time.time())])
    assert more[0][1] is None
    assert store.totals() == {
        "received": 4,
        "stored": 2,
        "valid": 1,
        "invalid": 1,
        "duplicates": 2,
    }
    assert store.count_rows() == 2
    device = store.device(CLIENT)
    assert device is not None
    assert (device["received"], device["valid"], device["invalid"], device["duplicates"]) == (
        4,
        1,
        1,
        2,
    )
    assert device["last_speed"] == 100.0
    rows = store.messages(CLIENT, invalid_only=True)
    assert len(rows) == 1
    assert rows[0]["errors"][0]["path"] == "$"
    stored = store.message(rows[0]["id"])
    assert stored is not None and stored["body"] == "[1, 2]"
    assert store.message_id(first.sendereventuuid or "") == results[0][1]
    store.close()

    reopened = TelemetryStore(tmp_path / "telemetry.db")
    assert reopened.totals()["duplicates"] == 2
    assert reopened.write_batch([b.build(TOPIC, raw, time.time())])[0][1] is None
    reopened.close()


def test_store_returns_each_rows_id_with_and_without_duplicates(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path / "telemetry.db")
    b = builder()
    raws = [message(counter=i) for i in range(5)]
    uuids = [json.loads(raw)["sendereventuuid"] for raw in raws]

    def stored_ids(results: list[tuple[Record, int | None]]) -> list[int | None]:
        return [row_id for _, row_id in results]

    first = stored_ids(store.write_batch([b.build(TOPIC, raw, 1.0) for raw in raws[:3]]))
    assert first == [store.message_id(u) for u in uuids[:3]]
    assert len(set(first)) == 3
    # Duplicates of an earlier batch and within the batch, and messages without a
    # sendereventuuid (all stored): the ids still belong to the right rows.
    batch = [raws[3], raws[0], b"[1]", raws[4], raws[4], b"[1]"]
    got = stored_ids(store.write_batch([b.build(TOPIC, raw, 2.0) for raw in batch]))
    assert got[1] is None and got[4] is None
    assert got[0] == store.message_id(uuids[3])
    assert got[3] == store.message_id(uuids[4])
    for row_id, raw in zip(got, batch, strict=True):
        if row_id is not None:
            stored = store.message(row_id)
            assert stored is not None and stored["body"] == raw.decode()
    assert store.count_rows() == 7
    assert store.totals() == {
        "received": 9,
        "stored": 7,
        "valid": 5,
        "invalid": 2,
        "duplicates": 2,
    }
    after = stored_ids(store.write_batch([b.build(TOPIC, message(counter=9), 3.0)]))
    assert after == [max(i for i in first + got if i is not None) + 1]
    device = store.device(CLIENT)
    assert device is not None
    assert (device["received"], device["duplicates"], device["invalid"]) == (10, 2, 2)
    assert store.rates(CLIENT, 5, now=3.5)[-3:] == [[1, 3], [2, 6], [3, 1]]
    assert store.rates(None, 5, now=3.5)[-3:] == [[1, 3], [2, 6], [3, 1]]
    store.close()


def test_non_utf8_body_is_returned_as_base64(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path / "t.db")
    record = builder().build(TOPIC, b"\xff\xfe", time.time())
    [(_, row_id)] = store.write_batch([record])
    assert row_id is not None
    found = store.message(row_id)
    assert found is not None
    assert found["body_base64"] == "//4="
    assert "not UTF-8" in found["errors"][0]["reason"]
    store.close()


def test_series_and_messages_order(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path / "t.db")
    b = builder()
    store.write_batch([b.build(TOPIC, message(speed=s, counter=s), 100.0 + s) for s in range(5)])
    series = store.series(CLIENT)
    assert [p["speed"] for p in series] == [0, 1, 2, 3, 4]
    assert {p["assetid"] for p in series} == {"press-1"}
    assert [p["speed"] for p in store.series(CLIENT, limit=2)] == [3, 4]
    newest = store.messages(CLIENT, limit=2)
    assert [m["speed"] for m in newest] == [4, 3]
    older = store.messages(CLIENT, limit=10, before=newest[-1]["id"])
    assert [m["speed"] for m in older] == [2, 1, 0]
    store.close()


def test_rate_series_fills_gaps_and_forgets_old_seconds() -> None:
    from collections import deque

    rate: deque[list[int]] = deque()
    bump_rate(rate, 100)
    bump_rate(rate, 100)
    bump_rate(rate, 102, 5)
    assert rate_series(rate, 102.5, 4) == [[99, 0], [100, 2], [101, 0], [102, 5]]
    bump_rate(rate, 2000)
    assert list(rate) == [[2000, 1]]


# --------------------------------------------------------------------------- feed


def test_feed_filters_and_counts_drops() -> None:
    async def scenario() -> None:
        feed = TelemetryFeed(queue_size=2)
        everything = feed.subscribe()
        one = feed.subscribe(client_id=CLIENT, invalid_only=True)
        b = builder()
        good = event_of(b.build(TOPIC, message(), 1.0), 1)
        bad = event_of(b.build(TOPIC, b"x", 1.0), 2)
        other = event_of(b.build(f"connectprint/telemetry/{ORG}/iotref-other", b"x", 1.0), 3)
        feed.publish([good, bad, other])
        assert everything.queue.qsize() == 2
        assert everything.dropped == 1
        assert one.queue.qsize() == 1
        assert (await one.queue.get())["id"] == 2
        feed.close()
        assert not feed.active
        assert await one.queue.get() is None

    asyncio.run(scenario())


def test_duplicate_event_points_at_the_original() -> None:
    record = builder().build(TOPIC, message(), 1.0)
    event = event_of(record, None, 42)
    assert event["duplicate"] is True
    assert event["id"] == 42
    assert uuid.UUID(event["sendereventuuid"])
