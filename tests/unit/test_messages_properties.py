"""Property-based tests: whatever the builders accept yields a valid message; junk put
into any field the schemas constrain is refused with that field's path; assettimestamp
strictly increases whatever the clock does."""

from __future__ import annotations

import copy
import itertools
import json
import math
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from iotref.device.stdlib_compat import fromisoformat
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
    to_json,
)
from iotref.protocol.message_schemas import MessageValidator, format_path

VALIDATOR = MessageValidator(strict=True)

texts = st.text(max_size=20)
opt_texts = st.none() | texts
numbers = st.integers(-(10**15), 10**15) | st.floats(allow_nan=False, allow_infinity=False)
opt_numbers = st.none() | numbers
moments = st.datetimes(
    min_value=datetime(1971, 1, 1),
    max_value=datetime(9000, 1, 1),
    timezones=st.just(timezone.utc),
)


def enum_or_value(enum_cls: Any) -> st.SearchStrategy[Any]:
    """An enum member, or its plain string value (the builders accept both)."""
    members = st.sampled_from(list(enum_cls))
    return members | members.map(lambda m: m.value)


senders = st.builds(
    Sender,
    sendertype=enum_or_value(SenderType),
    sendername=texts,
    sendersoftwareversion=texts,
    siteid=opt_texts,
    sitename=opt_texts,
)
assets = st.builds(
    Asset,
    assetid=texts,
    assetserial=texts,
    assettype=enum_or_value(AssetType),
    assetname=opt_texts,
    assetmanufacturername=opt_texts,
    assetsubtype=opt_texts,
    assethardwareversion=opt_texts,
    assetsoftwareversion=opt_texts,
)
events = st.builds(Event, eventid=opt_texts, eventvalue=opt_texts)
status_v1 = st.builds(
    StatusV1,
    status=st.none() | enum_or_value(DeviceStatusV1),
    statusdetails=st.none() | enum_or_value(DeviceStatusDetailsV1),
    speed=opt_numbers,
    productioncounter=opt_numbers,
    totalproductioncounter=opt_numbers,
    jobphase=st.none()
    | st.builds(
        JobPhaseV1,
        jobid=opt_texts,
        workstepid=opt_texts,
        status=st.none() | enum_or_value(JobPhaseStatusV1),
        statusdetails=opt_texts,
        amount=opt_numbers,
        percentcompleted=opt_numbers,
        waste=opt_numbers,
    ),
    event=st.none() | events,
)
parts = st.builds(Part, side=opt_texts, sheetname=opt_texts)
job_phases_v2 = st.builds(
    JobPhaseV2,
    jobid=texts,
    status=enum_or_value(JobPhaseStatusV2),
    amount=numbers,
    statusdetails=texts,
    workstepid=opt_texts,
    jobpartid=opt_texts,
    costcenterid=opt_texts,
    starttime=st.none() | texts | moments,
    percentcompleted=st.none() | texts | numbers,
    waste=st.none() | texts | numbers,
    part=st.none() | st.lists(parts, max_size=3),
)
status_v2 = st.builds(
    StatusV2,
    status=enum_or_value(DeviceStatusV2),
    speed=numbers,
    totalproductioncounter=numbers,
    statusdetails=texts,
    productioncounter=opt_numbers,
    jobphase=st.none() | st.lists(job_phases_v2, max_size=3),
    event=st.none() | events,
)


@settings(max_examples=300, deadline=None)
@given(sender=senders, asset=assets, payload=status_v1 | status_v2, now=moments)
def test_anything_the_builders_accept_is_valid(
    sender: Sender, asset: Asset, payload: StatusV1 | StatusV2, now: datetime
) -> None:
    message = build_message(sender, asset, payload, now=now)
    assert VALIDATOR.validate(message) == []
    data = to_json(message)
    assert VALIDATOR.validate_json(data) == []
    assert json.loads(data) == message


# --------------------------------------------------------------------------- junk

