"""Typed message builders: header filling, payload models v1/v2 against the schemas,
timestamps (format, per-asset monotonicity, threads), refusal of bad field values."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from iotref.device.stdlib_compat import fromisoformat
from iotref.device.telemetry import messages
from iotref.device.telemetry.messages import (
    Asset,
    AssetType,
    DeviceStatusDetailsV1,
    DeviceStatusV1,
    DeviceStatusV2,
    Event,
    InvalidField,
    JobPhaseStatusV1,
    JobPhaseStatusV2,
    JobPhaseV1,
    JobPhaseV2,
    Part,
    Sender,
    SenderType,
    StatusV1,
    StatusV2,
    build_message,
    epoch_ms,
    format_timestamp,
    format_timestamp_ms,
    to_json,
)
from iotref.protocol.message_schemas import MessageValidator, header_schema, payload_schema

MILLIS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")
T0 = datetime(2026, 11, 25, 10, 0, 0, 123456, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def strict() -> MessageValidator:
    return MessageValidator(strict=True)


def sender() -> Sender:
    return Sender(SenderType.PRESS, "gateway-1", "1.2.3", siteid="site-1", sitename="Plant")


def asset(**extra: Any) -> Asset:
    return Asset("asset-1", "SN-1", AssetType.SHEETFED_PRESS, **extra)


def full_v1() -> StatusV1:
    return StatusV1(
        status=DeviceStatusV1.RUNNING,
        statusdetails=DeviceStatusDetailsV1.WASTE,
        speed=15000.5,
        productioncounter=10,
        totalproductioncounter=1000,
        jobphase=JobPhaseV1(
            jobid="J1",
            workstepid="W1",
            status=JobPhaseStatusV1.IN_PROGRESS,
            statusdetails="printing",
            amount=5000,
            percentcompleted=12.5,
            waste=3,
        ),
        event=Event(eventid="E1", eventvalue="paper jam"),
    )


def full_v2() -> StatusV2:
    return StatusV2(
        status=DeviceStatusV2.NON_PRODUCTIVE,
        speed=0,
        totalproductioncounter=1000,
        statusdetails="washing",
        productioncounter=10,
        jobphase=[
            JobPhaseV2(
                jobid="J1",
                status=JobPhaseStatusV2.SETUP,
                amount=5000,
                statusdetails="",
                workstepid="W1",
                jobpartid="P1",
                costcenterid="CC1",
                starttime=T0,
                percentcompleted=12.5,
                waste="3",
                part=[Part(side="Front", sheetname="S1"), Part()],
            )
        ],
        event=Event(eventid="E1"),
    )


# --------------------------------------------------------------------------- messages


@pytest.mark.parametrize("payload", [full_v1(), full_v2(), StatusV1(), StatusV2("Idle", 0, 0)])
def test_built_messages_are_valid(strict: MessageValidator, payload: Any) -> None:
    message = build_message(sender(), asset(assetname="Press 1"), payload)
    assert strict.validate(message) == []
    assert strict.validate_json(to_json(message)) == []


def test_header_fields() -> None:
    message = build_message(
        sender(),
        asset(
            assetname="Press 1",
            assetmanufacturername="ACME",
            assetsubtype="XL",
            assethardwareversion="hw",
            assetsoftwareversion="sw",
        ),
        full_v2(),
        now=T0,
    )
    payload = message.pop("payload")
    uuid_text = message.pop("sendereventuuid")
    assert message == {
        "headerversion": 3,
        "eventtype": "generic.signal",
        "eventsubtype": "Status",
        "payloadversion": 2,
        "sendertimestamp": "2026-11-25T10:00:00.123Z",
        "assettimestamp": "2026-11-25T10:00:00.123Z",
        "sendertype": "press",
        "sendername": "gateway-1",
        "sendersoftwareversion": "1.2.3",
        "siteid": "site-1",
        "sitename": "Plant",
        "assetid": "asset-1",
        "assetserial": "SN-1",
        "assettype": "SheetfedPress",
        "assetname": "Press 1",
        "assetmanufacturername": "ACME",
        "assetsubtype": "XL",
        "assethardwareversion": "hw",
        "assetsoftwareversion": "sw",
    }
    assert uuid.UUID(uuid_text).version == 4
    assert set(payload) == {"signalstatus"}
    # plain JSON types only: enums are written as plain strings
    assert type(message["sendertype"]) is str
    assert type(message["assettype"]) is str
    assert type(payload["signalstatus"]["deviceinfo"]["status"]) is str


def test_optional_fields_are_left_out() -> None:
    message = build_message(Sender("system", "gw", "1"), Asset("a", "s", "Cutter"), StatusV1())
    assert "siteid" not in message
    assert "assetname" not in message
    assert message["payload"] == {"signalstatus": {"deviceinfo": {}}}
    assert message["payloadversion"] == 1


def test_v1_payload_shape() -> None:
    assert full_v1().to_payload() == {
        "signalstatus": {
            "deviceinfo": {
                "status": "Running",
                "statusdetails": "Waste",
                "productioncounter": 10,
                "speed": 15000.5,
                "totalproductioncounter": 1000,
                "jobphase": {
                    "jobid": "J1",
                    "workstepid": "W1",
                    "status": "In Progress",
                    "statusdetails": "printing",
                    "amount": 5000,
                    "percentcompleted": 12.5,
                    "waste": 3,
                },
                "event": {"eventid": "E1", "eventvalue": "paper jam"},
            }
        }
    }


def test_v2_payload_shape_and_string_quirks() -> None:
    deviceinfo = full_v2().to_payload()["signalstatus"]["deviceinfo"]
    assert deviceinfo["status"] == "NonPoductive"
    phase = deviceinfo["jobphase"][0]
    assert phase["percentcompleted"] == "12.5"
    assert phase["waste"] == "3"
    assert phase["starttime"] == "2026-11-25T10:00:00.123Z"
    assert phase["part"] == [{"side": "Front", "sheetname": "S1"}, {}]
    assert deviceinfo["event"] == {"eventid": "E1"}
    assert "jobphase" not in StatusV2("Idle", 0, 0).to_payload()["signalstatus"]["deviceinfo"]
    empty = StatusV2("Idle", 0, 0, jobphase=[]).to_payload()
    assert empty["signalstatus"]["deviceinfo"]["jobphase"] == []


def test_fresh_uuid_per_message() -> None:
    s, a = sender(), asset()
    uuids = {build_message(s, a, StatusV1())["sendereventuuid"] for _ in range(500)}
    assert len(uuids) == 500


def test_to_json_is_compact_utf8() -> None:
    message = build_message(sender(), asset(assetname="Drückmaschine"), StatusV1(), now=T0)
    data = to_json(message)
    assert isinstance(data, bytes)
    assert b": " not in data
    assert "Drückmaschine".encode() in data
    assert json.loads(data) == message


# --------------------------------------------------------------------------- models = schemas


def _deviceinfo_schema(version: int) -> dict[str, Any]:
    schema = payload_schema("generic.signal", "Status", version)
    payload = schema["properties"]["payload"]
    deviceinfo: dict[str, Any] = payload["properties"]["signalstatus"]["properties"]["deviceinfo"]
    return deviceinfo


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}


def test_models_cover_every_schema_field() -> None:
    v1 = _deviceinfo_schema(1)
    assert _fields(StatusV1) == set(v1["properties"])
    assert _fields(JobPhaseV1) == set(v1["properties"]["jobphase"]["properties"])
    assert _fields(Event) == set(v1["properties"]["event"]["properties"])
    v2 = _deviceinfo_schema(2)
    assert _fields(StatusV2) == set(v2["properties"])
    phase = v2["properties"]["jobphase"]["items"]
    assert _fields(JobPhaseV2) == set(phase["properties"])
    assert _fields(Part) == set(phase["properties"]["part"]["items"]["properties"])
    assert _fields(Event) == set(v2["properties"]["event"]["properties"])
    header = set(header_schema(3)["properties"])
    assert _fields(Sender) | _fields(Asset) <= header


def test_required_v2_fields_have_no_default() -> None:
    v2 = _deviceinfo_schema(2)
    defaults = {
        f.name
        for f in dataclasses.fields(StatusV2)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    # statusdetails is required by the schema; the builder defaults it to "" (free text)
    assert defaults | {"statusdetails"} == set(v2["required"])
    phase = v2["properties"]["jobphase"]["items"]
    required = {f.name for f in dataclasses.fields(JobPhaseV2) if f.default is dataclasses.MISSING}
    assert required == set(phase["required"])


@pytest.mark.parametrize(
    ("enum_cls", "schema_enum"),
    [
        (SenderType, lambda: header_schema(3)["properties"]["sendertype"]["enum"]),
        (AssetType, lambda: header_schema(3)["properties"]["assettype"]["enum"]),
        (DeviceStatusV1, lambda: _deviceinfo_schema(1)["properties"]["status"]["enum"]),
        (
            DeviceStatusDetailsV1,
            lambda: _deviceinfo_schema(1)["properties"]["statusdetails"]["enum"],
        ),
        (
            JobPhaseStatusV1,
            lambda: _deviceinfo_schema(1)["properties"]["jobphase"]["properties"]["status"]["enum"],
        ),
        (DeviceStatusV2, lambda: _deviceinfo_schema(2)["properties"]["status"]["enum"]),
        (
            JobPhaseStatusV2,
            lambda: _deviceinfo_schema(2)["properties"]["jobphase"]["items"]["properties"][
                "status"
            ]["enum"],
        ),
    ],
)
def test_enums_match_the_schemas(enum_cls: Any, schema_enum: Any) -> None:
    assert [member.value for member in enum_cls] == schema_enum()


def test_non_productive_keeps_the_platform_spelling() -> None:
    assert DeviceStatusV2.NON_PRODUCTIVE.value == "NonPoductive"
    assert DeviceStatusV2("NonPoductive") is DeviceStatusV2.NON_PRODUCTIVE


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: StatusV2("Bogus", 0, 0), "StatusV2.status"),
        (lambda: StatusV2("NonProductive", 0, 0), "StatusV2.status"),
        (lambda: StatusV2("Running", 0, 0), "StatusV2.status"),
        (lambda: StatusV2("Idle", "fast", 0), "StatusV2.speed"),
        (lambda: StatusV2("Idle", True, 0), "StatusV2.speed"),
        (lambda: StatusV2("Idle", float("nan"), 0), "StatusV2.speed"),
        (lambda: StatusV2("Idle", 0, float("inf")), "StatusV2.totalproductioncounter"),
        (lambda: StatusV2("Idle", 0, 0, statusdetails=None), "StatusV2.statusdetails"),
        (lambda: StatusV2("Idle", 0, 0, productioncounter="1"), "StatusV2.productioncounter"),
        (lambda: StatusV2("Idle", 0, 0, jobphase="J1"), "StatusV2.jobphase"),
        (lambda: StatusV2("Idle", 0, 0, jobphase=[{"jobid": "J"}]), "StatusV2.jobphase[0]"),
        (lambda: StatusV2("Idle", 0, 0, event="E"), "StatusV2.event"),
        (lambda: StatusV1(status="Production"), "StatusV1.status"),
        (lambda: StatusV1(statusdetails="Fine"), "StatusV1.statusdetails"),
        (lambda: StatusV1(jobphase={}), "StatusV1.jobphase"),
        (lambda: StatusV1(event={}), "StatusV1.event"),
        (lambda: JobPhaseV1(status="InProgress"), "JobPhaseV1.status"),
        (lambda: JobPhaseV1(waste="3"), "JobPhaseV1.waste"),
        (lambda: JobPhaseV2("J", "In Progress", 1, ""), "JobPhaseV2.status"),
        (lambda: JobPhaseV2(1, "Setup", 1, ""), "JobPhaseV2.jobid"),
        (lambda: JobPhaseV2("J", "Setup", None, ""), "JobPhaseV2.amount"),
        (lambda: JobPhaseV2("J", "Setup", 1, "", waste=False), "JobPhaseV2.waste"),
        (
            lambda: JobPhaseV2("J", "Setup", 1, "", starttime=datetime(2026, 1, 1)),
            "JobPhaseV2.starttime",
        ),
        (lambda: JobPhaseV2("J", "Setup", 1, "", part=[("a", "b")]), "JobPhaseV2.part[0]"),
        (lambda: Part(side=1), "Part.side"),
        (lambda: Event(eventid=1), "Event.eventid"),
        (lambda: Event(eventvalue="\ud800"), "Event.eventvalue"),
        (lambda: Sender("printer", "gw", "1"), "Sender.sendertype"),
        (lambda: Sender("press", None, "1"), "Sender.sendername"),
        (lambda: Sender("press", "gw", "1", siteid=3), "Sender.siteid"),
        (lambda: Asset("a", "s", "Toaster"), "Asset.assettype"),
        (lambda: Asset(1, "s", "Cutter"), "Asset.assetid"),
        (lambda: Asset("a", "s", "Cutter", assetname=b"x"), "Asset.assetname"),
    ],
)
def test_builders_refuse_what_the_schemas_refuse(make: Any, field: str) -> None:
    with pytest.raises(InvalidField) as caught:
        make()
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    assert isinstance(caught.value, ValueError)


def test_enum_values_are_coerced_from_strings() -> None:
    status = StatusV2("Production", 1, 2)
    assert status.status is DeviceStatusV2.PRODUCTION
    assert Sender("ctp", "gw", "1").sendertype is SenderType.CTP
    assert Asset("a", "s", "Workflow").assettype is AssetType.WORKFLOW


def test_models_are_immutable() -> None:
    status = StatusV2("Idle", 0, 0, jobphase=[JobPhaseV2("J", "Setup", 1, "")])
    with pytest.raises(dataclasses.FrozenInstanceError):
        status.speed = 3  # type: ignore[misc]
    assert isinstance(status.jobphase, tuple)


# --------------------------------------------------------------------------- timestamps


def test_timestamp_formatting() -> None:
    assert format_timestamp(T0) == "2026-11-25T10:00:00.123Z"
    assert format_timestamp(
        datetime(2026, 11, 25, 11, 0, 0, 999999, tzinfo=timezone(timedelta(hours=1)))
    ) == ("2026-11-25T10:00:00.999Z")
    assert format_timestamp_ms(0) == "1970-01-01T00:00:00.000Z"
    assert format_timestamp_ms(-1) == "1969-12-31T23:59:59.999Z"
    assert epoch_ms(T0) == 1795600800123
    # the per-second cache does not leak between seconds
    assert format_timestamp_ms(1795600800123) == "2026-11-25T10:00:00.123Z"
    assert format_timestamp_ms(1795600801001) == "2026-11-25T10:00:01.001Z"
    assert format_timestamp_ms(1795600800999) == "2026-11-25T10:00:00.999Z"
    with pytest.raises(ValueError, match="timezone-aware"):
        format_timestamp(datetime(2026, 1, 1))


def test_timestamps_have_milliseconds_and_default_to_now() -> None:
    before = datetime.now(timezone.utc) - timedelta(milliseconds=1)
    message = build_message(sender(), asset(), StatusV1())
    after = datetime.now(timezone.utc) + timedelta(milliseconds=1)
    for key in ("sendertimestamp", "assettimestamp"):
        assert MILLIS.match(message[key])
        stamp = fromisoformat(message[key])
        assert before <= stamp <= after


def test_asset_time_sets_assettimestamp() -> None:
    message = build_message(
        sender(), asset(), StatusV1(), now=T0, asset_time=T0 - timedelta(seconds=5)
    )
    assert message["sendertimestamp"] == "2026-11-25T10:00:00.123Z"
    assert message["assettimestamp"] == "2026-11-25T09:59:55.123Z"


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        build_message(sender(), asset(), StatusV1(), now=datetime(2026, 1, 1))


def test_assettimestamp_increases_when_the_clock_stands_still() -> None:
    s, a = sender(), asset()
    stamps = [build_message(s, a, StatusV1(), now=T0)["assettimestamp"] for _ in range(3)]
    assert stamps == [
        "2026-11-25T10:00:00.123Z",
        "2026-11-25T10:00:00.124Z",
        "2026-11-25T10:00:00.125Z",
    ]


def test_assettimestamp_increases_when_the_clock_steps_back() -> None:
    s, a = sender(), asset()
    first = build_message(s, a, StatusV1(), now=T0)["assettimestamp"]
    second = build_message(s, a, StatusV1(), now=T0 - timedelta(hours=1))
    assert first == "2026-11-25T10:00:00.123Z"
    assert second["assettimestamp"] == "2026-11-25T10:00:00.124Z"
    assert second["sendertimestamp"] == "2026-11-25T09:00:00.123Z"  # the sender's own clock
    later = build_message(s, a, StatusV1(), now=T0 + timedelta(seconds=1))
    assert later["assettimestamp"] == "2026-11-25T10:00:01.123Z"
    assert a.last_timestamp_ms == epoch_ms(T0) + 1000


def test_each_asset_keeps_its_own_last_timestamp() -> None:
    s, a, b = sender(), asset(), asset()
    assert a != b  # compared by identity: two objects, two clocks
    assert build_message(s, a, StatusV1(), now=T0)["assettimestamp"].endswith(".123Z")
    assert build_message(s, b, StatusV1(), now=T0)["assettimestamp"].endswith(".123Z")
    assert build_message(s, a, StatusV1(), now=T0)["assettimestamp"].endswith(".124Z")


def test_monotonic_across_threads() -> None:
    s, a = sender(), asset()
    per_thread: dict[int, list[int]] = {}
    barrier = threading.Barrier(8)

    def work(n: int) -> None:
        barrier.wait()
        got = per_thread.setdefault(n, [])
        for _ in range(300):
            stamp = build_message(s, a, StatusV1(), now=T0)["assettimestamp"]
            got.append(epoch_ms(fromisoformat(stamp)))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [stamp for stamps in per_thread.values() for stamp in stamps]
    assert len(set(everything)) == len(everything) == 2400
    assert sorted(everything) == list(range(epoch_ms(T0), epoch_ms(T0) + 2400))
    for stamps in per_thread.values():
        assert stamps == sorted(stamps)


def test_sender_is_a_value_and_header_fields_are_copies() -> None:
    assert sender() == sender()
    assert hash(sender()) == hash(sender())
    fields = sender().header_fields()
    fields["sendername"] = "changed"
    assert sender().header_fields()["sendername"] == "gateway-1"
    assert asset().header_fields() == {
        "assetid": "asset-1",
        "assetserial": "SN-1",
        "assettype": "SheetfedPress",
    }


def test_module_exports() -> None:
    for name in messages.__all__:
        assert hasattr(messages, name)


# --------------------------------------------------------------------------- fast paths


def test_event_ids_are_random_rfc4122_v4_uuids_across_pool_refills() -> None:
    s, a = sender(), asset()
    texts = [build_message(s, a, StatusV1())["sendereventuuid"] for _ in range(1000)]
    assert len(set(texts)) == len(texts)
    for text in texts:
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # canonical: lower case, 8-4-4-4-12
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    # All other bits vary: every hex digit outside the fixed version nibble takes many
    # values (a broken slicing or translation table would pin some of them).
    digits = [t.replace("-", "") for t in texts]
    for i in range(32):
        seen = {d[i] for d in digits}
        if i == 12:
            assert seen == {"4"}
        elif i == 16:
            assert seen == set("89ab")
        else:
            assert len(seen) >= 12, i


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_repeats_its_parents_event_ids() -> None:
    messages._uuid4_text()  # the pool now holds ids the parent will hand out next
    parent_next = list(messages._uuid_pool)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            child = [messages._uuid4_text() for _ in range(5)]
            os.write(write_end, json.dumps(child).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child_ids = json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert len(child_ids) == 5 and not set(child_ids) & set(parent_next)


def test_timestamps_of_many_interleaved_seconds_are_exact() -> None:
    base = epoch_ms(T0)
    # The sender's clock and assets running ahead alternate between seconds (and more
    # seconds than the cache holds).
    for i in range(300):
        for ms in (base + i, base + 1000 * i + 7, base + 86_400_000 * i + 999):
            expected = (messages._EPOCH + timedelta(milliseconds=ms)).strftime(
                "%Y-%m-%dT%H:%M:%S.%f"
            )[:-3] + "Z"
            assert format_timestamp_ms(ms) == expected
    assert format_timestamp_ms(-1) == "1969-12-31T23:59:59.999Z"
    assert format_timestamp_ms(0) == "1970-01-01T00:00:00.000Z"
    with pytest.raises(ValueError):  # as before: a float is not milliseconds
        format_timestamp_ms(1.5)  # type: ignore[arg-type]


def test_build_message_stamps_match_the_clock_and_are_shared_when_equal() -> None:
    a = asset()
    message = build_message(sender(), a, StatusV1(), now=T0)
    assert message["sendertimestamp"] == message["assettimestamp"] == "2026-11-25T10:00:00.123Z"
    again = build_message(sender(), a, StatusV1(), now=T0)  # asset stamp bumped by 1 ms
    assert again["sendertimestamp"] == "2026-11-25T10:00:00.123Z"
    assert again["assettimestamp"] == "2026-11-25T10:00:00.124Z"
    assert list(again) == [
        "headerversion",
        "eventtype",
        "eventsubtype",
        "payloadversion",
        "sendereventuuid",
        "sendertimestamp",
        "assettimestamp",
        "sendertype",
        "sendername",
        "sendersoftwareversion",
        "siteid",
        "sitename",
        "assetid",
        "assetserial",
        "assettype",
        "payload",
    ]


def test_status_v2_payload_keeps_the_key_order_and_leaves_out_absent_fields() -> None:
    full = StatusV2(
        DeviceStatusV2.PRODUCTION,
        1.5,
        7,
        statusdetails="ok",
        productioncounter=3,
        jobphase=[JobPhaseV2("J", JobPhaseStatusV2.SETUP, 1, "")],
        event=Event("E"),
    )
    deviceinfo = full.to_payload()["signalstatus"]["deviceinfo"]
    assert list(deviceinfo) == [
        "status",
        "statusdetails",
        "speed",
        "productioncounter",
        "totalproductioncounter",
        "jobphase",
        "event",
    ]
    assert type(deviceinfo["status"]) is str and deviceinfo["status"] == "Production"
    bare = StatusV2(DeviceStatusV2.IDLE, 0, 0).to_payload()["signalstatus"]["deviceinfo"]
    assert bare == {"status": "Idle", "statusdetails": "", "speed": 0, "totalproductioncounter": 0}


_STDLIB = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _stdlib_json(value: Any) -> bytes:
    return _STDLIB.encode(value).encode("utf-8")


def test_to_json_gives_the_bytes_of_the_json_module() -> None:
    message = build_message(
        sender(), asset(assetname="Drückmaschine 印刷機 \u2028"), full_v2(), now=T0
    )
    message["payload"]["signalstatus"]["deviceinfo"]["statusdetails"] = 'q"uote\\ \x00\x1f é'
    assert to_json(message) == _stdlib_json(message)
    odd: dict[str, Any] = {
        "null": None,  # "null" in the output: written by the json module
        "big": 2**70,  # beyond orjson's 64 bits
        "neg": -(2**63),
        "tuple": (1, 2.5, True, False),
        "floats": [0.1, -0.0, 12000.5, 1e15, 123456.789],
        "nested": {"a": [{"b": []}], "": {}},
    }
    assert to_json(odd) == _stdlib_json(odd)


def test_to_json_falls_back_to_the_json_module_for_what_orjson_writes_differently() -> None:
    class Text(str):
        pass

    class Mapping(dict[str, Any]):
        pass

    values: list[Any] = [
        {1: "int key"},
        {"sub": Text("x")},
        {"status": DeviceStatusV2.IDLE},
        Mapping(a=1),
    ]
    for value in values:
        assert to_json(value) == _stdlib_json(value)
    # Tiny and huge floats: the same numbers (orjson spells exponents differently).
    floats = {"tiny": 1e-05, "huge": 1.5e16, "small": -1.25e-7}
    assert json.loads(to_json(floats)) == floats


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_to_json_still_refuses_nan_and_infinity(bad: float) -> None:
    with pytest.raises(ValueError):
        to_json({"speed": bad})


def test_to_json_still_refuses_what_json_cannot_carry() -> None:
    with pytest.raises(TypeError):
        to_json({"when": datetime(2026, 1, 1, tzinfo=timezone.utc)})
    with pytest.raises(TypeError):
        to_json({"raw": b"bytes"})
    with pytest.raises(TypeError):
        to_json({"part": Part("Front")})  # a dataclass
    with pytest.raises(UnicodeEncodeError):
        to_json({"text": "lone \ud800 surrogate"})
