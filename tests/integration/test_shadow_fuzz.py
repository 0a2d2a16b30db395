"""Hostile shadow requests over MQTT (Hypothesis), from a real provisioned device.

Random bytes, malformed JSON, deep nesting, payloads over the size limits, text that is not
UTF-8 and fields of the wrong type go to ``get``, ``update`` and ``delete`` of the classic
shadow and of a named shadow. Each request must get exactly one answer, on ``/accepted``
when it is valid and on ``/rejected`` with the documented ``code`` and ``message`` ("Device
Shadow error messages" in the AWS IoT developer guide; the constants are in
:mod:`iotref.protocol.shadow_document`) when it is not. Inputs built to break one rule
carry the answer that rule calls for; for unconstrained random input the expected answer
comes from :func:`~iotref.protocol.shadow_document.parse_update` (itself tested against the
documentation in ``tests/unit/test_shadow_document*.py``). After every example the shadow
service must still answer a normal update and get.

Bounded for ``make test``: ``IOTREF_SHADOW_FUZZ_EXAMPLES`` examples (default 80),
derandomized, no deadline.
"""

from __future__ import annotations

import json
import os
import queue
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotref.protocol import shadow_document as sd
from iotref.protocol.limits import MAX_PAYLOAD_BYTES
from iotref.protocol.topics import SHADOW_RESPONSE_SUFFIXES, shadow_prefix
from tests.support import mqtt_probe
from tests.support.pacing import Pacer
from tests.support.sandbox_process import SandboxProcess
from tests.support.tokens import provision_device

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("IOTREF_SHADOW_FUZZ_EXAMPLES", "80"))
NAMED = "fuzz"
SHADOWS = (None, NAMED)
# The broker refuses MQTT packets over 128 KB + 4 KB (and drops the client, as AWS IoT Core
# does); payloads over the service's 128 KB limit stay under that.
OVERSIZE = MAX_PAYLOAD_BYTES + 1024
JsonValue = Any


@dataclass(frozen=True)
class Expected:
    """``None`` code: accepted; otherwise the rejection's code and message."""

    code: int | None
    message: str | None = None
    client_token: str | None = None


ACCEPTED = Expected(None)


@dataclass(frozen=True)
class Request:
    operation: str
    payload: bytes
    expected: Expected | None  # None: ask the reference rules
    kind: str


# --------------------------------------------------------------------------- strategies

json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
leaf_values = st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=16)
sections = st.dictionaries(
    st.text(min_size=1, max_size=10),
    st.recursive(
        leaf_values,
        lambda inner: st.dictionaries(
            st.text(min_size=1, max_size=6), inner, min_size=1, max_size=3
        ),
        max_leaves=6,
    ),
    max_size=5,
)
tokens = st.text(alphabet=st.characters(codec="utf-8"), max_size=16).filter(
    lambda t: len(t.encode()) <= sd.MAX_CLIENT_TOKEN_BYTES
)


def _dump(value: JsonValue) -> bytes:
    return json.dumps(value).encode()


def _nested(levels: int, leaf: JsonValue = 1) -> JsonValue:
    value = leaf
    for i in range(levels):
        value = {f"k{i}": value}
    return value


@st.composite
def valid_updates(draw: st.DrawFn) -> Request:
    state: dict[str, JsonValue] = {}
    for section in draw(st.sets(st.sampled_from(sd.SECTIONS), min_size=1)):
        state[section] = draw(sections)
    token = draw(st.none() | tokens)
    doc: dict[str, JsonValue] = {"state": state}
    if token is not None:
        doc["clientToken"] = token
    # Nesting and size are left to the reference rules.
    return Request("update", _dump(doc), None, "valid update")


