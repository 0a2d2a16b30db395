"""Property tests: any payload, however malformed, ends in an accepted update or a
documented rejection, never in another exception; accepted documents keep the invariants."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotref.protocol import shadow_document as sd

T = 1_700_000_000
DOCUMENTED = {
    400: {
        sd.MSG_INVALID_JSON,
        sd.MSG_MISSING_STATE,
        sd.MSG_STATE_NOT_OBJECT,
        sd.MSG_DESIRED_NOT_OBJECT,
        sd.MSG_REPORTED_NOT_OBJECT,
        sd.MSG_INVALID_VERSION,
        sd.MSG_INVALID_CLIENT_TOKEN,
        sd.MSG_TOO_DEEP,
        sd.MSG_INVALID_NODE,
    },
    409: {sd.MSG_VERSION_CONFLICT},
    413: {sd.MSG_TOO_LARGE},
    415: {sd.MSG_UNSUPPORTED_ENCODING},
}

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=30,
)
keys = st.sampled_from(["a", "b", "c", "d"])
leaf_values = st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(["x", "y"])
patches = st.recursive(
    leaf_values | st.lists(st.integers(0, 3), max_size=3),
    lambda children: st.dictionaries(keys, children, max_size=3),
    max_leaves=12,
)
sections = st.none() | st.dictionaries(keys, patches, max_size=4)
requests = st.fixed_dictionaries(
    {},
    optional={
        "desired": sections,
        "reported": sections,
    },
).map(lambda state: {"state": state})


def check(payload: bytes, current: sd.ShadowDocument | None = None) -> Any:
    result: Any
    try:
        request = sd.parse_update(payload)
        result = sd.apply_update(current, request, T)
    except sd.ShadowError as exc:
        result = exc
    if isinstance(result, sd.ShadowError):
        assert result.message in DOCUMENTED[result.code], (result.code, result.message)
        body = result.payload(T)
        assert set(body) <= {"code", "message", "timestamp", "clientToken"}
        json.dumps(body)
    return result


@given(st.binary(max_size=300))
def test_random_bytes_are_answered(payload: bytes) -> None:
    check(payload)
    error: sd.ShadowError | None = None
    try:
        sd.parse_simple(payload, strict=True)
    except sd.ShadowError as exc:
        error = exc
    assert error is None or error.message in DOCUMENTED[error.code]
    assert isinstance(sd.parse_simple(payload, strict=False), sd.SimpleRequest)


@given(json_values)
def test_random_json_is_answered(value: Any) -> None:
    check(json.dumps(value).encode())
    check(json.dumps({"state": value}).encode())
    check(json.dumps({"state": {"desired": value}, "clientToken": value}).encode())
    check(json.dumps({"state": {"reported": value}, "version": value}).encode())


@given(st.integers(1, 400), st.sampled_from(["[", '{"a":', '{"state":{"desired":{"a":']))
def test_deep_payloads_are_rejected(levels: int, opener: str) -> None:
    result = check((opener * levels).encode())
    assert isinstance(result, sd.ShadowError)


@given(st.integers(7, 60))
def test_deep_state_is_rejected_with_the_nesting_message(levels: int) -> None:
    value: Any = 1
    for _ in range(levels):
        value = {"k": value}
    result = check(json.dumps({"state": {"desired": value}}).encode())
    assert isinstance(result, sd.ShadowError)
    assert (result.code, result.message) == (400, sd.MSG_TOO_DEEP)


@given(st.integers(8 * 1024, 200 * 1024))
def test_huge_payloads_are_rejected_with_413(size: int) -> None:
    payload = json.dumps({"state": {"reported": {"blob": "x" * size}}}).encode()
    result = check(payload)
    assert isinstance(result, sd.ShadowError)
    assert (result.code, result.message) == (413, sd.MSG_TOO_LARGE)


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=200)
@given(st.lists(requests, min_size=1, max_size=8))
def test_update_sequences_keep_invariants(sequence: list[dict[str, Any]]) -> None:
    doc: sd.ShadowDocument | None = None
    for request in sequence:
        result = check(json.dumps(request).encode(), doc)
        if isinstance(result, sd.ShadowError):
            assert result.code == 413
            continue
        assert result.document.version == (doc.version if doc else 0) + 1
        doc = result.document
        for section in ("desired", "reported"):
            if section in doc.state:
                assert doc.state[section], "empty sections are removed"
                assert _shape(doc.metadata[section]) == _shape_of_state(doc.state[section])
            else:
                assert section not in doc.metadata
        assert not any(_contains_empty_object(v) for v in doc.state.values())
        assert not _contains_null(doc.state)
        delta = doc.delta()
        if result.delta is None:
            assert delta == {}
        else:
            assert result.delta["state"] == delta
        assert result.documents["current"]["state"] == doc.state
        got = sd.get_response(doc, T)
        assert got["state"].get("delta", {}) == delta


def _shape(meta: Any) -> Any:
    if isinstance(meta, dict) and set(meta) == {"timestamp"}:
        return "leaf"
    if isinstance(meta, dict):
        return {k: _shape(v) for k, v in meta.items()}
    if isinstance(meta, list):
        return [_shape(v) for v in meta]
    raise AssertionError(meta)


def _shape_of_state(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _shape_of_state(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape_of_state(v) for v in value]
    return "leaf"


def _contains_empty_object(value: Any) -> bool:
    if isinstance(value, dict):
        return not value or any(_contains_empty_object(v) for v in value.values())
    return False


def _contains_null(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, dict):
        return any(_contains_null(v) for v in value.values())
    if isinstance(value, list):
        return any(_contains_null(v) for v in value)
    return False


def _stored(patch: dict[str, Any]) -> dict[str, Any]:
    """A section as the service stores it: ``patch`` merged into an empty section."""
    section: dict[str, Any] = {}
    sd.merge_section(section, patch)
    return section


section_patches = st.dictionaries(keys, patches, max_size=4)


@given(section_patches, section_patches)
def test_section_patch_turns_old_into_new(old_patch: Any, new_patch: Any) -> None:
    old, new = _stored(old_patch), _stored(new_patch)
    target = json.loads(json.dumps(old))
    patch = sd.section_patch(old, new)
    sd.merge_section(target, patch)
    assert sd.json_equal(target, new)
    assert sd.section_patch(new, new) == {}
    assert sd.section_patch(target, new) == {}


@given(section_patches, section_patches)
def test_merge_without_metadata_is_the_service_merge(first: Any, second: Any) -> None:
    doc = None
    for patch in (first, second):
        result = check(json.dumps({"state": {"reported": patch}}).encode(), doc)
        assert not isinstance(result, sd.ShadowError)
        doc = result.document
    section = _stored(first)
    sd.merge_section(section, second)
    assert doc is not None
    assert doc.state.get("reported", {}) == section
