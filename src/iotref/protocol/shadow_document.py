"""AWS IoT Device Shadow document rules, shared by the sandbox's shadow service and the device.

Pure functions, no I/O: validate a request payload, apply an update to a stored document
(merge the named fields, ``null`` removes, ``"desired": null`` clears a section, optional
``version`` check), keep a timestamp per leaf in ``metadata``, compute ``delta`` (objects
compared recursively, arrays as whole values) and the patch that turns one section into
another, and build the messages the service answers with (``/accepted``, ``/rejected``,
``update/delta``, ``update/documents``).

Shapes follow the AWS IoT developer guide ("Device Shadow service documents", "Device Shadow
MQTT topics", "Device Shadow error messages") and the messages the real service sends.
Timestamps are integer epoch seconds. Classic and named shadows follow the same rules.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from iotref.protocol import limits as platform_limits

JsonObject = dict[str, Any]

SECTIONS = ("desired", "reported")
MAX_STATE_BYTES = platform_limits.SHADOW_STATE_MAX_BYTES
"""``desired`` and ``reported`` together (metadata excluded), as compact UTF-8 JSON."""
MAX_PAYLOAD_BYTES = platform_limits.MAX_PAYLOAD_BYTES
"""A request larger than an MQTT message may be is refused before it is parsed."""
MAX_DEPTH = platform_limits.SHADOW_MAX_DEPTH
"""Levels of nesting inside ``desired`` or ``reported``."""
MAX_CLIENT_TOKEN_BYTES = platform_limits.SHADOW_CLIENT_TOKEN_MAX_BYTES
MAX_THING_NAME_BYTES = platform_limits.THING_NAME_MAX_BYTES
MAX_SHADOW_NAME_BYTES = platform_limits.SHADOW_NAME_MAX_BYTES
THING_NAME_PATTERN = re.compile(rf"^[a-zA-Z0-9:_-]{{1,{MAX_THING_NAME_BYTES}}}$")
"""Thing names, as in AWS IoT's API reference (ASCII, so bytes and characters agree)."""
SHADOW_NAME_PATTERN = re.compile(rf"^[$a-zA-Z0-9:_-]{{1,{MAX_SHADOW_NAME_BYTES}}}$")
DELETED_VERSION_MEMORY_SECONDS = 48 * 3600
"""A shadow re-created within this time after a delete continues the old version numbers."""

# The documented error messages ("Device Shadow error messages").
MSG_INVALID_JSON = "Invalid JSON"
MSG_MISSING_STATE = "Missing required node: state"
MSG_STATE_NOT_OBJECT = "State node must be an object"
MSG_DESIRED_NOT_OBJECT = "Desired node must be an object"
MSG_REPORTED_NOT_OBJECT = "Reported node must be an object"
MSG_INVALID_VERSION = "Invalid version"
MSG_INVALID_CLIENT_TOKEN = "Invalid clientToken"
MSG_TOO_DEEP_FORMAT = "JSON contains too many levels of nesting; maximum is {}"
MSG_TOO_DEEP = MSG_TOO_DEEP_FORMAT.format(MAX_DEPTH)
MSG_INVALID_NODE = "State contains an invalid node"
MSG_UNAUTHORIZED = "Unauthorized"
MSG_FORBIDDEN = "Forbidden"
MSG_THING_NOT_FOUND = "Thing not found"
MSG_VERSION_CONFLICT = "Version conflict"
MSG_TOO_LARGE = "The payload exceeds the maximum size allowed"
MSG_UNSUPPORTED_ENCODING = "Unsupported documented encoding; supported encoding is UTF-8"
MSG_TOO_MANY_REQUESTS = "Too Many Requests"
MSG_INTERNAL = "Internal service failure"

_SECTION_NOT_OBJECT = {"desired": MSG_DESIRED_NOT_OBJECT, "reported": MSG_REPORTED_NOT_OBJECT}


class ShadowError(Exception):
    """A rejected request: an HTTP-style ``code`` and the documented ``message``."""

    def __init__(self, code: int, message: str, client_token: str | None = None) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message
        self.client_token = client_token

    def payload(self, timestamp: int) -> JsonObject:
        """The error response document published on ``/rejected``."""
        return error_document(self.code, self.message, timestamp, self.client_token)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ShadowError) and (self.code, self.message, self.client_token) == (
            other.code,
            other.message,
            other.client_token,
        )

    def __hash__(self) -> int:
        return hash((self.code, self.message, self.client_token))


def error_document(
    code: int, message: str, timestamp: int, client_token: str | None = None
) -> JsonObject:
    """``{"code", "message", "timestamp"[, "clientToken"]}``."""
    doc: JsonObject = {"code": code, "message": message, "timestamp": timestamp}
    if client_token is not None:
        doc["clientToken"] = client_token
    return doc


