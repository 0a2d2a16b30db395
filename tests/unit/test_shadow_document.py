"""The shadow document rules as tables: request -> exact document or exact error."""

from __future__ import annotations

import json
from typing import Any

import pytest

from iotref.protocol import shadow_document as sd

T = 1_700_000_000
T2 = T + 5


def update(current: sd.ShadowDocument | None, request: Any, ts: int = T, **kw: Any):
    payload = request if isinstance(request, bytes | str) else json.dumps(request)
    return sd.apply_update(current, sd.parse_update(payload), ts, **kw)


def error(code: int, message: str, token: str | None = None) -> sd.ShadowError:
    return sd.ShadowError(code, message, token)


# --------------------------------------------------------------------------- validation

TOKEN_64 = "x" * 64
TOKEN_65 = "x" * 65
DEEP_6 = {"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}}
DEEP_7 = {"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}

REJECTED = [
    pytest.param(b"", error(400, "Invalid JSON"), id="empty"),
    pytest.param(b"{", error(400, "Invalid JSON"), id="truncated"),
    pytest.param(b"not json", error(400, "Invalid JSON"), id="garbage"),
    pytest.param(b"[1, 2]", error(400, "Invalid JSON"), id="array-root"),
    pytest.param(b'"state"', error(400, "Invalid JSON"), id="string-root"),
    pytest.param(b"null", error(400, "Invalid JSON"), id="null-root"),
    pytest.param(b'{"state": {"desired": {"a": NaN}}}', error(400, "Invalid JSON"), id="nan"),
    pytest.param(b'{"state": {"desired": {"a": 1e999}}}', error(400, "Invalid JSON"), id="inf"),
    pytest.param(
        b'{"state": {"desired": {"a": "\xff"}}}',
        error(415, "Unsupported documented encoding; supported encoding is UTF-8"),
        id="not-utf8",
    ),
    pytest.param({}, error(400, "Missing required node: state"), id="no-state"),
    pytest.param(
        {"clientToken": "t1"}, error(400, "Missing required node: state", "t1"), id="no-state-token"
    ),
    pytest.param({"state": 1}, error(400, "State node must be an object"), id="state-number"),
    pytest.param({"state": "x"}, error(400, "State node must be an object"), id="state-string"),
    pytest.param({"state": [1]}, error(400, "State node must be an object"), id="state-array"),
    pytest.param(
        {"state": {"desired": 1}}, error(400, "Desired node must be an object"), id="desired-number"
    ),
    pytest.param(
        {"state": {"desired": [1]}},
        error(400, "Desired node must be an object"),
        id="desired-array",
    ),
    pytest.param(
        {"state": {"reported": "on"}},
        error(400, "Reported node must be an object"),
        id="reported-string",
    ),
    pytest.param(
        {"state": {"delta": {"a": 1}}}, error(400, "State contains an invalid node"), id="delta"
    ),
    pytest.param(
        {"state": {"color": "red"}}, error(400, "State contains an invalid node"), id="unknown-node"
    ),
    pytest.param(
        {"state": {"desired": {"a": [None, 1]}}},
        error(400, "State contains an invalid node"),
        id="null-in-array",
    ),
    pytest.param(
        {"state": {"desired": {}}, "version": "1"}, error(400, "Invalid version"), id="version-str"
    ),
    pytest.param(
        {"state": {"desired": {}}, "version": 1.5},
        error(400, "Invalid version"),
        id="version-float",
    ),
    pytest.param(
        {"state": {"desired": {}}, "version": True},
        error(400, "Invalid version"),
        id="version-bool",
    ),
    pytest.param(
        {"state": {"desired": {}}, "clientToken": TOKEN_65},
        error(400, "Invalid clientToken"),
        id="token-65-bytes",
    ),
    pytest.param(
        {"state": {"desired": {}}, "clientToken": "é" * 33},
        error(400, "Invalid clientToken"),
        id="token-66-utf8-bytes",
    ),
    pytest.param(
        {"state": {"desired": {}}, "clientToken": 5},
        error(400, "Invalid clientToken"),
        id="token-number",
    ),
    pytest.param(
        {"state": {"desired": DEEP_7}, "clientToken": "d"},
        error(400, "JSON contains too many levels of nesting; maximum is 6", "d"),
        id="depth-7",
    ),
    pytest.param(
        {"state": {"reported": {"a": {"b": {"c": {"d": {"e": {"f": [1]}}}}}}}},
        error(400, "JSON contains too many levels of nesting; maximum is 6"),
        id="depth-7-array",
    ),
    pytest.param(
        {"state": {"desired": {"big": "x" * 8200}}, "clientToken": "b"},
        error(413, "The payload exceeds the maximum size allowed", "b"),
        id="section-over-8k",
    ),
    pytest.param(
        b"[" * 100_000,
        error(400, "JSON contains too many levels of nesting; maximum is 6"),
        id="deep-brackets",
    ),
    pytest.param(
        b" " * (128 * 1024 + 1),
        error(413, "The payload exceeds the maximum size allowed"),
        id="over-128k",
    ),
]


@pytest.mark.parametrize(("payload", "expected"), REJECTED)
def test_update_rejected(payload: Any, expected: sd.ShadowError) -> None:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    with pytest.raises(sd.ShadowError) as info:
        sd.parse_update(raw)
    assert info.value == expected
    assert info.value.payload(T) == {
        "code": expected.code,
        "message": expected.message,
        "timestamp": T,
        **({"clientToken": expected.client_token} if expected.client_token else {}),
    }


ACCEPTED_REQUESTS = [
    {"state": {"desired": DEEP_6}},
    {"state": {"desired": {"a": 1}}, "clientToken": TOKEN_64},
    {"state": {"desired": {"big": "x" * 8000}}},
    {"state": {}},
    {"state": None},
    {"state": {"desired": None, "reported": {"a": [1, [2, 3]]}}},
    {"state": {"desired": {"a": 1}}, "version": 0, "extra": "ignored"},
]


@pytest.mark.parametrize("request_doc", ACCEPTED_REQUESTS)
def test_update_valid(request_doc: Any) -> None:
    parsed = sd.parse_update(json.dumps(request_doc))
    assert parsed.state == request_doc["state"]
    assert parsed.client_token == request_doc.get("clientToken")
    assert parsed.version == request_doc.get("version")


@pytest.mark.parametrize(
    ("payload", "strict", "expected"),
    [
        (b"", True, sd.SimpleRequest()),
        (b"  ", True, sd.SimpleRequest()),
        (b"{}", True, sd.SimpleRequest()),
        (b'{"clientToken": "abc"}', True, sd.SimpleRequest("abc")),
        (b"junk", False, sd.SimpleRequest()),
        (b'{"clientToken": 1}', False, sd.SimpleRequest()),
    ],
)
def test_get_delete_payloads(payload: bytes, strict: bool, expected: sd.SimpleRequest) -> None:
    assert sd.parse_simple(payload, strict=strict) == expected


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"junk", error(400, "Invalid JSON")),
        (b"[]", error(400, "Invalid JSON")),
        (b'{"clientToken": 1}', error(400, "Invalid clientToken")),
        (b"\xfe\xff", error(415, "Unsupported documented encoding; supported encoding is UTF-8")),
    ],
)
def test_get_rejected(payload: bytes, expected: sd.ShadowError) -> None:
    with pytest.raises(sd.ShadowError) as info:
        sd.parse_simple(payload, strict=True)
    assert info.value == expected