@st.composite
def wrong_types(draw: st.DrawFn) -> Request:
    """One field of a valid update with a value of the wrong type."""
    token = draw(tokens)
    not_object = (
        st.booleans() | st.integers() | st.text(max_size=8) | st.lists(json_scalars, max_size=3)
    )
    case = draw(
        st.sampled_from(
            ["state", "desired", "reported", "version", "clientToken", "node", "missing", "top"]
        )
    )
    doc: dict[str, JsonValue] = {"state": {"reported": {"a": 1}}, "clientToken": token}
    expected: Expected
    if case == "state":
        doc["state"] = draw(not_object)
        expected = Expected(400, sd.MSG_STATE_NOT_OBJECT, token)
    elif case in ("desired", "reported"):
        doc["state"] = {case: draw(not_object)}
        message = sd.MSG_DESIRED_NOT_OBJECT if case == "desired" else sd.MSG_REPORTED_NOT_OBJECT
        expected = Expected(400, message, token)
    elif case == "version":
        doc["version"] = draw(
            st.booleans()
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(max_size=5)
            | st.none()
        )
        expected = Expected(400, sd.MSG_INVALID_VERSION, token)
    elif case == "clientToken":
        doc["clientToken"] = draw(
            st.integers()
            | st.booleans()
            | st.none()
            | st.lists(st.integers(), max_size=2)
            | st.text(min_size=65, max_size=80)
        )
        expected = Expected(400, sd.MSG_INVALID_CLIENT_TOKEN)
    elif case == "node":
        doc["state"] = {draw(st.text(max_size=8).filter(lambda k: k not in sd.SECTIONS)): {}}
        expected = Expected(400, sd.MSG_INVALID_NODE, token)
    elif case == "missing":
        del doc["state"]
        expected = Expected(400, sd.MSG_MISSING_STATE, token)
    else:
        return Request(
            "update", _dump(draw(not_object)), Expected(400, sd.MSG_INVALID_JSON), "not an object"
        )
    return Request("update", _dump(doc), expected, f"wrong type: {case}")


@st.composite
def deep(draw: st.DrawFn) -> Request:
    levels = draw(st.integers(1, 60) | st.sampled_from([500, 5_000, 20_000]))
    token = draw(tokens)
    if levels >= 500:
        # Deeper than Python's recursion limit when parsed naively.
        raw = b'{"state":{"desired":' + b'{"a":' * levels + b"1" + b"}" * levels + b"}}"
        return Request("update", raw, Expected(400, sd.MSG_TOO_DEEP), f"depth {levels}")
    doc = {"state": {"desired": _nested(levels)}, "clientToken": token}
    expected = ACCEPTED if levels <= sd.MAX_DEPTH else Expected(400, sd.MSG_TOO_DEEP, token)
    return Request("update", _dump(doc), expected, f"depth {levels}")


@st.composite
def huge(draw: st.DrawFn) -> Request:
    token = draw(tokens)
    kind = draw(st.sampled_from(["payload", "section"]))
    if kind == "payload":
        size = draw(st.integers(MAX_PAYLOAD_BYTES + 1, OVERSIZE))
        operation = draw(st.sampled_from(["update", "get"]))
        doc = {"state": {"reported": {"blob": "x" * size}}, "clientToken": token}
        return Request(
            operation, _dump(doc), Expected(413, sd.MSG_TOO_LARGE), f"{operation} over 128 KB"
        )
    size = draw(st.integers(sd.MAX_STATE_BYTES, sd.MAX_STATE_BYTES * 4))
    doc = {"state": {"desired": {"blob": "x" * size}}, "clientToken": token}
    return Request("update", _dump(doc), Expected(413, sd.MSG_TOO_LARGE, token), "state over 8 KB")


@st.composite
def not_utf8(draw: st.DrawFn) -> Request:
    operation = draw(st.sampled_from(["update", "get"]))
    text = json.dumps(
        {
            "state": {"reported": {"name": draw(st.text(min_size=1, max_size=10))}},
            "clientToken": "é",
        }
    )
    encoding = draw(st.sampled_from(["utf-16", "utf-32", "latin-1"]))
    raw = text.encode(encoding)
    if encoding == "latin-1":
        raw += b"\xff\xfe"  # never valid UTF-8
    return Request(
        operation, raw, Expected(415, sd.MSG_UNSUPPORTED_ENCODING), f"{operation} in {encoding}"
    )


