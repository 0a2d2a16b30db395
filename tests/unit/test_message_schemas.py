"""Message validation against the packaged platform schemas: table tests of valid and
invalid messages of every kind, the schema quirks, refusals, JSON text input."""

from __future__ import annotations

import copy
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotref.protocol import message_schemas
from iotref.protocol.message_schemas import (
    InvalidMessage,
    MessageValidator,
    ValidationIssue,
    format_path,
    header_schema,
    known_header_versions,
    known_payloads,
    parse_json,
    payload_schema,
    validate_json,
    validate_message,
)

# The platform contract lies beside the repository (../shared), in CI too.
PLATFORM_SCHEMAS = Path(__file__).resolve().parents[3] / "shared" / "platform" / "schemas"
INFO = "payload.signalstatus.deviceinfo"
DEVICEINFO = f"$.{INFO}"

HEADER: dict[str, Any] = {
    "headerversion": 3,
    "eventtype": "generic.signal",
    "eventsubtype": "Status",
    "sendereventuuid": "0b5e3d52-52e4-4f43-9b1e-7f0c1f0a1b2c",
    "sendertype": "press",
    "sendername": "gateway-1",
    "sendersoftwareversion": "1.2.3",
    "sendertimestamp": "2026-11-25T10:00:00.123Z",
    "siteid": "site-1",
    "sitename": "Main plant",
    "assetid": "asset-1",
    "assetserial": "SN-1",
    "assettype": "SheetfedPress",
    "assetname": "Press 1",
    "assetmanufacturername": "ACME",
    "assetsubtype": "XL",
    "assethardwareversion": "hw1",
    "assetsoftwareversion": "sw1",
    "assettimestamp": "2026-11-25T10:00:00.120Z",
}

V1: dict[str, Any] = {
    **HEADER,
    "payloadversion": 1,
    "payload": {
        "signalstatus": {
            "deviceinfo": {
                "status": "Running",
                "statusdetails": "Good",
                "productioncounter": 120,
                "speed": 15000.5,
                "totalproductioncounter": 1_000_120,
                "jobphase": {
                    "jobid": "J1",
                    "workstepid": "W1",
                    "status": "In Progress",
                    "statusdetails": "printing",
                    "amount": 5000,
                    "percentcompleted": 2.4,
                    "waste": 3,
                },
                "event": {"eventvalue": "ok", "eventid": "E1"},
            }
        }
    },
}

V2: dict[str, Any] = {
    **HEADER,
    "payloadversion": 2,
    "payload": {
        "signalstatus": {
            "deviceinfo": {
                "productioncounter": 120,
                "speed": 15000,
                "status": "NonPoductive",
                "statusdetails": "washing",
                "totalproductioncounter": 1_000_120,
                "event": {"eventid": "E1", "eventvalue": "wash"},
                "jobphase": [
                    {
                        "amount": 5000,
                        "costcenterid": "CC1",
                        "jobid": "J1",
                        "jobpartid": "P1",
                        "part": [{"side": "Front", "sheetname": "S1"}],
                        "percentcompleted": "2.4",
                        "starttime": "2026-11-25T09:00:00.000Z",
                        "status": "InProgress",
                        "statusdetails": "",
                        "waste": "3",
                        "workstepid": "W1",
                    }
                ],
            }
        }
    },
}

V2_MINIMAL: dict[str, Any] = {
    key: HEADER[key]
    for key in (
        "headerversion",
        "eventtype",
        "eventsubtype",
        "sendereventuuid",
        "sendertype",
        "sendertimestamp",
        "assetid",
        "assetserial",
        "assettype",
        "assettimestamp",
    )
} | {
    "payloadversion": 2,
    "payload": {
        "signalstatus": {
            "deviceinfo": {
                "speed": 0,
                "status": "Idle",
                "statusdetails": "",
                "totalproductioncounter": 0,
            }
        }
    },
}