def test_not_found_messages() -> None:
    assert sd.not_found_error("thing1", None, "c").payload(T) == {
        "code": 404,
        "message": "No shadow exists with name: 'thing1'",
        "timestamp": T,
        "clientToken": "c",
    }
    assert sd.not_found_error("thing1", "config", None).message == (
        "No shadow exists with name: 'config'"
    )


# --------------------------------------------------------------------------- updates


def test_first_update_creates_version_1() -> None:
    out = update(None, {"state": {"reported": {"color": "green"}}, "clientToken": "c1"})
    assert out.accepted == {
        "state": {"reported": {"color": "green"}},
        "metadata": {"reported": {"color": {"timestamp": T}}},
        "version": 1,
        "timestamp": T,
        "clientToken": "c1",
    }
    assert list(out.accepted) == ["state", "metadata", "version", "timestamp", "clientToken"]
    assert out.documents == {
        "previous": None,
        "current": {
            "state": {"reported": {"color": "green"}},
            "metadata": {"reported": {"color": {"timestamp": T}}},
            "version": 1,
        },
        "timestamp": T,
        "clientToken": "c1",
    }
    assert out.delta is None
    assert out.document == sd.ShadowDocument(
        {"reported": {"color": "green"}}, {"reported": {"color": {"timestamp": T}}}, 1
    )