def not_found_error(
    thing_name: str, shadow_name: str | None, client_token: str | None = None
) -> ShadowError:
    """404 for a shadow that does not exist (the classic shadow is named after its thing)."""
    name = thing_name if shadow_name is None else shadow_name
    return ShadowError(404, f"No shadow exists with name: '{name}'", client_token)


@dataclass(frozen=True)
class ShadowLimits:
    """The document limits a shadow service applies (AWS's values by default; the
    sandbox's ``sandbox up`` options may change them)."""

    state_max_bytes: int = MAX_STATE_BYTES
    max_depth: int = MAX_DEPTH

    @property
    def too_deep(self) -> str:
        return MSG_TOO_DEEP_FORMAT.format(self.max_depth)


DEFAULT_LIMITS = ShadowLimits()


def name_error(thing_name: str, shadow_name: str | None) -> ShadowError | None:
    """400 for a thing or shadow name AWS would refuse (pattern and length), else None;
    the message is the validation error AWS's API answers with."""
    for value, field_name, pattern in (
        (thing_name, "thingName", THING_NAME_PATTERN),
        (shadow_name, "shadowName", SHADOW_NAME_PATTERN),
    ):
        if value is not None and not pattern.fullmatch(value):
            return ShadowError(
                400,
                f"1 validation error detected: Value '{value}' at '{field_name}' failed to "
                "satisfy constraint: Member must satisfy regular expression pattern: "
                f"{pattern.pattern}",
            )
    return None


def state_size(state: JsonObject) -> int:
    """Bytes of ``desired`` and ``reported`` together (compact UTF-8 JSON), what the
    state size limit counts."""
    return len(compact({k: state[k] for k in SECTIONS if state.get(k) is not None}))


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class UpdateRequest:
    """A validated update: the ``state`` as sent (``None`` for ``"state": null``)."""

    state: JsonObject | None
    client_token: str | None = None
    version: int | None = None


@dataclass(frozen=True)
class SimpleRequest:
    """A validated get or delete request (only ``clientToken`` matters)."""

    client_token: str | None = None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def decode_json(payload: bytes | str) -> Any:
    """Strict JSON: UTF-8 only (else 415), no NaN/Infinity, bounded size and depth."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ShadowError(413, MSG_TOO_LARGE)
    if isinstance(payload, bytes):
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise ShadowError(415, MSG_UNSUPPORTED_ENCODING) from None
    else:
        text = payload
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise ShadowError(400, MSG_TOO_DEEP) from None
    except ValueError:
        raise ShadowError(400, MSG_INVALID_JSON) from None


def _client_token(doc: JsonObject) -> str | None:
    if "clientToken" not in doc:
        return None
    token = doc["clientToken"]
    if not isinstance(token, str) or len(token.encode("utf-8")) > MAX_CLIENT_TOKEN_BYTES:
        raise ShadowError(400, MSG_INVALID_CLIENT_TOKEN)
    return token


def depth(value: Any) -> int:
    """Levels of containers: a scalar is 0, ``{"a": 1}`` is 1, ``{"a": [1]}`` is 2."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        level += 1
        deepest = max(deepest, level)
        stack.extend((child, level) for child in children)
    return deepest


