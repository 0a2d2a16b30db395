"""Telemetry message schemas: loading the platform's published JSON schemas (package data
under ``iotref/protocol/schemas``) and validating whole messages against them, fast.

The schemas are compiled once with ``jsonschema_rs``. A message is checked against the
header schema of its ``headerversion`` *and* the payload schema picked by
``(eventtype, eventsubtype, payloadversion)``; both are applied to the whole message,
because the published payload schemas describe the whole message (their top level has
``payload``). Problems come back as :class:`ValidationIssue` objects (JSON path + reason).

Decisions worth knowing:

* ``format`` is enforced (``date-time`` on both timestamps, RFC 3339) whatever the library
  default for the draft is. The schemas use no other format (there is no ``uuid`` format on
  ``sendereventuuid``). The contract's stricter rules (timestamps with exactly milliseconds,
  a UUID as ``sendereventuuid``) are checked only with ``MessageValidator(strict=True)``:
  the platform's ingestion applies the published schemas, so the default mirrors it.
* The v1 payload schema puts ``additionalProperties`` inside ``properties``; that makes it
  a declaration of a property *named* ``additionalProperties`` and constrains nothing. The
  behaviour is kept faithful: v1 accepts any extra keys.
* A ``required`` failure is reported at the path of the missing property
  (``$.assetid: required property is missing``), an unexpected key at its own path.
* The validator never raises on odd input. Python values JSON cannot carry (lone
  surrogates, non-string keys, other types) are named when a message fails; a message that
  passes the schemas is not walked for them (serialising it is where they surface).
"""

from __future__ import annotations

import json
import math
import re
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import jsonschema_rs
import orjson

if TYPE_CHECKING:
    if sys.version_info >= (3, 11):
        from importlib.resources.abc import Traversable
    else:
        from importlib.abc import Traversable

__all__ = [
    "InvalidMessage",
    "MessageValidator",
    "SchemaError",
    "ValidationIssue",
    "default_validator",
    "format_path",
    "header_schema",
    "known_header_versions",
    "known_payloads",
    "parse_json",
    "payload_schema",
    "validate_json",
    "validate_message",
]

HEADER_SCHEMA_NAME: Final = "header.schema.json"

# $schema URI (without the trailing '#', scheme-insensitive) -> validator class.
_DRAFTS: Final[dict[str, type[jsonschema_rs.Validator]]] = {
    "json-schema.org/draft-04/schema": jsonschema_rs.Draft4Validator,
    "json-schema.org/draft-06/schema": jsonschema_rs.Draft6Validator,
    "json-schema.org/draft-07/schema": jsonschema_rs.Draft7Validator,
    "json-schema.org/draft/2019-09/schema": jsonschema_rs.Draft201909Validator,
    "json-schema.org/draft/2020-12/schema": jsonschema_rs.Draft202012Validator,
}

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# ISO-8601 / RFC 3339 with exactly milliseconds and an explicit offset (strict mode).
_MILLIS_TIMESTAMP = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}(?:Z|[+-]\d{2}:\d{2})\Z", re.ASCII
)
_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\Z", re.ASCII)
_STRICT_TIMESTAMPS: Final = ("assettimestamp", "sendertimestamp")
_FORMAT_RULES: Final = {"date-time": " (RFC 3339, e.g. 2026-11-25T10:00:00.123Z)"}


class SchemaError(RuntimeError):
    """A packaged schema file is missing, unreadable or not a usable JSON schema."""


