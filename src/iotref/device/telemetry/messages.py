"""Typed builders of telemetry messages: who sends (:class:`Sender`), for which machine
(:class:`Asset`), what (the ``generic.signal``/``Status`` payloads v1 and v2), and
:func:`build_message` which puts a header-v3 message together as a plain dict.

Each message gets a fresh ``sendereventuuid`` (a random RFC 4122 version 4 UUID from
``os.urandom``, drawn in batches) and ISO-8601 UTC timestamps with milliseconds
(``2026-11-25T10:00:00.123Z``). ``assettimestamp`` strictly increases per
:class:`Asset` object, even when the clock stands still or steps back (it is bumped by
1 ms past the last one); that bookkeeping is thread-safe. Field values are checked when
the objects are created, so a built message is valid against the platform schemas.
"""

from __future__ import annotations

import enum
import json
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar, Final, Protocol, TypeVar

import orjson

from iotref.device.stdlib_compat import StrEnum

__all__ = [
    "HEADER_VERSION",
    "Asset",
    "AssetType",
    "DeviceStatusDetailsV1",
    "DeviceStatusV1",
    "DeviceStatusV2",
    "Event",
    "InvalidField",
    "JobPhaseStatusV1",
    "JobPhaseStatusV2",
    "JobPhaseV1",
    "JobPhaseV2",
    "Part",
    "Payload",
    "Sender",
    "SenderType",
    "StatusV1",
    "StatusV2",
    "build_message",
    "epoch_ms",
    "format_timestamp",
    "format_timestamp_ms",
    "to_json",
]

HEADER_VERSION: Final = 3

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_MS: Final = timedelta(milliseconds=1)


# --------------------------------------------------------------------------- enums


class SenderType(StrEnum):
    """``sendertype`` (header v3)."""

    PRINECT = "prinect"
    SYSTEM = "system"
    PRESS = "press"
    CTP = "ctp"
    POSTPRESS = "postpress"


class AssetType(StrEnum):
    """``assettype`` (header v3)."""

    DIGITAL_PRINTER = "DigitalPrinter"
    SHEETFED_PRESS = "SheetfedPress"
    CUTTER = "Cutter"
    SHEET_FOLDER = "SheetFolder"
    SHAPE_CUTTER = "ShapeCutter"
    BOX_MAKER = "BoxMaker"
    GATHERER = "Gatherer"
    STITCHER = "Stitcher"
    ADHESIVE_BINDER = "AdhesiveBinder"
    ADHESIVE_BINDER_LINE = "AdhesiveBinderLine"
    TRIMMER = "Trimmer"
    THREAD_SEWER = "ThreadSewer"
    CASE_MAKER = "CaseMaker"
    BOOK_PRODUCTION_LINE = "BookProductionLine"
    BOX_PACKER = "BoxPacker"
    MANUAL_PRE_PRESS = "ManualPrePress"
    MANUAL_PRESS = "ManualPress"
    MANUAL_POST_PRESS = "ManualPostPress"
    POST_PRESS_EXTERNAL = "PostPressExternal"
    WORKFLOW = "Workflow"


class DeviceStatusV1(StrEnum):
    """``deviceinfo.status`` in Status v1."""

    IDLE = "Idle"
    DOWN = "Down"
    RUNNING = "Running"


class DeviceStatusDetailsV1(StrEnum):
    """``deviceinfo.statusdetails`` in Status v1 (free text in v2)."""

    GOOD = "Good"
    WASTE = "Waste"


class JobPhaseStatusV1(StrEnum):
    """``jobphase.status`` in Status v1 (note the space)."""

    SETUP = "Setup"
    IN_PROGRESS = "In Progress"


class DeviceStatusV2(StrEnum):
    """``deviceinfo.status`` in Status v2. ``NON_PRODUCTIVE`` carries the platform's
    literal spelling ``NonPoductive``."""

    IDLE = "Idle"
    NON_PRODUCTIVE = "NonPoductive"
    OFFLINE = "Offline"
    PRODUCTION = "Production"
    STOPPED = "Stopped"