@st.composite
def malformed_json(draw: st.DrawFn) -> Request:
    operation = draw(st.sampled_from(["update", "get"]))
    valid = json.dumps({"state": {"reported": {"a": [1, 2]}}})
    cut = draw(st.integers(1, len(valid) - 1))
    raw = draw(
        st.sampled_from(
            [
                valid[:cut].encode(),
                b'{"state": {"reported": {"a": NaN}}}',
                b'{"state": {"reported": {"a": Infinity}}}',
                b"{'state': {}}",
                b'{"state": {"reported": {"a": 1}},}',
                b'{"state": {"reported": {"a": 1e999}}}',
            ]
        )
    )
    return Request(
        operation, raw, Expected(400, sd.MSG_INVALID_JSON), f"{operation}: malformed JSON"
    )


@st.composite
def random_payloads(draw: st.DrawFn) -> Request:
    operation = draw(st.sampled_from(["get", "update", "delete"]))
    raw = draw(
        st.binary(max_size=200) | st.text(max_size=200).map(str.encode) | json_values.map(_dump)
    )
    return Request(operation, raw, None, f"{operation}: random")


@st.composite
def simple_requests(draw: st.DrawFn) -> Request:
    """``get`` and ``delete`` with a JSON object (the token echoed) or nothing."""
    operation = draw(st.sampled_from(["get", "delete"]))
    token = draw(st.none() | tokens)
    extra = draw(
        st.dictionaries(
            st.text(max_size=5).filter(lambda k: k != "clientToken"), json_scalars, max_size=3
        )
    )
    if token is None and not extra:
        return Request(operation, b"", ACCEPTED, f"{operation}: empty")
    body = {**extra, **({"clientToken": token} if token is not None else {})}
    return Request(
        operation, _dump(body), Expected(None, client_token=token), f"{operation}: object"
    )


requests_strategy = st.one_of(
    valid_updates(),
    wrong_types(),
    deep(),
    huge(),
    not_utf8(),
    malformed_json(),
    random_payloads(),
    simple_requests(),
)


def reference_answer(request: Request) -> Expected:
    """What the documented rules say about an unconstrained request."""
    try:
        if request.operation == "update":
            update = sd.parse_update(request.payload)
            return Expected(None, client_token=update.client_token)
        strict = request.operation == "get"
        simple = sd.parse_simple(request.payload, strict=strict)
        return Expected(None, client_token=simple.client_token)
    except sd.ShadowError as exc:
        return Expected(exc.code, exc.message, exc.client_token)


# --------------------------------------------------------------------------- the device


class Device:
    """A provisioned, connected device subscribed to its shadows' answers."""

    def __init__(self, sandbox: SandboxProcess) -> None:
        files = provision_device(sandbox)
        self.thing = files.client_id
        self.probe = mqtt_probe.device_probe(sandbox, files)
        for shadow in SHADOWS:
            base = shadow_prefix(self.thing, shadow)
            codes = self.probe.subscribe(*(f"{base}/{s}" for s in SHADOW_RESPONSE_SUFFIXES))
            assert all(code <= 2 for code in codes), codes
        self.pacer = Pacer()  # within the thing's shadow requests a second

    def close(self) -> None:
        self.probe.close()

    def send(
        self, operation: str, payload: bytes, shadow: str | None, timeout: float = 10
    ) -> tuple[str, dict[str, Any]]:
        """Publish a request; its answer on ``accepted``/``rejected``.

        The service handles one shadow's requests in order, so an answer on another
        ``accepted``/``rejected`` topic before this one is a second answer to an earlier
        request: that fails, as does a leftover answer found before publishing.
        """
        self._drain()
        base = shadow_prefix(self.thing, shadow)
        self.pacer.wait()
        assert self.probe.publish(f"{base}/{operation}", payload) < 0x80
        wanted = {
            f"{base}/{operation}/accepted": "accepted",
            f"{base}/{operation}/rejected": "rejected",
        }
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.probe.messages.get(timeout=left)
            except queue.Empty:
                break
            if msg.topic in wanted:
                return wanted[msg.topic], json.loads(msg.payload)
            assert not _is_answer(msg.topic), f"unexpected {msg.topic}: {msg.payload[:200]!r}"
        raise AssertionError(f"no answer to {operation} on {base} within {timeout} s")

    def _drain(self) -> None:
        for msg in self.probe.drain():
            assert not _is_answer(msg.topic), f"extra {msg.topic}: {msg.payload[:200]!r}"

    def healthy(self, shadow: str | None) -> None:
        """The shadow is reset, then a normal update and get are answered."""
        outcome, body = self.send("update", b'{"state": null}', shadow)
        assert outcome == "accepted", body
        token = uuid.uuid4().hex[:16]
        update = _dump({"state": {"reported": {"alive": token}}, "clientToken": token})
        outcome, body = self.send("update", update, shadow)
        assert (outcome, body.get("clientToken")) == ("accepted", token), body
        outcome, body = self.send("get", _dump({"clientToken": token}), shadow)
        assert outcome == "accepted", body
        assert body["state"]["reported"]["alive"] == token
        assert body["clientToken"] == token