@dataclass(frozen=True, slots=True)
class ValidationIssue:
    """One problem in a message: where (a JSON path such as ``$.payload.status``) and why."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class InvalidMessage(ValueError):
    """A message failed validation. ``str()`` names the first issue; ``issues`` has all."""

    def __init__(self, issues: Iterable[ValidationIssue]) -> None:
        self.issues: tuple[ValidationIssue, ...] = tuple(issues)
        if not self.issues:
            raise ValueError("InvalidMessage needs at least one issue")
        first = str(self.issues[0])
        more = len(self.issues) - 1
        super().__init__(f"{first} (and {more} more)" if more else first)


# --------------------------------------------------------------------------- loading


def _schema_root() -> Traversable:
    # The package's folder on disk (the usual install) needs no importlib.resources, which
    # alone costs ``iotref validate`` a fifth of its start-up; a zipped package does.
    on_disk = Path(__file__).with_name("schemas")
    if on_disk.is_dir():
        return on_disk
    from importlib import resources

    return resources.files("iotref.protocol").joinpath("schemas")


def _read_json(node: Traversable, where: str) -> dict[str, Any]:
    try:
        document = json.loads(node.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SchemaError(f"cannot load schema {where}: {exc}") from exc
    if not isinstance(document, dict):
        raise SchemaError(f"schema {where} is not a JSON object")
    return document


def _int_dir(node: Traversable) -> int | None:
    return int(node.name) if node.is_dir() and node.name.isdigit() else None


def _load_catalog() -> tuple[dict[int, dict[str, Any]], dict[tuple[str, str, int], dict[str, Any]]]:
    """Walk ``header/{v}/header.schema.json`` and
    ``payload/{eventtype}/{eventsubtype}/{v}/{eventsubtype}.schema.json``."""
    root = _schema_root()
    headers: dict[int, dict[str, Any]] = {}
    payloads: dict[tuple[str, str, int], dict[str, Any]] = {}
    header_dir = root.joinpath("header")
    if not header_dir.is_dir():
        raise SchemaError("no header schemas packaged (iotref/protocol/schemas/header)")
    for version_dir in header_dir.iterdir():
        version = _int_dir(version_dir)
        if version is None:
            continue
        node = version_dir.joinpath(HEADER_SCHEMA_NAME)
        if node.is_file():
            headers[version] = _read_json(node, f"header/{version}/{HEADER_SCHEMA_NAME}")
    payload_dir = root.joinpath("payload")
    if payload_dir.is_dir():
        for type_dir in payload_dir.iterdir():
            if not type_dir.is_dir():
                continue
            for subtype_dir in type_dir.iterdir():
                if not subtype_dir.is_dir():
                    continue
                for version_dir in subtype_dir.iterdir():
                    version = _int_dir(version_dir)
                    if version is None:
                        continue
                    name = f"{subtype_dir.name}.schema.json"
                    node = version_dir.joinpath(name)
                    if node.is_file():
                        where = f"payload/{type_dir.name}/{subtype_dir.name}/{version}/{name}"
                        payloads[(type_dir.name, subtype_dir.name, version)] = _read_json(
                            node, where
                        )
    if not headers:
        raise SchemaError("no header schemas packaged (iotref/protocol/schemas/header)")
    return headers, payloads


_catalog_lock = threading.Lock()
_catalog: tuple[dict[int, dict[str, Any]], dict[tuple[str, str, int], dict[str, Any]]] | None = None


def _schemas() -> tuple[dict[int, dict[str, Any]], dict[tuple[str, str, int], dict[str, Any]]]:
    global _catalog
    with _catalog_lock:
        if _catalog is None:
            _catalog = _load_catalog()
        return _catalog


def known_header_versions() -> list[int]:
    """The header versions with a packaged schema, ascending."""
    return sorted(_schemas()[0])


def known_payloads() -> list[tuple[str, str, int]]:
    """The ``(eventtype, eventsubtype, payloadversion)`` triples with a packaged schema."""
    return sorted(_schemas()[1])


def header_schema(version: int) -> dict[str, Any]:
    """A copy of the packaged header schema ``version``; KeyError if there is none."""
    return _deep_copy(_schemas()[0][version])


def payload_schema(eventtype: str, eventsubtype: str, version: int) -> dict[str, Any]:
    """A copy of the packaged payload schema; KeyError if there is none."""
    return _deep_copy(_schemas()[1][(eventtype, eventsubtype, version)])


def _deep_copy(document: dict[str, Any]) -> dict[str, Any]:
    copied: dict[str, Any] = json.loads(json.dumps(document))
    return copied


def _compile(schema: Mapping[str, Any], where: str) -> jsonschema_rs.Validator:
    uri = schema.get("$schema")
    if not isinstance(uri, str):
        raise SchemaError(f"schema {where} has no $schema, cannot tell its draft")
    key = uri.split("://", 1)[-1].rstrip("#")
    cls = _DRAFTS.get(key)
    if cls is None:
        raise SchemaError(f"schema {where} uses an unsupported draft {uri!r}")
    try:
        jsonschema_rs.meta.validate(dict(schema))
        # Formats are enforced explicitly: the library's default depends on the draft.
        return cls(dict(schema), validate_formats=True)
    except (jsonschema_rs.ValidationError, ValueError) as exc:
        raise SchemaError(f"schema {where} is not a valid JSON schema: {exc}") from exc


# --------------------------------------------------------------------------- issues


def format_path(parts: Iterable[str | int]) -> str:
    """``['payload', 'jobphase', 0]`` -> ``$.payload.jobphase[0]`` (JSONPath, normalized)."""
    out = ["$"]
    for part in parts:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif _IDENTIFIER.match(part):
            out.append(f".{part}")
        else:
            escaped = part.replace("\\", "\\\\").replace("'", "\\'")
            out.append(f"['{escaped}']")
    return "".join(out)


def _describe(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _lookup(message: Any, parts: list[str | int]) -> Any:
    node = message
    try:
        for part in parts:
            node = node[part]
    except (KeyError, IndexError, TypeError):
        return None
    return node


def _is_non_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _issues_of(
    error: jsonschema_rs.ValidationError, message: Any
) -> Iterator[tuple[list[str | int], str]]:
    """Turn one library error into (path parts, reason) pairs, in our wording."""
    kind = error.kind
    parts = list(error.instance_path)
    if isinstance(kind, jsonschema_rs.ValidationErrorKind.Required):
        yield [*parts, kind.property], "required property is missing"
    elif isinstance(kind, jsonschema_rs.ValidationErrorKind.AdditionalProperties):
        for name in kind.unexpected:
            yield [*parts, name], "property not allowed here (the schema allows no other keys)"
    elif isinstance(kind, jsonschema_rs.ValidationErrorKind.Enum):
        options = ", ".join(_describe(option) for option in kind.options)
        yield parts, f"{_describe(error.instance)} is not one of {options}"
    elif error.instance is None and _is_non_finite(_lookup(message, parts)):
        # the library hands NaN/Infinity over as null
        yield parts, f"{_lookup(message, parts)!r} is not a JSON number"
    elif isinstance(kind, jsonschema_rs.ValidationErrorKind.Format):
        rule = _FORMAT_RULES.get(kind.format, "")
        yield parts, f"{_describe(error.instance)} is not a valid {kind.format}{rule}"
    else:
        yield parts, error.message


def _path_sort_key(item: tuple[list[str | int], str]) -> tuple[tuple[int, int, str], ...]:
    return tuple((0, part, "") if isinstance(part, int) else (1, 0, part) for part in item[0])


# --------------------------------------------------------------------------- validator


def _version_of(value: Any) -> int | None:
    """An integer version (JSON ``2`` or ``2.0``), never a bool."""
    if type(value) is int:
        return value
    if type(value) is float and value.is_integer():
        return int(value)
    return None


class _Reject(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _Reject(f"{name} is not valid JSON")


_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant)


# Every digit becomes "0", every other byte "x": a run of digits as long as _LONG_NUMBER
# is then a plain substring search.
_DIGITS_ONLY: Final = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x78 for byte in range(256))
_LONG_NUMBER: Final = b"0" * 19


def parse_json(data: bytes | bytearray | memoryview | str) -> tuple[Any, ValidationIssue | None]:
    """Parse JSON text strictly (UTF-8, no NaN/Infinity): ``(value, None)`` or
    ``(None, issue at "$")`` naming the parser's complaint.

    Bytes go to orjson first (about three times faster than the json module). Whatever
    orjson refuses is parsed again by the json module, which accepts a little more (lone
    surrogate escapes, numbers too large for a float) and words the complaint; so does
    text with a run of 19 or more digits, because orjson reads integers beyond 64 bits as
    floats where the json module keeps them exact. So a message reads the same either
    way (orjson only also takes nesting deeper than Python's recursion limit)."""
    if not isinstance(data, str):
        raw = data if type(data) is bytes else bytes(data)
        if _LONG_NUMBER not in raw.translate(_DIGITS_ONLY):
            try:
                return orjson.loads(raw), None
            except orjson.JSONDecodeError:
                pass
        data = raw
    try:
        text = data if isinstance(data, str) else data.decode("utf-8")
        return _DECODER.decode(text), None
    except UnicodeDecodeError as exc:
        return None, ValidationIssue(
            "$", f"invalid JSON: not UTF-8 ({exc.reason} at byte {exc.start})"
        )
    except json.JSONDecodeError as exc:
        return None, ValidationIssue("$", f"invalid JSON: {exc}")
    except _Reject as exc:
        return None, ValidationIssue("$", f"invalid JSON: {exc}")
    except RecursionError:
        return None, ValidationIssue("$", "invalid JSON: nested too deeply")


class MessageValidator:
    """Validates whole telemetry messages against the packaged schemas.

    Every schema is compiled once, when the validator is created. Instances are immutable
    after construction and safe to share between threads.

    ``strict=True`` adds the contract's rules that the published schemas do not express:
    ``assettimestamp``/``sendertimestamp`` with exactly millisecond precision and an
    explicit offset, and ``sendereventuuid`` a UUID.
    """

    __slots__ = ("_headers", "_latest_header", "_payloads", "_payloads_by_type", "_strict")

    def __init__(self, *, strict: bool = False) -> None:
        headers, payloads = _schemas()
        self._strict = strict
        self._headers: dict[int, jsonschema_rs.Validator] = {
            version: _compile(schema, f"header/{version}") for version, schema in headers.items()
        }
        self._latest_header = self._headers[max(self._headers)]
        self._payloads: dict[tuple[str, str, int], jsonschema_rs.Validator] = {
            key: _compile(schema, "payload/{}/{}/{}".format(*key))
            for key, schema in payloads.items()
        }
        self._payloads_by_type: dict[str, dict[str, set[int]]] = {}
        for eventtype, eventsubtype, version in self._payloads:
            by_sub = self._payloads_by_type.setdefault(eventtype, {})
            by_sub.setdefault(eventsubtype, set()).add(version)

    @property
    def strict(self) -> bool:
        """Whether the contract's extra rules (milliseconds, UUID) are checked."""
        return self._strict

    # -- fast answers

    def _passes(self, message: Any) -> bool:
        """The hot path: True when a well-formed message passes every check."""
        if type(message) is not dict:
            return False
        hv = message.get("headerversion")
        pv = message.get("payloadversion")
        eventtype = message.get("eventtype")
        eventsubtype = message.get("eventsubtype")
        if not (
            type(hv) is int
            and type(pv) is int
            and type(eventtype) is str
            and type(eventsubtype) is str
        ):
            return False
        header = self._headers.get(hv)
        payload = self._payloads.get((eventtype, eventsubtype, pv))
        if header is None or payload is None:
            return False
        try:
            return (
                header.is_valid(message)
                and payload.is_valid(message)
                and (not self._strict or not self._strict_issues(message))
            )
        except (ValueError, TypeError):  # not JSON data (UnicodeEncodeError is a ValueError)
            return False

    def is_valid(self, message: Any) -> bool:
        """True if ``message`` has no issue."""
        return self._passes(message) or not self._all_issues(message)

    def validate(self, message: Any) -> list[ValidationIssue]:
        """All issues of ``message`` (a parsed JSON value); an empty list if it is valid.

        Refusals (unknown header version, event type, subtype or payload version) come
        first; then the schema issues, deduplicated, in path order.
        """
        if self._passes(message):
            return []
        return self._all_issues(message)

    def validate_or_raise(self, message: Any) -> None:
        """Raise :class:`InvalidMessage` (a ValueError) naming the first issue."""
        issues = self.validate(message)
        if issues:
            raise InvalidMessage(issues)

    def validate_json(self, data: bytes | bytearray | memoryview | str) -> list[ValidationIssue]:
        """Validate JSON text (as received over MQTT or read from a file). Malformed JSON
        is one issue at ``$`` carrying the parser's message."""
        value, problem = parse_json(data)
        if problem is not None:
            return [problem]
        return self.validate(value)

    # -- the slow, complete path

    def _all_issues(self, message: Any) -> list[ValidationIssue]:
        if not isinstance(message, dict):
            kind = "array" if isinstance(message, list) else _json_type(message)
            return [ValidationIssue("$", f"a message must be a JSON object, got {kind}")]
        refusals: list[tuple[list[str | int], str]] = []
        found: list[tuple[list[str | int], str]] = []

        hv_raw = message.get("headerversion")
        hv = _version_of(hv_raw)
        header = self._headers.get(hv) if hv is not None else None
        if header is None and hv is not None:
            known = ", ".join(str(v) for v in sorted(self._headers))
            refusals.append((["headerversion"], f"unknown header version {hv} (known: {known})"))
            return _finish(refusals, found)
        payload = self._pick_payload(message, refusals)
        try:
            # Missing or mistyped headerversion: the latest header schema says what is wrong.
            for error in (header or self._latest_header).iter_errors(message):
                found.extend(_issues_of(error, message))
            if payload is not None:
                for error in payload.iter_errors(message):
                    found.extend(_issues_of(error, message))
        except (ValueError, TypeError) as exc:
            # The library trips over values JSON cannot carry; those are reported below.
            # It also refuses nesting deeper than it recurses (255 levels). Whatever it
            # was, a message it could not check is never taken for a valid one.
            found.clear()
            found.extend(_non_json(message))
            if not found:
                if _depth_exceeds(message, _MAX_CHECKED_DEPTH):
                    why = f"nesting deeper than {_MAX_CHECKED_DEPTH} levels"
                else:
                    why = "the message could not be checked"
                found.append(([], f"{why} ({exc})"))
        else:
            found.extend(_non_json(message))
        if self._strict:
            found.extend(self._strict_issues(message))
        return _finish(refusals, found)

    def _pick_payload(
        self, message: dict[str, Any], refusals: list[tuple[list[str | int], str]]
    ) -> jsonschema_rs.Validator | None:
        eventtype = message.get("eventtype")
        eventsubtype = message.get("eventsubtype")
        version = _version_of(message.get("payloadversion"))
        if not isinstance(eventtype, str):
            return None  # missing or mistyped: the header schema reports it
        subtypes = self._payloads_by_type.get(eventtype)
        if subtypes is None:
            refusals.append((["eventtype"], f"unknown event type {eventtype}"))
            return None
        if not isinstance(eventsubtype, str):
            return None
        versions = subtypes.get(eventsubtype)
        if versions is None:
            refusals.append(
                (["eventsubtype"], f"unknown event subtype {eventsubtype} for {eventtype}")
            )
            return None
        if version is None:
            return None
        if version not in versions:
            known = ", ".join(str(v) for v in sorted(versions))
            refusals.append(
                (
                    ["payloadversion"],
                    f"unknown payload version {version} for {eventtype}/{eventsubtype}"
                    f" (known: {known})",
                )
            )
            return None
        return self._payloads[(eventtype, eventsubtype, version)]

    @staticmethod
    def _strict_issues(message: dict[str, Any]) -> list[tuple[list[str | int], str]]:
        found: list[tuple[list[str | int], str]] = []
        for key in _STRICT_TIMESTAMPS:
            value = message.get(key)
            if isinstance(value, str) and not _MILLIS_TIMESTAMP.match(value):
                found.append(([key], "timestamp must be ISO-8601 with milliseconds and an offset"))
        uuid = message.get("sendereventuuid")
        if isinstance(uuid, str) and not _UUID.match(uuid):
            found.append((["sendereventuuid"], "must be a UUID"))
        return found


_MAX_CHECKED_DEPTH: Final = 255
"""The deepest nesting the schema validator checks (jsonschema_rs's recursion limit)."""


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` nests objects/arrays more than ``limit`` levels (iteratively)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth >= limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _non_json(message: Any) -> Iterator[tuple[list[str | int], str]]:
    """Where a Python value holds something JSON text cannot: lone surrogates, non-string
    keys, values of other types. Iterative, so deep nesting is fine."""
    stack: list[tuple[list[str | int], Any]] = [([], message)]
    while stack:
        parts, value = stack.pop()
        if isinstance(value, str):
            if not _encodable(value):
                yield parts, "string is not valid Unicode (lone surrogate)"
        elif isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    yield parts, f"object key {key!r} is not a string"
                elif not _encodable(key):
                    yield parts, "object key is not valid Unicode (lone surrogate)"
                else:
                    stack.append(([*parts, key], item))
        elif isinstance(value, list | tuple):
            stack.extend(([*parts, index], item) for index, item in enumerate(value))
        elif value is not None and not isinstance(value, bool | int | float):
            yield parts, f"{type(value).__name__} is not a JSON value"


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


def _finish(
    refusals: list[tuple[list[str | int], str]], found: list[tuple[list[str | int], str]]
) -> list[ValidationIssue]:
    out = [ValidationIssue(format_path(parts), reason) for parts, reason in refusals]
    refused_paths = {issue.path for issue in out}
    seen: set[tuple[str, str]] = set()
    for parts, reason in sorted(found, key=_path_sort_key):
        path = format_path(parts)
        if path in refused_paths or (path, reason) in seen:
            continue
        seen.add((path, reason))
        out.append(ValidationIssue(path, reason))
    return out


# --------------------------------------------------------------------------- shortcuts

_default_lock = threading.Lock()
_default: MessageValidator | None = None


def default_validator() -> MessageValidator:
    """The process-wide (non-strict) validator, compiled on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = MessageValidator()
        return _default


def validate_message(message: Any) -> list[ValidationIssue]:
    """Issues of a parsed message with the default validator."""
    return default_validator().validate(message)


def validate_json(data: bytes | bytearray | memoryview | str) -> list[ValidationIssue]:
    """Issues of a JSON text with the default validator."""
    return default_validator().validate_json(data)