def _has_null_in_array(value: Any, in_array: bool = False) -> bool:
    if value is None:
        return in_array
    if isinstance(value, dict):
        return any(_has_null_in_array(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_null_in_array(v, True) for v in value)
    return False


def compact(value: Any) -> bytes:
    """Compact UTF-8 JSON, the size that limits count."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def parse_update(payload: bytes | str, limits: ShadowLimits = DEFAULT_LIMITS) -> UpdateRequest:
    """Validate an ``update`` payload; raise :class:`ShadowError` with the documented error."""
    doc = decode_json(payload)
    if not isinstance(doc, dict):
        raise ShadowError(400, MSG_INVALID_JSON)
    token = _client_token(doc)
    version: int | None = None
    if "version" in doc:
        raw_version = doc["version"]
        if isinstance(raw_version, bool) or not isinstance(raw_version, int):
            raise ShadowError(400, MSG_INVALID_VERSION, token)
        version = raw_version
    if "state" not in doc:
        raise ShadowError(400, MSG_MISSING_STATE, token)
    state = doc["state"]
    if state is None:
        return UpdateRequest(None, token, version)
    if not isinstance(state, dict):
        raise ShadowError(400, MSG_STATE_NOT_OBJECT, token)
    for key, section in state.items():
        if key not in SECTIONS:
            raise ShadowError(400, MSG_INVALID_NODE, token)
        if section is not None and not isinstance(section, dict):
            raise ShadowError(400, _SECTION_NOT_OBJECT[key], token)
        if depth(section) > limits.max_depth:
            raise ShadowError(400, limits.too_deep, token)
        if _has_null_in_array(section):
            raise ShadowError(400, MSG_INVALID_NODE, token)
    if state_size(state) > limits.state_max_bytes:
        raise ShadowError(413, MSG_TOO_LARGE, token)
    return UpdateRequest(state, token, version)


def parse_simple(payload: bytes | str, *, strict: bool = True) -> SimpleRequest:
    """A ``get`` (``strict``) or ``delete`` payload: empty, or a JSON object whose only
    meaningful field is ``clientToken``. With ``strict=False`` a malformed payload is
    ignored, as the delete topic documents ("the content of the message is ignored")."""
    if not payload.strip():
        return SimpleRequest()
    try:
        doc = decode_json(payload)
        if not isinstance(doc, dict):
            raise ShadowError(400, MSG_INVALID_JSON)
        return SimpleRequest(_client_token(doc))
    except ShadowError:
        if strict:
            raise
        return SimpleRequest()


# --------------------------------------------------------------------------- documents


def json_equal(a: Any, b: Any) -> bool:
    """JSON equality: ``true`` is not ``1``; ``1`` equals ``1.0``; objects ignore order."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is not type(b):
        return False
    return bool(a == b)


def metadata_for(value: Any, timestamp: int) -> Any:
    """Metadata mirroring ``value``: ``{"timestamp": t}`` per leaf, objects recurse, arrays
    hold one entry per element."""
    if isinstance(value, dict):
        return {k: metadata_for(v, timestamp) for k, v in value.items()}
    if isinstance(value, list):
        return [metadata_for(v, timestamp) for v in value]
    return {"timestamp": timestamp}


def merge_section(
    target: JsonObject,
    patch: Mapping[str, Any],
    metadata: JsonObject | None = None,
    timestamp: int = 0,
) -> None:
    """Merge an update's ``patch`` into the section ``target`` in place: ``null`` removes a
    field, objects merge recursively, anything else replaces (arrays as whole values, copied);
    objects left empty disappear. With ``metadata``, keep it mirroring ``target`` with
    ``timestamp`` on every leaf written."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
            if metadata is not None:
                metadata.pop(key, None)
        elif isinstance(value, dict):
            child = target.get(key)
            child_meta: JsonObject | None = None
            if not isinstance(child, dict):
                child = {}
                if metadata is not None:
                    child_meta = {}
            elif metadata is not None:
                found = metadata.get(key)
                child_meta = found if isinstance(found, dict) else {}
            merge_section(child, value, child_meta, timestamp)
            if child:
                target[key] = child
                if metadata is not None:
                    metadata[key] = child_meta
            else:
                target.pop(key, None)
                if metadata is not None:
                    metadata.pop(key, None)
        else:
            target[key] = copy.deepcopy(value) if isinstance(value, list) else value
            if metadata is not None:
                metadata[key] = metadata_for(value, timestamp)


def section_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> JsonObject:
    """The smallest patch that :func:`merge_section` turns ``old`` into ``new`` with: the
    fields that differ by JSON equality (objects compared recursively), ``null`` for fields
    ``new`` lacks. Values are copies."""
    patch: JsonObject = {}
    for key, value in new.items():
        if key not in old:
            patch[key] = copy.deepcopy(value)
            continue
        before = old[key]
        if isinstance(value, dict) and isinstance(before, dict):
            sub = section_patch(before, value)
            if sub:
                patch[key] = sub
        elif not json_equal(value, before):
            patch[key] = copy.deepcopy(value)
    for key in old:
        if key not in new:
            patch[key] = None
    return patch


def compute_delta(desired: Any, reported: Any) -> JsonObject:
    """Desired fields that differ from reported: missing ones included, objects compared
    recursively (only differing parts kept), arrays and scalars compared as whole values."""
    if not isinstance(desired, dict):
        return {}
    if not isinstance(reported, dict):
        reported = {}
    delta: JsonObject = {}
    for key, want in desired.items():
        if key not in reported:
            delta[key] = want
            continue
        have = reported[key]
        if isinstance(want, dict) and isinstance(have, dict):
            sub = compute_delta(want, have)
            if sub:
                delta[key] = sub
        elif not json_equal(want, have):
            delta[key] = want
    return delta


def _select_metadata(delta: JsonObject, metadata: Any) -> JsonObject:
    """The part of ``metadata`` (of the desired section) that covers ``delta``."""
    meta = metadata if isinstance(metadata, dict) else {}
    out: JsonObject = {}
    for key, value in delta.items():
        node = meta.get(key)
        if isinstance(value, dict) and isinstance(node, dict) and "timestamp" not in node:
            out[key] = _select_metadata(value, node)
        elif node is not None:
            out[key] = node
    return out


@dataclass
class ShadowDocument:
    """A stored shadow: ``state`` (``desired``/``reported``, empty sections absent),
    ``metadata`` mirroring it, and ``version``."""

    state: JsonObject = field(default_factory=dict)
    metadata: JsonObject = field(default_factory=dict)
    version: int = 0

    def copy(self) -> ShadowDocument:
        return ShadowDocument(
            json.loads(json.dumps(self.state)), json.loads(json.dumps(self.metadata)), self.version
        )

    def delta(self) -> JsonObject:
        return compute_delta(self.state.get("desired"), self.state.get("reported"))

    def snapshot(self) -> JsonObject:
        """``{"state", "metadata", "version"}`` as in ``update/documents``."""
        return {
            "state": {k: self.state[k] for k in SECTIONS if k in self.state},
            "metadata": {k: self.metadata[k] for k in SECTIONS if k in self.metadata},
            "version": self.version,
        }


@dataclass(frozen=True)
class UpdateOutcome:
    """What an accepted update produced: the new stored document and the messages."""

    document: ShadowDocument
    accepted: JsonObject
    documents: JsonObject
    delta: JsonObject | None


def _with_token(doc: JsonObject, client_token: str | None) -> JsonObject:
    if client_token is not None:
        doc["clientToken"] = client_token
    return doc


def apply_update(
    current: ShadowDocument | None,
    request: UpdateRequest,
    timestamp: int,
    *,
    base_version: int = 0,
    limits: ShadowLimits = DEFAULT_LIMITS,
) -> UpdateOutcome:
    """Apply a validated update to ``current`` (``None``: the shadow does not exist; a new
    one starts after ``base_version``, the version of a recently deleted shadow).

    Raises :class:`ShadowError` 409 on a version mismatch and 413 when the state would
    grow over the size limit.
    """
    token = request.client_token
    existing_version = current.version if current is not None else base_version
    if request.version is not None and request.version != existing_version:
        raise ShadowError(409, MSG_VERSION_CONFLICT, token)
    new = current.copy() if current is not None else ShadowDocument()
    new.version = existing_version + 1
    request_state = request.state
    if request_state is None:
        new.state = {}
        new.metadata = {}
    else:
        for section in SECTIONS:
            if section not in request_state:
                continue
            patch = request_state[section]
            if patch is None:
                new.state.pop(section, None)
                new.metadata.pop(section, None)
                continue
            target = new.state.get(section, {})
            target_meta = new.metadata.get(section, {})
            merge_section(target, patch, target_meta, timestamp)
            if target:
                new.state[section] = target
                new.metadata[section] = target_meta
            else:
                new.state.pop(section, None)
                new.metadata.pop(section, None)
    if state_size(new.state) > limits.state_max_bytes:
        raise ShadowError(413, MSG_TOO_LARGE, token)
    accepted_state: Any = request_state
    accepted_meta: Any = (
        {"timestamp": timestamp}
        if request_state is None
        else {k: metadata_for(v, timestamp) for k, v in request_state.items()}
    )
    accepted = _with_token(
        {
            "state": accepted_state,
            "metadata": accepted_meta,
            "version": new.version,
            "timestamp": timestamp,
        },
        token,
    )
    documents = _with_token(
        {
            "previous": current.snapshot() if current is not None else None,
            "current": new.snapshot(),
            "timestamp": timestamp,
        },
        token,
    )
    delta_state = new.delta()
    delta: JsonObject | None = None
    if delta_state:
        delta = _with_token(
            {
                "version": new.version,
                "timestamp": timestamp,
                "state": delta_state,
                "metadata": _select_metadata(delta_state, new.metadata.get("desired")),
            },
            token,
        )
    return UpdateOutcome(new, accepted, documents, delta)


def get_response(
    document: ShadowDocument, timestamp: int, client_token: str | None = None
) -> JsonObject:
    """The ``get/accepted`` document: state (with ``delta`` when not empty), metadata,
    version, timestamp and the request's clientToken."""
    state: JsonObject = {k: document.state[k] for k in SECTIONS if k in document.state}
    delta = document.delta()
    if delta:
        state["delta"] = delta
    return _with_token(
        {
            "state": state,
            "metadata": {k: document.metadata[k] for k in SECTIONS if k in document.metadata},
            "version": document.version,
            "timestamp": timestamp,
        },
        client_token,
    )


def delete_response(
    document: ShadowDocument, timestamp: int, client_token: str | None = None
) -> JsonObject:
    """The ``delete/accepted`` document: ``{"version", "timestamp"[, "clientToken"]}``."""
    return _with_token({"version": document.version, "timestamp": timestamp}, client_token)


def to_json(doc: Any) -> bytes:
    """Serialize a message the way the service sends it (compact UTF-8)."""
    return compact(doc)