REQUIRED_HEADER = [
    "assetid",
    "assetserial",
    "assettimestamp",
    "assettype",
    "eventsubtype",
    "eventtype",
    "headerversion",
    "sendereventuuid",
    "sendertype",
    "sendertimestamp",
    "payloadversion",
    "payload",
]


@pytest.fixture(scope="module")
def validator() -> MessageValidator:
    return MessageValidator()


def changed(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with the dotted ``path`` set (``...`` deletes it)."""
    message = copy.deepcopy(base)
    *parents, last = path.split(".")
    node: Any = message
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is ...:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return message


def paths(issues: list[ValidationIssue]) -> list[str]:
    return [issue.path for issue in issues]


# --------------------------------------------------------------------------- packaging


def test_catalog_lists_the_packaged_schemas() -> None:
    assert known_header_versions() == [3]
    assert known_payloads() == [("generic.signal", "Status", 1), ("generic.signal", "Status", 2)]


@pytest.mark.parametrize(
    "relative",
    [
        "header/3/header.schema.json",
        "payload/generic.signal/Status/1/Status.schema.json",
        "payload/generic.signal/Status/2/Status.schema.json",
    ],
)
def test_packaged_schemas_are_verbatim_copies(relative: str) -> None:
    packaged = resources.files("iotref.protocol") / "schemas"
    for part in relative.split("/"):
        packaged = packaged / part
    data = packaged.read_bytes()
    json.loads(data)
    source = PLATFORM_SCHEMAS / relative
    if not source.exists():
        pytest.skip("platform contract directory not present")
    assert data == source.read_bytes()


def test_schema_accessors_return_copies() -> None:
    schema = header_schema(3)
    assert schema["additionalProperties"] is False
    schema["properties"].clear()
    assert header_schema(3)["properties"]
    assert payload_schema("generic.signal", "Status", 2)["properties"]["payload"]
    with pytest.raises(KeyError):
        payload_schema("generic.signal", "Status", 9)


def test_header_forbids_other_keys_with_top_level_additional_properties() -> None:
    schema = header_schema(3)
    assert schema["additionalProperties"] is False
    assert "additionalProperties" not in schema["properties"]


def test_v1_additional_properties_sits_inside_properties() -> None:
    schema = payload_schema("generic.signal", "Status", 1)
    assert "additionalProperties" not in schema
    assert schema["properties"]["additionalProperties"] is True


# --------------------------------------------------------------------------- valid


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(V1, id="v1-full"),
        pytest.param(V2, id="v2-full"),
        pytest.param(V2_MINIMAL, id="v2-minimal"),
        pytest.param(changed(V1, "payload", {}), id="v1-empty-payload"),
        pytest.param(changed(V1, "payload.signalstatus", {}), id="v1-no-deviceinfo"),
        pytest.param(changed(V1, "payload.extra", [1, 2]), id="v1-extra-payload-key"),
        pytest.param(
            changed(V1, "payload.signalstatus.deviceinfo.vendor", {"x": 1}),
            id="v1-extra-deviceinfo-key",
        ),
        pytest.param(changed(V2, "payload.anything", "goes"), id="v2-extra-payload-key"),
        pytest.param(
            changed(V2, "payload.signalstatus.deviceinfo.jobphase", []), id="v2-no-jobphases"
        ),
        pytest.param(
            changed(V2, "sendertimestamp", "2026-11-25T10:00:00Z"), id="no-millis-rfc3339"
        ),
        pytest.param(changed(V2, "assettimestamp", "2026-11-25T11:00:00.120+01:00"), id="offset"),
        pytest.param(changed(V2, "headerversion", 3.0), id="headerversion-3.0-is-integer"),
        pytest.param(changed(V2, "payloadversion", 2.0), id="payloadversion-2.0-is-integer"),
        pytest.param(changed(V2, "assetname", ""), id="empty-strings-allowed"),
    ],
)
def test_valid_messages(validator: MessageValidator, message: dict[str, Any]) -> None:
    assert validator.validate(message) == []
    assert validator.is_valid(message)
    validator.validate_or_raise(message)
    assert validator.validate_json(json.dumps(message)) == []
    assert validator.validate_json(json.dumps(message).encode()) == []


def test_v2_status_keeps_the_platform_spelling(validator: MessageValidator) -> None:
    field = "payload.signalstatus.deviceinfo.status"
    assert validator.validate(changed(V2, field, "NonPoductive")) == []
    issues = validator.validate(changed(V2, field, "NonProductive"))
    assert paths(issues) == [f"{DEVICEINFO}.status"]


def test_v1_additional_properties_key_constrains_nothing(validator: MessageValidator) -> None:
    message = changed(V1, "additionalProperties", False)
    message = changed(message, "payload.additionalProperties", 5)
    # The header still forbids unknown top-level keys; v1 itself would take them.
    assert paths(validator.validate(message)) == ["$.additionalProperties"]
    v1 = message_schemas.payload_schema("generic.signal", "Status", 1)
    import jsonschema_rs

    assert jsonschema_rs.validator_for(v1).is_valid(message)


# --------------------------------------------------------------------------- invalid


@pytest.mark.parametrize("field", REQUIRED_HEADER)
@pytest.mark.parametrize("base", [V1, V2], ids=["v1", "v2"])
def test_missing_header_field(
    validator: MessageValidator, base: dict[str, Any], field: str
) -> None:
    issues = validator.validate(changed(base, field, ...))
    assert f"$.{field}" in paths(issues)
    assert ValidationIssue(f"$.{field}", "required property is missing") in issues
    assert not validator.is_valid(changed(base, field, ...))


@pytest.mark.parametrize("key", ["extra", "payload_version", "Assetid", "with space"])
def test_extra_header_keys_are_refused(validator: MessageValidator, key: str) -> None:
    issues = validator.validate(changed(V2, key, "x"))
    assert paths(issues) == [format_path([key])]
    assert "not allowed" in issues[0].message


def invalid(
    name: str, base: dict[str, Any], field: str, value: Any, reason: str, path: str | None = None
) -> Any:
    """A case of :func:`test_invalid_messages`: ``base`` with the dotted ``field`` set to
    ``value`` (``...`` deletes it) is refused first at ``path`` (by default the field's own
    JSON path) for a reason that says ``reason``."""
    default = "$" + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in field.split("."))
    return pytest.param(changed(base, field, value), path or default, reason, id=name)


INVALID = [
    invalid("assetid-number", V2, "assetid", 5, "type"),
    invalid("assetname-null", V2, "assetname", None, "type"),
    invalid("headerversion-string", V2, "headerversion", "3", "type"),
    invalid("headerversion-bool", V2, "headerversion", True, "type"),
    invalid("payloadversion-string", V2, "payloadversion", "2", "type"),
    invalid("payloadversion-bool", V1, "payloadversion", True, "type"),
    invalid("payload-list", V2, "payload", [], "object"),
    invalid("assettype-enum", V2, "assettype", "Toaster", "Toaster"),
    invalid("sendertype-enum", V2, "sendertype", "PRESS", "PRESS"),
    invalid("assettimestamp-format", V2, "assettimestamp", "yesterday", "date-time"),
    invalid(
        "sendertimestamp-space", V2, "sendertimestamp", "2026-11-25 10:00:00.123Z", "date-time"
    ),
    invalid(
        "sendertimestamp-no-offset", V1, "sendertimestamp", "2026-11-25T10:00:00.123", "date-time"
    ),
    invalid(
        "assettimestamp-month-13", V1, "assettimestamp", "2026-13-25T10:00:00.123Z", "date-time"
    ),
    invalid("v1-bogus-status", V1, f"{INFO}.status", "Bogus", "Bogus"),
    invalid("v2-bogus-status", V2, f"{INFO}.status", "Bogus", "Bogus"),
    invalid("v1-v2-status", V1, f"{INFO}.status", "Production", "Production"),
    invalid("v2-v1-status", V2, f"{INFO}.status", "Running", "Running"),
    invalid("v1-statusdetails-enum", V1, f"{INFO}.statusdetails", "Fine", "Fine"),
    invalid("v1-speed-string", V1, f"{INFO}.speed", "fast", "number"),
    invalid("v1-speed-bool", V1, f"{INFO}.speed", True, "number"),
    invalid("v2-counter-string", V2, f"{INFO}.totalproductioncounter", "1", "number"),
    invalid("v1-jobphase-v2-spelling", V1, f"{INFO}.jobphase.status", "InProgress", "InProgress"),
    invalid("v1-jobphase-waste-string", V1, f"{INFO}.jobphase.waste", "3", "number"),
    invalid("v1-jobphase-array", V1, f"{INFO}.jobphase", [], "object"),
    invalid("v1-event-id-number", V1, f"{INFO}.event.eventid", 1, "string"),
    invalid("v2-jobphase-object", V2, f"{INFO}.jobphase", {}, "array"),
    invalid(
        "v2-jobphase-v1-spelling", V2, f"{INFO}.jobphase.0.status", "In Progress", "In Progress"
    ),
    invalid("v2-jobphase-waste-number", V2, f"{INFO}.jobphase.0.waste", 3, "string"),
    invalid("v2-jobphase-missing-amount", V2, f"{INFO}.jobphase.0.amount", ..., "required"),
    invalid("v2-part-side-number", V2, f"{INFO}.jobphase.0.part.0.side", 1, "string"),
    invalid("v2-missing-speed", V2, f"{INFO}.speed", ..., "required"),
    invalid("v2-missing-statusdetails", V2, f"{INFO}.statusdetails", ..., "required"),
    invalid(
        "v2-missing-deviceinfo",
        V2,
        "payload.signalstatus",
        {},
        "required",
        path="$.payload.signalstatus.deviceinfo",
    ),
    invalid(
        "v2-missing-signalstatus", V2, "payload", {}, "required", path="$.payload.signalstatus"
    ),
    invalid("eventtype-number", V2, "eventtype", 7, "type"),
]


@pytest.mark.parametrize(
    ("message", "path", "reason"),
    INVALID,
)
def test_invalid_messages(
    validator: MessageValidator, message: dict[str, Any], path: str, reason: str
) -> None:
    issues = validator.validate(message)
    assert issues, "expected the message to be refused"
    assert issues[0].path == path
    assert reason in issues[0].message
    assert not validator.is_valid(message)
    with pytest.raises(InvalidMessage) as caught:
        validator.validate_or_raise(message)
    assert isinstance(caught.value, ValueError)
    assert str(caught.value).startswith(f"{path}: ")
    assert list(caught.value.issues) == issues
    assert validator.validate_json(json.dumps(message)) == issues


@pytest.mark.parametrize(
    ("message", "path", "reason"),
    [
        (changed(V2, "eventtype", "generic.foo"), "$.eventtype", "unknown event type generic.foo"),
        (
            changed(V2, "eventtype", "prinect.xjmf"),
            "$.eventtype",
            "unknown event type prinect.xjmf",
        ),
        (
            changed(V2, "eventsubtype", "Counter"),
            "$.eventsubtype",
            "unknown event subtype Counter for generic.signal",
        ),
        (
            changed(V2, "payloadversion", 9),
            "$.payloadversion",
            "unknown payload version 9 for generic.signal/Status",
        ),
        (changed(V2, "headerversion", 9), "$.headerversion", "unknown header version 9"),
        (changed(V2, "headerversion", 2), "$.headerversion", "unknown header version 2"),
    ],
)
def test_unknown_kinds_are_refused_clearly(
    validator: MessageValidator, message: dict[str, Any], path: str, reason: str
) -> None:
    issues = validator.validate(message)
    assert issues[0].path == path
    assert issues[0].message.startswith(reason)
    # the refusal replaces the header schema's own complaint at that path
    assert paths(issues).count(path) == 1
    with pytest.raises(InvalidMessage, match=f"^{path.replace('$', '[$]')}: {reason}"):
        validator.validate_or_raise(message)


@pytest.mark.parametrize("message", [[], "text", None, 3, True, [V2]])
def test_a_message_must_be_an_object(validator: MessageValidator, message: Any) -> None:
    issues = validator.validate(message)
    assert paths(issues) == ["$"]
    assert "JSON object" in issues[0].message


def test_all_issues_are_returned_deduplicated_in_path_order(validator: MessageValidator) -> None:
    message = changed(V2, "payload.signalstatus.deviceinfo.status", "Bogus")
    message = changed(message, "payload.signalstatus.deviceinfo.speed", "x")
    message = changed(message, "assetid", ...)
    message = changed(message, "zzz", 1)
    message = changed(message, "sendertimestamp", "now")
    issues = validator.validate(message)
    assert paths(issues) == [
        "$.assetid",
        f"{DEVICEINFO}.speed",
        f"{DEVICEINFO}.status",
        "$.sendertimestamp",
        "$.zzz",
    ]
    with pytest.raises(
        InvalidMessage, match=r"^\$\.assetid: required property is missing \(and 4 more\)$"
    ):
        validator.validate_or_raise(message)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        pytest.param(
            changed(changed(V2, "zz", 1), "aa", 2),
            ["$.aa", "$.zz"],
            id="each-extra-key-is-its-own-issue",
        ),
        pytest.param(
            changed(changed(V2, "headerversion", 4), "assetid", 5),
            ["$.headerversion"],
            id="unknown-header-version-stops-there",
        ),
        pytest.param(
            changed(changed(V2, "payloadversion", 7), "assetid", ...),
            ["$.payloadversion", "$.assetid"],
            id="refusal-comes-before-header-issues",
        ),
        pytest.param(
            changed(V2, "payload", "x"), ["$.payload"], id="payload-not-an-object-reported-once"
        ),
        pytest.param(
            changed(
                changed(V2, "headerversion", ...), "payload.signalstatus.deviceinfo.status", "Bogus"
            ),
            ["$.headerversion", f"{DEVICEINFO}.status"],
            id="missing-headerversion-still-checks-everything",
        ),
    ],
)
def test_issue_paths(
    validator: MessageValidator, message: dict[str, Any], expected: list[str]
) -> None:
    assert paths(validator.validate(message)) == expected


def test_the_bogus_status_quirk_is_applied_to_the_whole_message(
    validator: MessageValidator,
) -> None:
    """The reference client applied the payload schema to the payload alone: nothing."""
    import jsonschema_rs

    message = changed(V2, "payload.signalstatus.deviceinfo.status", "Bogus")
    v2 = jsonschema_rs.validator_for(payload_schema("generic.signal", "Status", 2))
    assert v2.is_valid(message["payload"])  # the reference client's mistake
    assert not validator.is_valid(message)


# --------------------------------------------------------------------------- strict


@pytest.fixture(scope="module")
def strict() -> MessageValidator:
    return MessageValidator(strict=True)


def test_strict_accepts_contract_messages(strict: MessageValidator) -> None:
    assert strict.validate(V1) == []
    assert strict.validate(changed(V2, "assettimestamp", "2026-11-25T11:00:00.120+01:00")) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sendertimestamp", "2026-11-25T10:00:00Z"),
        ("assettimestamp", "2026-11-25T10:00:00.1Z"),
        ("assettimestamp", "2026-11-25T10:00:00.123456Z"),
        ("sendereventuuid", "not-a-uuid"),
        ("sendereventuuid", "0b5e3d5252e44f439b1e7f0c1f0a1b2c"),
    ],
)
def test_strict_refuses_what_the_contract_forbids(
    validator: MessageValidator, strict: MessageValidator, field: str, value: str
) -> None:
    message = changed(V2, field, value)
    assert validator.validate(message) == []
    assert paths(strict.validate(message)) == [f"$.{field}"]
    assert not strict.is_valid(message)


# --------------------------------------------------------------------------- JSON text


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "Expecting value"),
        (b"{", "Expecting property name"),
        # Python's json module says what it found; from 3.13 on it names a trailing comma.
        (
            '{"a": 1,}',
            "Illegal trailing comma" if sys.version_info >= (3, 13) else "Expecting property name",
        ),
        (b'{"a": NaN}', "NaN is not valid JSON"),
        (b'{"a": -Infinity}', "-Infinity is not valid JSON"),
        (b'{"a": "\xff"}', "not UTF-8"),
        (b"[" * 100_000, "nested too deeply"),
        (json.dumps(V2) + " x", "Extra data"),
    ],
)
def test_malformed_json_is_one_issue_at_the_root(
    validator: MessageValidator, data: bytes | str, fragment: str
) -> None:
    issues = validator.validate_json(data)
    assert len(issues) == 1
    assert issues[0].path == "$"
    assert issues[0].message.startswith("invalid JSON: ")
    assert fragment in issues[0].message


@pytest.mark.parametrize("depth", [256, 300, 900])
def test_nesting_beyond_the_validators_reach_is_never_valid(
    validator: MessageValidator, depth: int
) -> None:
    """jsonschema_rs stops at 255 levels; such a message (parsed: the JSON parser takes
    up to 1024 levels) is refused with a clear reason, not taken for a valid one."""
    deep: object = 1
    for _ in range(depth):
        deep = {"a": deep}
    message = changed(V2, "payload.signalstatus.deviceinfo.status", deep)
    for issues in (validator.validate(message), validator.validate_json(json.dumps(message))):
        assert [issue.path for issue in issues] == ["$"]
        assert "nesting deeper than 255 levels" in issues[0].message
    assert not validator.is_valid(message)
    shallow = changed(V2, "payload.signalstatus.deviceinfo.status", {"a": {"a": 1}})
    assert set(paths(validator.validate(shallow))) == {"$.payload.signalstatus.deviceinfo.status"}


def test_json_text_is_validated_like_the_parsed_message(validator: MessageValidator) -> None:
    message = changed(V2, "payload.signalstatus.deviceinfo.status", "Bogus")
    assert validator.validate_json(json.dumps(message).encode()) == validator.validate(message)
    assert validator.validate_json(bytearray(json.dumps(V1).encode())) == []
    assert validator.validate_json(memoryview(json.dumps(V1).encode())) == []


@pytest.mark.parametrize(
    "text",
    [
        b'{"n": 123456789012345678901234567890}',  # beyond 64 bits: still an exact int
        b'{"n": -9223372036854775809, "m": 18446744073709551615}',
        b'{"n": 1E400}',  # the json module reads infinity
        b'{"s": "\\ud800", "\\udfff": 1}',  # lone surrogate escapes
        b'{"a": 1, "a": 2}',
        b'{"f": [0.1, -0.0, 1.7976931348623157e308, 5e-324, 12345678901234567e-5, 1e22]}',
        b'{"u": "\\u00e9\\ud83d\\ude00 \xc3\xa9", "z": "\\u0000"}',
        b"[" * 600 + b"]" * 600,
    ],
)
def test_parse_json_reads_what_the_json_module_reads(text: bytes) -> None:
    value, issue = parse_json(text)
    assert issue is None
    assert repr(value) == repr(json.loads(text))  # repr: 1 and 1.0, 0.0 and -0.0 differ
    assert repr(parse_json(bytearray(text))[0]) == repr(value)
    assert repr(parse_json(text.decode("utf-8", "surrogatepass"))[0]) == repr(value)


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec=None)),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(st.characters(codec=None), max_size=4), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_JSON_VALUES, st.booleans())
def test_parse_json_agrees_with_the_json_module(value: Any, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    parsed, issue = parse_json(text)
    try:
        expected = json.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        assert issue is not None and "not UTF-8" in issue.message
        return
    assert issue is None
    assert repr(parsed) == repr(expected)


def test_module_level_shortcuts_use_the_default_validator() -> None:
    assert validate_message(V2) == []
    assert validate_json(json.dumps(V1)) == []
    assert message_schemas.default_validator() is message_schemas.default_validator()


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        ([], "$"),
        (["payload", "signalstatus"], "$.payload.signalstatus"),
        (["jobphase", 0, "part", 12], "$.jobphase[0].part[12]"),
        (["with space"], "$['with space']"),
        (["it's"], "$['it\\'s']"),
        (["a.b"], "$['a.b']"),
        (["_ok1"], "$._ok1"),
        (["1st"], "$['1st']"),
    ],
)
def test_format_path(parts: list[str | int], expected: str) -> None:
    assert format_path(parts) == expected


def test_invalid_message_needs_issues() -> None:
    with pytest.raises(ValueError, match="at least one issue"):
        InvalidMessage([])
    err = InvalidMessage([ValidationIssue("$.a", "bad")])
    assert str(err) == "$.a: bad"
    assert str(ValidationIssue("$", "x")) == "$: x"


def test_validator_is_usable_from_many_threads(validator: MessageValidator) -> None:
    from concurrent.futures import ThreadPoolExecutor

    bad = changed(V2, "payload.signalstatus.deviceinfo.status", "Bogus")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(validator.validate, [V1, V2, bad] * 200))
    assert all(r == [] for r in results[0::3])
    assert all(r == [] for r in results[1::3])
    assert all(paths(r) == [f"{DEVICEINFO}.status"] for r in results[2::3])


# --------------------------------------------------------------------------- non-JSON data
# The schema check is what decides; values JSON cannot carry (lone surrogates, non-string
# keys, other Python types) never make the validator raise, and are named when the
# library trips over them while collecting issues.

BOGUS = changed(V2, "payload.signalstatus.deviceinfo.status", "Bogus")


def test_lone_surrogates_are_reported_not_raised(validator: MessageValidator) -> None:
    issues = validator.validate(changed(BOGUS, "assetname", "bad \ud800"))
    assert issues[0] == ValidationIssue(
        "$.assetname", "string is not valid Unicode (lone surrogate)"
    )
    assert paths(issues) in (["$.assetname"], ["$.assetname", f"{DEVICEINFO}.status"])
    # JSON text may spell one with an escape
    text = json.dumps(BOGUS).replace('"Press 1"', '"\\ud800"')
    assert paths(validator.validate_json(text))[0] == "$.assetname"
    assert validator.validate_json(json.dumps(V2).replace('"Press 1"', '"\\ud800"')) in (
        [],
        [ValidationIssue("$.assetname", "string is not valid Unicode (lone surrogate)")],
    )


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ({1: "x"}, "key 1 is not a string"),
        (object(), "object is not a JSON value"),
        ({"\udc00": 1}, "key is not valid Unicode"),
    ],
)
def test_python_values_json_cannot_carry(
    validator: MessageValidator, value: Any, fragment: str
) -> None:
    issues = validator.validate(changed(BOGUS, "payload.vendor", value))
    assert paths(issues) == [f"{DEVICEINFO}.status", "$.payload.vendor"]
    assert fragment in issues[1].message
    assert not validator.is_valid(changed(BOGUS, "payload.vendor", value))


def test_nan_in_a_message_dict_is_named(validator: MessageValidator) -> None:
    issues = validator.validate(changed(V2, "payload.signalstatus.deviceinfo.speed", float("nan")))
    assert issues == [ValidationIssue(f"{DEVICEINFO}.speed", "nan is not a JSON number")]
