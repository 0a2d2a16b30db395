"""Unit tests of telemetry ingestion: the MQTT packet codec, record building (validation,
topic checks), the telemetry store (dedup, counters, rates) and the live feed."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import pytest

from iotref.device.messages import (
    Asset,
    AssetType,
    DeviceStatusV2,
    Sender,
    SenderType,
    StatusV2,
    build_message,
    to_json,
)
from iotref.protocol.message_schemas import MessageValidator
from iotref.sandbox.ingestion import (
    ProtocolError,
    RecordBuilder,
    TelemetryFeed,
    ThingDirectory,
    connect_packet,
    decode_varint,
    encode_varint,
    event_of,
    publish_packet,
    split_packets,
    subscribe_packet,
)
from iotref.sandbox.telemetry_store import TelemetryStore, bump_rate, rate_series

ORG = "org-1"
CLIENT = "iotref-0123456789abcdef0123"
TOPIC = f"connectprint/telemetry/{ORG}/{CLIENT}"


def message(speed: float = 100.0, counter: float = 1.0) -> bytes:
    sender = Sender(SenderType.PRESS, "unit", "1.0")
    asset = Asset("press-1", "SN-1", AssetType.SHEETFED_PRESS)
    payload = StatusV2(
        status=DeviceStatusV2.PRODUCTION,
        speed=speed,
        totalproductioncounter=1000 + counter,
        productioncounter=counter,
    )
    return to_json(build_message(sender, asset, payload))


def builder(known: dict[str, str] | None = None) -> RecordBuilder:
    table = {CLIENT: ORG} if known is None else known
    return RecordBuilder(MessageValidator(), ThingDirectory(table.get))


# --------------------------------------------------------------------------- codec


@pytest.mark.parametrize("value", [0, 1, 127, 128, 16_383, 16_384, 2_097_151, 268_435_455])
def test_varint_round_trip(value: int) -> None:
    encoded = encode_varint(value)
    assert decode_varint(encoded, 0) == (value, len(encoded))
    assert decode_varint(encoded[:-1], 0) is None or len(encoded) == 1


def test_varint_limits() -> None:
    with pytest.raises(ValueError):
        encode_varint(268_435_456)
    with pytest.raises(ProtocolError):
        decode_varint(b"\xff\xff\xff\xff\x01", 0)


def test_split_publish_packets_mqtt5_and_partial_rest() -> None:
    one = publish_packet("a/b", b'{"x":1}', 1, 7)
    two = publish_packet("a/c", b"payload", 0)
    three = publish_packet("a/d", b"z" * 300, 1, 9)
    data = one + two + three[:10]
    split = split_packets(data)
    assert split.messages == [("a/b", b'{"x":1}'), ("a/c", b"payload")]
    assert split.acks == [7]
    assert data[split.consumed :] == three[:10]
    rest = split_packets(three)
    assert rest.messages == [("a/d", b"z" * 300)]
    assert rest.acks == [9]


def test_split_mqtt311_and_control_packets() -> None:
    data = b"\x20\x03\x00\x00\x00" + publish_packet("t", b"p", 1, 3, mqtt5=False) + b"\xd0\x00"
    split = split_packets(data, mqtt5=False)
    assert split.messages == [("t", b"p")]
    assert split.acks == [3]
    assert [first for first, _ in split.others] == [0x20, 0xD0]


def test_publish_with_properties_is_skipped_correctly() -> None:
    body = b"\x00\x01t" + b"\x00\x05" + b"\x03" + b"\x01\x01\x02" + b"hello"
    packet = b"\x32" + encode_varint(len(body)) + body
    split = split_packets(packet)
    assert split.messages == [("t", b"hello")]
    assert split.acks == [5]


def test_malformed_publish_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        split_packets(b"\x30\x01\x00")
    with pytest.raises(ProtocolError):
        split_packets(b"\x30\x04\x00\x02\xff\xfe")


def test_connect_and_subscribe_packets_are_well_formed() -> None:
    connect = connect_packet("client-1")
    assert connect[0] == 0x10
    length, start = decode_varint(connect, 1) or (0, 0)
    assert len(connect) == start + length
    assert connect[start : start + 7] == b"\x00\x04MQTT\x05"
    assert connect.endswith(b"\x00\x08client-1")
    sub = subscribe_packet(1, "x/#", 1)
    assert sub[0] == 0x82
    assert sub.endswith(b"\x00\x03x/#\x01")


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