def test_desired_change_gives_delta_and_documents() -> None:
    doc = update(None, {"state": {"desired": {"color": "green"}, "reported": {"color": "green"}}})
    out = update(doc.document, {"state": {"desired": {"color": "red"}}, "clientToken": "c2"}, T2)
    assert out.accepted == {
        "state": {"desired": {"color": "red"}},
        "metadata": {"desired": {"color": {"timestamp": T2}}},
        "version": 2,
        "timestamp": T2,
        "clientToken": "c2",
    }
    assert out.delta == {
        "version": 2,
        "timestamp": T2,
        "state": {"color": "red"},
        "metadata": {"color": {"timestamp": T2}},
        "clientToken": "c2",
    }
    assert list(out.delta) == ["version", "timestamp", "state", "metadata", "clientToken"]
    assert out.documents == {
        "previous": {
            "state": {"desired": {"color": "green"}, "reported": {"color": "green"}},
            "metadata": {
                "desired": {"color": {"timestamp": T}},
                "reported": {"color": {"timestamp": T}},
            },
            "version": 1,
        },
        "current": {
            "state": {"desired": {"color": "red"}, "reported": {"color": "green"}},
            "metadata": {
                "desired": {"color": {"timestamp": T2}},
                "reported": {"color": {"timestamp": T}},
            },
            "version": 2,
        },
        "timestamp": T2,
        "clientToken": "c2",
    }


def test_reported_catching_up_gives_no_delta() -> None:
    doc = update(None, {"state": {"desired": {"color": "red"}}}).document
    out = update(doc, {"state": {"reported": {"color": "red"}}}, T2)
    assert out.delta is None
    assert "clientToken" not in out.accepted


def test_delta_holds_all_differences_not_only_the_updated_ones() -> None:
    doc = update(None, {"state": {"desired": {"a": 1, "b": 2}, "reported": {"a": 1}}}).document
    out = update(doc, {"state": {"reported": {"a": 5}}}, T2)
    assert out.delta is not None
    assert out.delta["state"] == {"a": 1, "b": 2}
    assert out.delta["metadata"] == {"a": {"timestamp": T}, "b": {"timestamp": T}}


def test_null_removes_fields_and_emptied_sections() -> None:
    doc = update(None, {"state": {"desired": {"a": 1, "b": 2}, "reported": {"a": 1}}}).document
    out = update(doc, {"state": {"desired": {"a": None}}}, T2)
    assert out.document.state == {"desired": {"b": 2}, "reported": {"a": 1}}
    assert out.document.metadata == {
        "desired": {"b": {"timestamp": T}},
        "reported": {"a": {"timestamp": T}},
    }
    assert out.accepted["state"] == {"desired": {"a": None}}
    assert out.accepted["metadata"] == {"desired": {"a": {"timestamp": T2}}}
    out = update(out.document, {"state": {"desired": {"b": None}}}, T2)
    assert out.document.state == {"reported": {"a": 1}}
    assert "desired" not in out.documents["current"]["state"]
    assert "desired" not in out.documents["current"]["metadata"]


def test_desired_null_clears_the_section() -> None:
    doc = update(None, {"state": {"desired": {"a": 1, "b": {"c": 2}}}}).document
    out = update(doc, {"state": {"reported": {"a": 1}, "desired": None}}, T2)
    assert out.document.state == {"reported": {"a": 1}}
    assert out.accepted["state"] == {"reported": {"a": 1}, "desired": None}
    assert out.accepted["metadata"] == {
        "reported": {"a": {"timestamp": T2}},
        "desired": {"timestamp": T2},
    }
    assert out.delta is None


def test_state_null_clears_everything_but_keeps_the_shadow() -> None:
    doc = update(None, {"state": {"desired": {"a": 1}, "reported": {"b": 2}}}).document
    out = update(doc, {"state": None}, T2)
    assert out.document == sd.ShadowDocument({}, {}, 2)
    assert out.accepted == {
        "state": None,
        "metadata": {"timestamp": T2},
        "version": 2,
        "timestamp": T2,
    }
    assert out.documents["current"] == {"state": {}, "metadata": {}, "version": 2}