class JobPhaseStatusV2(StrEnum):
    """``jobphase[].status`` in Status v2."""

    ABORTED = "Aborted"
    CLEANUP = "Cleanup"
    COMPLETED = "Completed"
    IN_PROGRESS = "InProgress"
    SETUP = "Setup"
    STOPPED = "Stopped"
    SUSPENDED = "Suspended"
    WAITING = "Waiting"


# --------------------------------------------------------------------------- checks


class InvalidField(ValueError):
    """A builder was given a value the schemas would refuse. ``field`` names it
    (``StatusV2.speed``)."""

    def __init__(self, field_name: str, problem: str) -> None:
        self.field = field_name
        super().__init__(f"{field_name}: {problem}")


_E = TypeVar("_E", bound=StrEnum)


def _enum(cls: type[_E], value: object, name: str) -> _E:
    if type(value) is cls:
        return value
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        try:
            return cls(value)
        except ValueError:
            pass
    options = ", ".join(member.value for member in cls)
    raise InvalidField(name, f"{value!r} is not one of {options}")


def _opt_enum(cls: type[_E], value: object, name: str) -> _E | None:
    return None if value is None else _enum(cls, value, name)


def _number(value: object, name: str) -> float:
    if type(value) is int:
        return value
    if type(value) is float and math.isfinite(value):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidField(name, f"must be a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidField(name, f"must be a finite number, got {value!r}")
    return value


def _opt_number(value: object, name: str) -> float | None:
    return None if value is None else _number(value, name)


def _text(value: object, name: str) -> str:
    if type(value) is str and value.isascii():
        return value
    if not isinstance(value, str):
        raise InvalidField(name, f"must be a string, got {type(value).__name__}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidField(name, "is not valid Unicode text (lone surrogate)") from None
    return str(value)  # a plain str, also for str subclasses


def _opt_text(value: object, name: str) -> str | None:
    return None if value is None else _text(value, name)


def _number_text(value: object, name: str) -> str | None:
    """v2 quirk: some counters are strings; a number is written as its JSON text."""
    if value is None or isinstance(value, str):
        return _opt_text(value, name)
    return json.dumps(_number(value, name))


def _items(value: object, cls: type[Any], name: str) -> tuple[Any, ...] | None:
    if value is None:
        return None
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise InvalidField(name, f"must be a sequence of {cls.__name__}")
    for index, item in enumerate(value):
        if not isinstance(item, cls):
            raise InvalidField(f"{name}[{index}]", f"must be a {cls.__name__}")
    return tuple(value)


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


def _compact(pairs: dict[str, Any]) -> dict[str, Any]:
    """Drop absent (None) fields; enums become plain strings."""
    return {
        key: (value.value if isinstance(value, enum.Enum) else value)
        for key, value in pairs.items()
        if value is not None
    }


# --------------------------------------------------------------------------- timestamps


def epoch_ms(moment: datetime) -> int:
    """Milliseconds since the Unix epoch (floored) of a timezone-aware datetime."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("timestamps need a timezone-aware datetime (UTC)")
    return (moment - _EPOCH) // _ONE_MS


# Epoch second -> "YYYY-MM-DDTHH:MM:SS" of the seconds formatted lately. Several entries,
# because the sender timestamp and the assets' timestamps (which run ahead of the clock
# when messages come faster than one per millisecond) are in different seconds. Single
# dict operations are atomic, so threads may share it; it is emptied when it grows.
_second_prefixes: dict[int, str] = {}
_SECOND_PREFIXES_MAX: Final = 64
_MILLIS_SUFFIXES: Final = tuple(f".{millis:03d}Z" for millis in range(1000))


def _second_prefix(second: int) -> str:
    moment = _EPOCH + timedelta(seconds=second)
    prefix = (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T"
        f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}"
    )
    if len(_second_prefixes) >= _SECOND_PREFIXES_MAX:
        _second_prefixes.clear()
    _second_prefixes[second] = prefix
    return prefix


def format_timestamp_ms(ms: int) -> str:
    """``1795600800123`` -> ``2026-11-25T10:00:00.123Z``."""
    second, millis = divmod(ms, 1000)
    if type(ms) is not int:  # not what the signature says; format it as it always was
        return f"{_second_prefix(second)}.{millis:03d}Z"
    prefix = _second_prefixes.get(second)
    if prefix is None:
        prefix = _second_prefix(second)
    return prefix + _MILLIS_SUFFIXES[millis]


def format_timestamp(moment: datetime) -> str:
    """ISO-8601 in UTC with milliseconds, as the contract wants (truncated, not rounded)."""
    return format_timestamp_ms(epoch_ms(moment))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# --------------------------------------------------------------------------- event ids

_UUID_BATCH: Final = 256
# Byte 6 carries the version in its high nibble (0100), byte 8 the variant in its two high
# bits (10): RFC 4122 section 4.4, as uuid.UUID(bytes=..., version=4) sets them.
_SET_VERSION_4: Final = bytes((b & 0x0F) | 0x40 for b in range(256))
_SET_VARIANT_RFC4122: Final = bytes((b & 0x3F) | 0x80 for b in range(256))
# Formatted ids not yet handed out. list.pop() is atomic, so threads may share it; a
# forked child starts with an empty pool so that it never repeats its parent's ids.
_uuid_pool: list[str] = []
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_uuid_pool.clear)


def _fresh_uuids(n: int) -> list[str]:
    """``n`` random version 4 UUIDs in their canonical text form, from one ``os.urandom``
    call (the source ``uuid.uuid4`` uses, so they are just as unpredictable)."""
    raw = bytearray(os.urandom(16 * n))
    raw[6::16] = raw[6::16].translate(_SET_VERSION_4)
    raw[8::16] = raw[8::16].translate(_SET_VARIANT_RFC4122)
    h = raw.hex()
    return [
        f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-{h[i + 12 : i + 16]}-{h[i + 16 : i + 20]}-"
        f"{h[i + 20 : i + 32]}"
        for i in range(0, 32 * n, 32)
    ]


def _uuid4_text() -> str:
    """``str(uuid.uuid4())``, about four times cheaper (ids are made in batches)."""
    try:
        return _uuid_pool.pop()
    except IndexError:
        fresh = _fresh_uuids(_UUID_BATCH)
        text = fresh.pop()
        _uuid_pool.extend(fresh)
        return text


class _MonotonicStamp:
    """The last ``assettimestamp`` of one asset, handed out strictly increasing."""

    __slots__ = ("_last", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: int | None = None

    def next(self, candidate_ms: int) -> int:
        with self._lock:
            if self._last is not None and candidate_ms <= self._last:
                candidate_ms = self._last + 1
            self._last = candidate_ms
            return candidate_ms

    @property
    def last(self) -> int | None:
        return self._last


# --------------------------------------------------------------------------- header parts


@dataclass(frozen=True, slots=True)
class Sender:
    """The IoT gateway sending for one or more assets; fills the ``sender*``/``site*``
    header fields. ``sendertype`` accepts a :class:`SenderType` or its string value."""

    sendertype: SenderType
    sendername: str
    sendersoftwareversion: str
    siteid: str | None = None
    sitename: str | None = None
    _header: dict[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _set(self, "sendertype", _enum(SenderType, self.sendertype, "Sender.sendertype"))
        _set(self, "sendername", _text(self.sendername, "Sender.sendername"))
        _set(
            self,
            "sendersoftwareversion",
            _text(self.sendersoftwareversion, "Sender.sendersoftwareversion"),
        )
        _set(self, "siteid", _opt_text(self.siteid, "Sender.siteid"))
        _set(self, "sitename", _opt_text(self.sitename, "Sender.sitename"))
        header = _compact(
            {
                "sendertype": self.sendertype,
                "sendername": self.sendername,
                "sendersoftwareversion": self.sendersoftwareversion,
                "siteid": self.siteid,
                "sitename": self.sitename,
            }
        )
        _set(self, "_header", header)

    def header_fields(self) -> dict[str, Any]:
        """The header fields this sender fills (a copy)."""
        return dict(self._header)


@dataclass(frozen=True, eq=False, slots=True)
class Asset:
    """A machine the sender speaks for; fills the ``asset*`` header fields and keeps the
    last ``assettimestamp`` handed out for it (per object: use one ``Asset`` object per
    machine). Compared by identity. ``assettype`` accepts an :class:`AssetType` or its
    string value."""

    assetid: str
    assetserial: str
    assettype: AssetType
    assetname: str | None = None
    assetmanufacturername: str | None = None
    assetsubtype: str | None = None
    assethardwareversion: str | None = None
    assetsoftwareversion: str | None = None
    _header: dict[str, Any] = field(init=False, repr=False)
    _stamp: _MonotonicStamp = field(init=False, repr=False, default_factory=_MonotonicStamp)

    def __post_init__(self) -> None:
        _set(self, "assetid", _text(self.assetid, "Asset.assetid"))
        _set(self, "assetserial", _text(self.assetserial, "Asset.assetserial"))
        _set(self, "assettype", _enum(AssetType, self.assettype, "Asset.assettype"))
        for name in (
            "assetname",
            "assetmanufacturername",
            "assetsubtype",
            "assethardwareversion",
            "assetsoftwareversion",
        ):
            _set(self, name, _opt_text(getattr(self, name), f"Asset.{name}"))
        header = _compact(
            {
                "assetid": self.assetid,
                "assetserial": self.assetserial,
                "assettype": self.assettype,
                "assetname": self.assetname,
                "assetmanufacturername": self.assetmanufacturername,
                "assetsubtype": self.assetsubtype,
                "assethardwareversion": self.assethardwareversion,
                "assetsoftwareversion": self.assetsoftwareversion,
            }
        )
        _set(self, "_header", header)

    def header_fields(self) -> dict[str, Any]:
        """The header fields this asset fills (a copy), without the timestamp."""
        return dict(self._header)

    def next_timestamp_ms(self, candidate_ms: int) -> int:
        """The next ``assettimestamp`` (epoch ms): ``candidate_ms``, or 1 ms past the last
        one handed out if that is not later. Thread-safe."""
        return self._stamp.next(candidate_ms)

    @property
    def last_timestamp_ms(self) -> int | None:
        """The last ``assettimestamp`` handed out (epoch ms), or None."""
        return self._stamp.last


# --------------------------------------------------------------------------- payloads


class Payload(Protocol):
    """What :func:`build_message` needs of a payload model: the kind of event (a class
    attribute of the typed models, a field of a raw payload) and the payload itself."""

    @property
    def eventtype(self) -> str: ...
    @property
    def eventsubtype(self) -> str: ...
    @property
    def payloadversion(self) -> int: ...

    def to_payload(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Event:
    """An optional event reported with the status (v1 and v2): id and value, free text."""

    eventid: str | None = None
    eventvalue: str | None = None

    def __post_init__(self) -> None:
        _set(self, "eventid", _opt_text(self.eventid, "Event.eventid"))
        _set(self, "eventvalue", _opt_text(self.eventvalue, "Event.eventvalue"))

    def to_json_value(self) -> dict[str, Any]:
        return _compact({"eventid": self.eventid, "eventvalue": self.eventvalue})


@dataclass(frozen=True, slots=True)
class JobPhaseV1:
    """The job phase of Status v1 (one object; every field optional)."""

    jobid: str | None = None
    workstepid: str | None = None
    status: JobPhaseStatusV1 | None = None
    statusdetails: str | None = None
    amount: float | None = None
    percentcompleted: float | None = None
    waste: float | None = None

    def __post_init__(self) -> None:
        _set(self, "jobid", _opt_text(self.jobid, "JobPhaseV1.jobid"))
        _set(self, "workstepid", _opt_text(self.workstepid, "JobPhaseV1.workstepid"))
        _set(self, "status", _opt_enum(JobPhaseStatusV1, self.status, "JobPhaseV1.status"))
        _set(self, "statusdetails", _opt_text(self.statusdetails, "JobPhaseV1.statusdetails"))
        _set(self, "amount", _opt_number(self.amount, "JobPhaseV1.amount"))
        _set(
            self,
            "percentcompleted",
            _opt_number(self.percentcompleted, "JobPhaseV1.percentcompleted"),
        )
        _set(self, "waste", _opt_number(self.waste, "JobPhaseV1.waste"))

    def to_json_value(self) -> dict[str, Any]:
        return _compact(
            {
                "jobid": self.jobid,
                "workstepid": self.workstepid,
                "status": self.status,
                "statusdetails": self.statusdetails,
                "amount": self.amount,
                "percentcompleted": self.percentcompleted,
                "waste": self.waste,
            }
        )


@dataclass(frozen=True, slots=True)
class StatusV1:
    """``generic.signal``/``Status`` payload version 1. The v1 schema requires nothing,
    so every field is optional."""

    eventtype: ClassVar[str] = "generic.signal"
    eventsubtype: ClassVar[str] = "Status"
    payloadversion: ClassVar[int] = 1

    status: DeviceStatusV1 | None = None
    statusdetails: DeviceStatusDetailsV1 | None = None
    speed: float | None = None
    productioncounter: float | None = None
    totalproductioncounter: float | None = None
    jobphase: JobPhaseV1 | None = None
    event: Event | None = None

    def __post_init__(self) -> None:
        _set(self, "status", _opt_enum(DeviceStatusV1, self.status, "StatusV1.status"))
        _set(
            self,
            "statusdetails",
            _opt_enum(DeviceStatusDetailsV1, self.statusdetails, "StatusV1.statusdetails"),
        )
        _set(self, "speed", _opt_number(self.speed, "StatusV1.speed"))
        _set(
            self,
            "productioncounter",
            _opt_number(self.productioncounter, "StatusV1.productioncounter"),
        )
        _set(
            self,
            "totalproductioncounter",
            _opt_number(self.totalproductioncounter, "StatusV1.totalproductioncounter"),
        )
        if self.jobphase is not None and not isinstance(self.jobphase, JobPhaseV1):
            raise InvalidField("StatusV1.jobphase", "must be a JobPhaseV1")
        if self.event is not None and not isinstance(self.event, Event):
            raise InvalidField("StatusV1.event", "must be an Event")

    def to_payload(self) -> dict[str, Any]:
        deviceinfo = _compact(
            {
                "status": self.status,
                "statusdetails": self.statusdetails,
                "productioncounter": self.productioncounter,
                "speed": self.speed,
                "totalproductioncounter": self.totalproductioncounter,
                "jobphase": None if self.jobphase is None else self.jobphase.to_json_value(),
                "event": None if self.event is None else self.event.to_json_value(),
            }
        )
        return {"signalstatus": {"deviceinfo": deviceinfo}}


@dataclass(frozen=True, slots=True)
class Part:
    """A part of a v2 job phase (sheet name and side, free text)."""

    side: str | None = None
    sheetname: str | None = None

    def __post_init__(self) -> None:
        _set(self, "side", _opt_text(self.side, "Part.side"))
        _set(self, "sheetname", _opt_text(self.sheetname, "Part.sheetname"))

    def to_json_value(self) -> dict[str, Any]:
        return _compact({"side": self.side, "sheetname": self.sheetname})


@dataclass(frozen=True, slots=True)
class JobPhaseV2:
    """One job phase of Status v2. Schema quirk: ``percentcompleted``, ``waste`` and
    ``starttime`` are strings; numbers are accepted and written as their JSON text, a
    datetime ``starttime`` as ISO-8601 UTC with milliseconds."""

    jobid: str
    status: JobPhaseStatusV2
    amount: float
    statusdetails: str
    workstepid: str | None = None
    jobpartid: str | None = None
    costcenterid: str | None = None
    starttime: str | datetime | None = None
    percentcompleted: str | float | None = None
    waste: str | float | None = None
    part: Sequence[Part] | None = None

    def __post_init__(self) -> None:
        _set(self, "jobid", _text(self.jobid, "JobPhaseV2.jobid"))
        _set(self, "status", _enum(JobPhaseStatusV2, self.status, "JobPhaseV2.status"))
        _set(self, "amount", _number(self.amount, "JobPhaseV2.amount"))
        _set(self, "statusdetails", _text(self.statusdetails, "JobPhaseV2.statusdetails"))
        for name in ("workstepid", "jobpartid", "costcenterid"):
            _set(self, name, _opt_text(getattr(self, name), f"JobPhaseV2.{name}"))
        if isinstance(self.starttime, datetime):
            try:
                _set(self, "starttime", format_timestamp(self.starttime))
            except ValueError as exc:
                raise InvalidField("JobPhaseV2.starttime", str(exc)) from None
        else:
            _set(self, "starttime", _opt_text(self.starttime, "JobPhaseV2.starttime"))
        _set(
            self,
            "percentcompleted",
            _number_text(self.percentcompleted, "JobPhaseV2.percentcompleted"),
        )
        _set(self, "waste", _number_text(self.waste, "JobPhaseV2.waste"))
        _set(self, "part", _items(self.part, Part, "JobPhaseV2.part"))

    def to_json_value(self) -> dict[str, Any]:
        return _compact(
            {
                "jobid": self.jobid,
                "jobpartid": self.jobpartid,
                "workstepid": self.workstepid,
                "costcenterid": self.costcenterid,
                "status": self.status,
                "statusdetails": self.statusdetails,
                "amount": self.amount,
                "starttime": self.starttime,
                "percentcompleted": self.percentcompleted,
                "waste": self.waste,
                "part": None if self.part is None else [p.to_json_value() for p in self.part],
            }
        )


@dataclass(frozen=True, slots=True)
class StatusV2:
    """``generic.signal``/``Status`` payload version 2. ``status``, ``speed``,
    ``statusdetails`` (free text) and ``totalproductioncounter`` are required;
    ``jobphase`` is a list (None leaves it out, an empty list sends ``[]``)."""

    eventtype: ClassVar[str] = "generic.signal"
    eventsubtype: ClassVar[str] = "Status"
    payloadversion: ClassVar[int] = 2

    status: DeviceStatusV2
    speed: float
    totalproductioncounter: float
    statusdetails: str = ""
    productioncounter: float | None = None
    jobphase: Sequence[JobPhaseV2] | None = None
    event: Event | None = None

    def __post_init__(self) -> None:
        # Each field is checked (and normalised); it is set again only when the check
        # changed it, which a well-typed value never is (this runs for every message).
        status = _enum(DeviceStatusV2, self.status, "StatusV2.status")
        if status is not self.status:
            _set(self, "status", status)
        speed = _number(self.speed, "StatusV2.speed")
        if speed is not self.speed:
            _set(self, "speed", speed)
        total = _number(self.totalproductioncounter, "StatusV2.totalproductioncounter")
        if total is not self.totalproductioncounter:
            _set(self, "totalproductioncounter", total)
        details = _text(self.statusdetails, "StatusV2.statusdetails")
        if details is not self.statusdetails:
            _set(self, "statusdetails", details)
        if self.productioncounter is not None:
            counter = _number(self.productioncounter, "StatusV2.productioncounter")
            if counter is not self.productioncounter:
                _set(self, "productioncounter", counter)
        if self.jobphase is not None:
            _set(self, "jobphase", _items(self.jobphase, JobPhaseV2, "StatusV2.jobphase"))
        if self.event is not None and not isinstance(self.event, Event):
            raise InvalidField("StatusV2.event", "must be an Event")

    def to_payload(self) -> dict[str, Any]:
        # What _compact would give, built directly (status, speed, statusdetails and
        # totalproductioncounter are never None): this runs for every message.
        deviceinfo: dict[str, Any] = {
            "status": self.status.value,
            "statusdetails": self.statusdetails,
            "speed": self.speed,
        }
        if self.productioncounter is not None:
            deviceinfo["productioncounter"] = self.productioncounter
        deviceinfo["totalproductioncounter"] = self.totalproductioncounter
        if self.jobphase is not None:
            deviceinfo["jobphase"] = [phase.to_json_value() for phase in self.jobphase]
        if self.event is not None:
            deviceinfo["event"] = self.event.to_json_value()
        return {"signalstatus": {"deviceinfo": deviceinfo}}


# --------------------------------------------------------------------------- messages


def build_message(
    sender: Sender,
    asset: Asset,
    payload: Payload,
    *,
    now: datetime | None = None,
    asset_time: datetime | None = None,
) -> dict[str, Any]:
    """A complete header-v3 message as a plain dict, ready for :func:`to_json`.

    ``now`` (default: the system clock) gives ``sendertimestamp``; ``asset_time`` (the
    machine's own time of the reading, default ``now``) gives ``assettimestamp``, moved
    1 ms past the asset's previous one when it is not later. Both must be aware datetimes.
    """
    now_ms = time.time_ns() // 1_000_000 if now is None else epoch_ms(now)
    asset_ms = asset.next_timestamp_ms(now_ms if asset_time is None else epoch_ms(asset_time))
    sender_stamp = format_timestamp_ms(now_ms)
    message: dict[str, Any] = {
        "headerversion": HEADER_VERSION,
        "eventtype": payload.eventtype,
        "eventsubtype": payload.eventsubtype,
        "payloadversion": payload.payloadversion,
        "sendereventuuid": _uuid4_text(),
        "sendertimestamp": sender_stamp,
        "assettimestamp": sender_stamp if asset_ms == now_ms else format_timestamp_ms(asset_ms),
    }
    message.update(sender._header)
    message.update(asset._header)
    message["payload"] = payload.to_payload()
    return message


_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
# Subclasses of str/int/dict/list, dataclasses and datetimes are left to the json module
# (orjson raises for them), which then serializes or refuses them as it always did.
_ORJSON_OPTIONS: Final = (
    orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
)


def to_json(message: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON for the wire (no NaN/Infinity).

    Written by orjson (several times faster than the json module) where that gives the
    same JSON: same key order, ``,``/``:`` separators, non-ASCII as UTF-8. Anything else
    goes through the json module, which also raises as before: ``ValueError`` for NaN and
    infinities (orjson would write ``null``, so output containing ``null`` is redone),
    ``TypeError`` for values JSON cannot carry, ``UnicodeEncodeError`` for lone
    surrogates; integers beyond 64 bits, non-string keys and subclasses are written as
    the json module writes them. Differences: floats are the same numbers but may be
    spelled differently when tiny or huge (``1e-05`` vs ``0.00001``, ``1e+16`` vs
    ``1e16``); ``uuid.UUID`` objects and members of plain (non-str, non-int) enums, which
    the json module refuses, are written as their text and value.
    """
    try:
        data = orjson.dumps(message, option=_ORJSON_OPTIONS)
    except orjson.JSONEncodeError:
        return _ENCODER.encode(message).encode("utf-8")
    if b"null" in data:
        return _ENCODER.encode(message).encode("utf-8")
    return data