# Where the schemas constrain a value, and how: (path parts, kind, versions).
# kinds: "string", "number", "integer", "object", "array", or a list of allowed values.
HEADER_CONSTRAINTS: list[tuple[list[str | int], Any]] = [
    (["assetid"], "string"),
    (["assetserial"], "string"),
    (["assetname"], "string"),
    (["assetmanufacturername"], "string"),
    (["assetsubtype"], "string"),
    (["assethardwareversion"], "string"),
    (["assetsoftwareversion"], "string"),
    (["sendername"], "string"),
    (["sendersoftwareversion"], "string"),
    (["sendereventuuid"], "string"),
    (["siteid"], "string"),
    (["sitename"], "string"),
    (["assettype"], [t.value for t in AssetType]),
    (["sendertype"], [t.value for t in SenderType]),
    (["assettimestamp"], "date-time"),
    (["sendertimestamp"], "date-time"),
    (["payload"], "object"),
]
DEVICEINFO = ["payload", "signalstatus", "deviceinfo"]
V1_CONSTRAINTS: list[tuple[list[str | int], Any]] = [
    ([*DEVICEINFO, "status"], [s.value for s in DeviceStatusV1]),
    ([*DEVICEINFO, "statusdetails"], [s.value for s in DeviceStatusDetailsV1]),
    ([*DEVICEINFO, "speed"], "number"),
    ([*DEVICEINFO, "productioncounter"], "number"),
    ([*DEVICEINFO, "totalproductioncounter"], "number"),
    ([*DEVICEINFO, "jobphase"], "object"),
    ([*DEVICEINFO, "jobphase", "status"], [s.value for s in JobPhaseStatusV1]),
    ([*DEVICEINFO, "jobphase", "jobid"], "string"),
    ([*DEVICEINFO, "jobphase", "amount"], "number"),
    ([*DEVICEINFO, "jobphase", "waste"], "number"),
    ([*DEVICEINFO, "event", "eventid"], "string"),
    (["payload", "signalstatus"], "object"),
    (DEVICEINFO, "object"),
]
V2_CONSTRAINTS: list[tuple[list[str | int], Any]] = [
    ([*DEVICEINFO, "status"], [s.value for s in DeviceStatusV2]),
    ([*DEVICEINFO, "statusdetails"], "string"),
    ([*DEVICEINFO, "speed"], "number"),
    ([*DEVICEINFO, "productioncounter"], "number"),
    ([*DEVICEINFO, "totalproductioncounter"], "number"),
    ([*DEVICEINFO, "jobphase"], "array"),
    ([*DEVICEINFO, "jobphase", 0], "object"),
    ([*DEVICEINFO, "jobphase", 0, "status"], [s.value for s in JobPhaseStatusV2]),
    ([*DEVICEINFO, "jobphase", 0, "amount"], "number"),
    ([*DEVICEINFO, "jobphase", 0, "percentcompleted"], "string"),
    ([*DEVICEINFO, "jobphase", 0, "waste"], "string"),
    ([*DEVICEINFO, "jobphase", 0, "starttime"], "string"),
    ([*DEVICEINFO, "jobphase", 0, "part"], "array"),
    ([*DEVICEINFO, "jobphase", 0, "part", 0, "side"], "string"),
    ([*DEVICEINFO, "event", "eventvalue"], "string"),
    (["payload", "signalstatus"], "object"),
    (DEVICEINFO, "object"),
    (["eventtype"], ["generic.signal"]),
]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
)
junk_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=5,
)


def is_acceptable(value: Any, kind: Any) -> bool:
    """Whether the schema would take ``value`` for a constraint of ``kind``."""
    if isinstance(kind, list):
        return isinstance(value, str) and value in kind
    if kind == "date-time":
        probe = {"sendertimestamp": value}
        return not any(i.path == "$.sendertimestamp" for i in VALIDATOR.validate(probe))
    if kind == "string":
        return isinstance(value, str)
    if kind == "number":
        return (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        )
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    raise AssertionError(kind)