def test_nested_objects_merge_and_delta_recursively() -> None:
    doc = update(
        None,
        {
            "state": {
                "desired": {"lights": {"color": "red", "level": 5}, "mode": "auto"},
                "reported": {"lights": {"color": "red", "level": 3}, "mode": "auto"},
            }
        },
    ).document
    out = update(doc, {"state": {"desired": {"lights": {"on": True}}}}, T2)
    assert out.document.state["desired"] == {
        "lights": {"color": "red", "level": 5, "on": True},
        "mode": "auto",
    }
    assert out.document.metadata["desired"] == {
        "lights": {
            "color": {"timestamp": T},
            "level": {"timestamp": T},
            "on": {"timestamp": T2},
        },
        "mode": {"timestamp": T},
    }
    assert out.delta is not None
    assert out.delta["state"] == {"lights": {"level": 5, "on": True}}
    assert out.delta["metadata"] == {"lights": {"level": {"timestamp": T}, "on": {"timestamp": T2}}}
    out = update(out.document, {"state": {"desired": {"lights": {"color": None}}}}, T2)
    assert out.document.state["desired"]["lights"] == {"level": 5, "on": True}
    gone = update(out.document, {"state": {"desired": {"lights": {"level": None, "on": None}}}})
    assert gone.document.state["desired"] == {"mode": "auto"}
    assert gone.document.metadata["desired"] == {"mode": {"timestamp": T}}


def test_arrays_replace_whole_and_compare_as_values() -> None:
    doc = update(
        None,
        {"state": {"desired": {"colors": ["RED", "GREEN", "BLUE"]}, "reported": {"colors": []}}},
    ).document
    assert doc.metadata["desired"]["colors"] == [{"timestamp": T}] * 3
    out = update(doc, {"state": {"desired": {"colors": ["RED"]}}}, T2)
    assert out.document.state["desired"] == {"colors": ["RED"]}
    assert out.document.metadata["desired"] == {"colors": [{"timestamp": T2}]}
    assert out.delta is not None
    assert out.delta["state"] == {"colors": ["RED"]}
    out = update(out.document, {"state": {"reported": {"colors": ["RED"]}}}, T2)
    assert out.delta is None
    objects = update(None, {"state": {"reported": {"list": [{"a": 1}, [2]]}}})
    assert objects.document.metadata["reported"]["list"] == [
        {"a": {"timestamp": T}},
        [{"timestamp": T}],
    ]


@pytest.mark.parametrize(
    ("desired", "reported", "delta"),
    [
        ({"a": 1}, {}, {"a": 1}),
        ({"a": 1}, {"a": 1}, {}),
        ({}, {"a": 1}, {}),
        ({"a": 1}, {"a": 1.0}, {}),
        ({"a": True}, {"a": 1}, {"a": True}),
        ({"a": 0}, {"a": False}, {"a": 0}),
        ({"a": "1"}, {"a": 1}, {"a": "1"}),
        ({"a": {"b": 1}}, {"a": 1}, {"a": {"b": 1}}),
        ({"a": 1}, {"a": {"b": 1}}, {"a": 1}),
        ({"a": {"b": {"c": 1, "d": 2}}}, {"a": {"b": {"c": 1}}}, {"a": {"b": {"d": 2}}}),
        ({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}, {}),
        ({"a": [1, 2]}, {"a": [2, 1]}, {"a": [1, 2]}),
        ({"a": [{"x": 1}]}, {"a": [{"x": 1}]}, {}),
        ({"a": [{"x": 1, "y": 2}]}, {"a": [{"y": 2, "x": 1}]}, {}),
    ],
)
def test_delta_rules(desired: Any, reported: Any, delta: Any) -> None:
    assert sd.compute_delta(desired, reported) == delta


@pytest.mark.parametrize(
    ("section", "patch", "merged"),
    [
        ({"a": 1, "b": 2}, {"a": None}, {"b": 2}),
        ({"a": 1}, {"gone": None}, {"a": 1}),
        ({"a": {"b": 1}}, {"a": {"c": 2}}, {"a": {"b": 1, "c": 2}}),
        ({"a": {"b": {"c": 1}}}, {"a": {"b": {"d": 2}}}, {"a": {"b": {"c": 1, "d": 2}}}),
        ({"a": {"b": 1}, "c": 3}, {"a": {"b": None}}, {"c": 3}),
        ({}, {"a": {"b": None}}, {}),
        ({}, {"a": {}}, {}),
        ({"a": 1}, {"a": {"b": 1}}, {"a": {"b": 1}}),
        ({"a": {"b": 1}}, {"a": [1]}, {"a": [1]}),
        ({"a": [1, 2]}, {"a": [3]}, {"a": [3]}),
        ({"a": True}, {"a": 1}, {"a": 1}),
    ],
)
def test_merge_rules(section: Any, patch: Any, merged: Any) -> None:
    sd.merge_section(section, patch)
    assert section == merged
    assert all(type(section[k]) is type(merged[k]) for k in merged)  # 1 stays 1, not True