def _is_answer(topic: str) -> bool:
    return topic.endswith(("/accepted", "/rejected"))


@pytest.fixture(scope="module")
def device(sandbox: SandboxProcess) -> Iterator[Device]:
    dev = Device(sandbox)
    for shadow in SHADOWS:
        dev.healthy(shadow)
    yield dev
    dev.close()


def _check_answer(request: Request, outcome: str, body: dict[str, Any]) -> None:
    expected = request.expected if request.expected is not None else reference_answer(request)
    label = f"{request.kind}: {request.payload[:120]!r}"
    if expected.code is None:
        assert outcome == "accepted", f"{label} was rejected: {body}"
        if request.operation == "update":
            assert isinstance(body.get("version"), int), body
    else:
        assert outcome == "rejected", f"{label} was accepted: {body}"
        assert body.get("code") == expected.code, f"{label}: {body}"
        assert body.get("message") == expected.message, f"{label}: {body}"
        assert isinstance(body.get("timestamp"), int), body
        assert set(body) <= {"code", "message", "timestamp", "clientToken"}, body
    if expected.client_token is not None:
        assert body.get("clientToken") == expected.client_token, f"{label}: {body}"
    else:
        assert "clientToken" not in body, f"{label}: {body}"


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
@given(request=requests_strategy, shadow=st.sampled_from(SHADOWS))
def test_hostile_shadow_requests(device: Device, request: Request, shadow: str | None) -> None:
    outcome, body = device.send(request.operation, request.payload, shadow)
    _check_answer(request, outcome, body)
    device.healthy(shadow)


def test_every_class_is_answered_as_documented(device: Device) -> None:
    """One fixed request of each class, so that each runs even if Hypothesis's choices
    drift; answers must arrive in order when sent back to back."""
    token = "t"
    fixed = [
        Request(
            "update", b"\xff\xfe\x00garbage", Expected(415, sd.MSG_UNSUPPORTED_ENCODING), "binary"
        ),
        Request("update", b"[1, 2]", Expected(400, sd.MSG_INVALID_JSON), "array"),
        Request("update", b"", Expected(400, sd.MSG_INVALID_JSON), "empty update"),
        Request("get", b"not json", Expected(400, sd.MSG_INVALID_JSON), "get garbage"),
        Request("delete", b"not json", ACCEPTED, "delete ignores its payload"),
        Request(
            "update",
            _dump({"state": {"reported": _nested(sd.MAX_DEPTH + 1)}, "clientToken": token}),
            Expected(400, sd.MSG_TOO_DEEP, token),
            "7 levels",
        ),
        Request(
            "update",
            b"x" * (MAX_PAYLOAD_BYTES + 1),
            Expected(413, sd.MSG_TOO_LARGE),
            "over 128 KB",
        ),
        Request(
            "update",
            _dump({"state": {"reported": {"a": 1}}, "version": 10**9, "clientToken": token}),
            Expected(409, sd.MSG_VERSION_CONFLICT, token),
            "version conflict",
        ),
    ]
    for shadow in SHADOWS:
        for request in fixed:
            outcome, body = device.send(request.operation, request.payload, shadow)
            _check_answer(request, outcome, body)
            device.healthy(shadow)