def full_message(version: int) -> dict[str, Any]:
    sender = Sender("press", "gw", "1", siteid="s", sitename="S")
    asset = Asset(
        "a",
        "s",
        "Cutter",
        assetname="n",
        assetmanufacturername="m",
        assetsubtype="t",
        assethardwareversion="h",
        assetsoftwareversion="v",
    )
    payload: StatusV1 | StatusV2
    if version == 1:
        payload = StatusV1(
            status="Idle",
            statusdetails="Good",
            speed=1,
            productioncounter=1,
            totalproductioncounter=1,
            jobphase=JobPhaseV1(jobid="j", status="Setup", amount=1, waste=0),
            event=Event(eventid="e", eventvalue="v"),
        )
    else:
        payload = StatusV2(
            "Idle",
            1,
            1,
            productioncounter=1,
            jobphase=[
                JobPhaseV2(
                    "j",
                    "Setup",
                    1,
                    "",
                    percentcompleted="1",
                    waste="0",
                    starttime="t",
                    part=[Part(side="f")],
                )
            ],
            event=Event(eventvalue="v"),
        )
    message = build_message(sender, asset, payload)
    assert VALIDATOR.validate(message) == []
    return message


BASE = {1: full_message(1), 2: full_message(2)}


def put(message: dict[str, Any], parts: list[str | int], value: Any) -> None:
    node: Any = message
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    case=st.sampled_from(
        [(1, p, k) for p, k in HEADER_CONSTRAINTS + V1_CONSTRAINTS]
        + [(2, p, k) for p, k in HEADER_CONSTRAINTS + V2_CONSTRAINTS]
    ),
    junk=junk_values,
)
def test_junk_in_a_constrained_field_is_refused_at_its_path(
    case: tuple[int, list[str | int], Any], junk: Any
) -> None:
    version, parts, kind = case
    if is_acceptable(junk, kind):
        event("acceptable value, skipped")
        return
    event("junk")
    message = copy.deepcopy(BASE[version])
    put(message, parts, junk)
    issues = VALIDATOR.validate(message)
    expected = format_path(parts)
    assert issues, f"{expected} = {junk!r} was accepted"
    # every issue is about that field (or, for a replaced object, inside where it was)
    assert {issue.path for issue in issues} == {expected}, issues
    # the same through JSON text
    assert VALIDATOR.validate_json(json.dumps(message)) == issues


@settings(max_examples=200, deadline=None)
@given(
    junk=st.text(max_size=12) | st.integers() | st.booleans() | st.none() | st.floats(),
    field=st.sampled_from(["status", "speed", "totalproductioncounter", "statusdetails"]),
)
def test_builders_refuse_junk_with_the_field_name(junk: Any, field: str) -> None:
    args: dict[str, Any] = {
        "status": "Idle",
        "speed": 1,
        "totalproductioncounter": 1,
        "statusdetails": "",
    }
    args[field] = junk
    kind = {
        "status": [s.value for s in DeviceStatusV2],
        "speed": "number",
        "totalproductioncounter": "number",
        "statusdetails": "string",
    }[field]
    if is_acceptable(junk, kind):
        StatusV2(**args)
        return
    with pytest.raises(InvalidField) as caught:
        StatusV2(**args)
    assert caught.value.field == f"StatusV2.{field}"


@settings(max_examples=200, deadline=None)
@given(clock=st.lists(moments, min_size=1, max_size=30))
def test_assettimestamp_strictly_increases_whatever_the_clock_does(
    clock: list[datetime],
) -> None:
    sender, asset = Sender("press", "gw", "1"), Asset("a", "s", "Cutter")
    stamps = [
        epoch_ms(fromisoformat(build_message(sender, asset, StatusV1(), now=t)["assettimestamp"]))
        for t in clock
    ]
    assert all(a < b for a, b in itertools.pairwise(stamps))
    # the clock's value, bumped 1 ms past the previous one only when the clock did not advance
    expected = [epoch_ms(clock[0])]
    for t in clock[1:]:
        expected.append(max(epoch_ms(t), expected[-1] + 1))
    assert stamps == expected


@given(now=moments)
def test_sender_and_asset_timestamps_round_trip(now: datetime) -> None:
    message = build_message(
        Sender("press", "gw", "1"), Asset("a", "s", "Cutter"), StatusV1(), now=now
    )
    parsed = fromisoformat(message["sendertimestamp"])
    assert timedelta(0) <= now - parsed < timedelta(milliseconds=1)