def test_merged_arrays_are_copies() -> None:
    patch: dict[str, Any] = {"a": [{"x": 1}], "b": {"c": [2]}}
    section: dict[str, Any] = {}
    sd.merge_section(section, patch)
    patch["a"][0]["x"] = 5
    patch["b"]["c"].append(3)
    assert section == {"a": [{"x": 1}], "b": {"c": [2]}}


@pytest.mark.parametrize(
    ("old", "new", "patch"),
    [
        ({"a": 1}, {"a": 1}, {}),
        ({"a": 1}, {"a": 1.0}, {}),
        ({"x": True}, {"x": 1}, {"x": 1}),
        ({"x": 0}, {"x": False}, {"x": False}),
        ({"a": 1}, {}, {"a": None}),
        ({}, {"a": {"b": 1}}, {"a": {"b": 1}}),
        ({"b": {"c": 2, "d": 3}}, {"b": {"c": 5}}, {"b": {"c": 5, "d": None}}),
        ({"a": {"b": 1}}, {}, {"a": None}),
        ({"a": {"b": 1}}, {"a": {}}, {"a": {"b": None}}),
        ({"a": 1}, {"a": {"b": 1}}, {"a": {"b": 1}}),
        ({"a": {"b": 1}}, {"a": 1}, {"a": 1}),
        ({"e": [1, 2]}, {"e": [1, 2, 3]}, {"e": [1, 2, 3]}),
        ({"e": [{"x": 1, "y": 2}]}, {"e": [{"y": 2, "x": 1}]}, {}),
    ],
)
def test_section_patch_rules(old: Any, new: Any, patch: Any) -> None:
    assert sd.section_patch(old, new) == patch


def test_section_patch_round_trips_through_the_merge() -> None:
    old = {"a": 1, "b": {"c": 2, "d": 3}, "e": [1, 2], "gone": True}
    new = {"a": 1, "b": {"c": 5}, "e": [1, 2, 3], "f": {"g": None}}
    patch = sd.section_patch(old, new)
    assert patch == {"b": {"c": 5, "d": None}, "e": [1, 2, 3], "f": {"g": None}, "gone": None}
    target = json.loads(json.dumps(old))
    sd.merge_section(target, patch)
    assert target == {"a": 1, "b": {"c": 5}, "e": [1, 2, 3]}
    assert sd.section_patch(new, new) == {}
    new["e"].append(4)
    assert patch["e"] == [1, 2, 3], "the patch holds copies"


def test_version_conflict_and_conditional_update() -> None:
    doc = update(None, {"state": {"desired": {"colors": ["RED", "GREEN", "BLUE"]}}}).document
    for _ in range(9):
        doc = update(doc, {"state": {"reported": {"n": doc.version}}}).document
    assert doc.version == 10
    with pytest.raises(sd.ShadowError) as info:
        update(doc, {"state": {"desired": {"colors": ["BLUE"]}}, "version": 9, "clientToken": "v"})
    assert info.value.payload(T) == {
        "code": 409,
        "message": "Version conflict",
        "timestamp": T,
        "clientToken": "v",
    }
    out = update(doc, {"state": {"desired": {"colors": ["BLUE"]}}, "version": 10})
    assert out.document.version == 11
    assert out.document.state["desired"] == {"colors": ["BLUE"]}


def test_conditional_create() -> None:
    with pytest.raises(sd.ShadowError) as info:
        update(None, {"state": {"desired": {}}, "version": 3})
    assert info.value.code == 409
    assert update(None, {"state": {"desired": {"a": 1}}, "version": 0}).document.version == 1


def test_recreated_shadow_continues_versions() -> None:
    out = update(None, {"state": {"desired": {"a": 1}}}, base_version=13)
    assert out.document.version == 14
    assert out.accepted["version"] == 14
    assert out.documents["previous"] is None


def test_merged_section_over_limit_is_413() -> None:
    doc = update(None, {"state": {"reported": {"a": "x" * 5000}}}).document
    with pytest.raises(sd.ShadowError) as info:
        update(doc, {"state": {"reported": {"b": "y" * 5000}}, "clientToken": "z"})
    assert info.value == error(413, "The payload exceeds the maximum size allowed", "z")


def test_desired_and_reported_share_the_state_limit() -> None:
    """8 KB of state in all (desired and reported together), not 8 KB each."""
    half = {"a": "x" * 4500}
    with pytest.raises(sd.ShadowError) as at_once:
        update(None, {"state": {"desired": half, "reported": half}, "clientToken": "b"})
    assert at_once.value == error(413, "The payload exceeds the maximum size allowed", "b")
    doc = update(None, {"state": {"desired": half}}).document
    with pytest.raises(sd.ShadowError) as merged:
        update(doc, {"state": {"reported": half}})
    assert merged.value.code == 413
    assert update(doc, {"state": {"reported": {"a": "x" * 3500}}}).document.version == 2


def test_limits_are_parameters() -> None:
    limits = sd.ShadowLimits(state_max_bytes=40, max_depth=2)
    with pytest.raises(sd.ShadowError) as deep:
        sd.parse_update('{"state": {"desired": {"a": {"b": {"c": 1}}}}}', limits)
    assert deep.value.message == "JSON contains too many levels of nesting; maximum is 2"
    request = sd.parse_update('{"state": {"desired": {"a": "1234567890"}}}', limits)
    with pytest.raises(sd.ShadowError) as big:
        sd.apply_update(
            sd.apply_update(None, request, T, limits=limits).document,
            sd.parse_update('{"state": {"reported": {"b": "1234567890"}}}', limits),
            T,
            limits=limits,
        )
    assert big.value.code == 413


@pytest.mark.parametrize(
    ("thing", "shadow", "field"),
    [
        ("t" * 129, None, "thingName"),
        ("bad name", None, "thingName"),
        ("ok", "s" * 65, "shadowName"),
        ("ok", "a/b", "shadowName"),
        ("ok", "trailing\n", "shadowName"),
    ],
)
def test_names_over_the_limits_are_400(thing: str, shadow: str | None, field: str) -> None:
    refused = sd.name_error(thing, shadow)
    assert refused is not None
    assert refused.code == 400
    assert f"at '{field}' failed to satisfy constraint" in refused.message


def test_names_within_the_limits_pass() -> None:
    assert sd.name_error("t" * 128, "s" * 64) is None
    assert sd.name_error("iotref-0123:_-", "$package") is None


def test_empty_state_update_bumps_version() -> None:
    doc = update(None, {"state": {"desired": {"a": 1}}}).document
    out = update(doc, {"state": {}})
    assert out.document.version == 2
    assert out.document.state == doc.state
    assert out.accepted["state"] == {}


# --------------------------------------------------------------------------- get/delete


def test_get_response_shape() -> None:
    doc = update(
        None, {"state": {"desired": {"a": 1, "b": 2}, "reported": {"a": 1, "c": 3}}}
    ).document
    assert sd.get_response(doc, T2, "g") == {
        "state": {
            "desired": {"a": 1, "b": 2},
            "reported": {"a": 1, "c": 3},
            "delta": {"b": 2},
        },
        "metadata": {
            "desired": {"a": {"timestamp": T}, "b": {"timestamp": T}},
            "reported": {"a": {"timestamp": T}, "c": {"timestamp": T}},
        },
        "version": 1,
        "timestamp": T2,
        "clientToken": "g",
    }
    synced = update(doc, {"state": {"reported": {"b": 2}}}).document
    assert "delta" not in sd.get_response(synced, T2)["state"]
    assert sd.get_response(sd.ShadowDocument({}, {}, 4), T2) == {
        "state": {},
        "metadata": {},
        "version": 4,
        "timestamp": T2,
    }


def test_delete_response_shape() -> None:
    doc = sd.ShadowDocument({"desired": {"a": 1}}, {"desired": {"a": {"timestamp": T}}}, 13)
    assert sd.delete_response(doc, T2) == {"version": 13, "timestamp": T2}
    assert sd.delete_response(doc, T2, "d") == {"version": 13, "timestamp": T2, "clientToken": "d"}


def test_json_output_is_compact_utf8() -> None:
    assert sd.to_json({"a": "é", "b": [1, 2]}) == '{"a":"é","b":[1,2]}'.encode()
