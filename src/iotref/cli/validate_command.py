"""``iotref validate FILE...``: check telemetry messages in files (or stdin, ``-``)
against the platform's schemas.

A file holds one JSON document (an object, or an array of objects) or JSON lines (one
message per line). One line per invalid message (``file:line: path: reason``), then a
summary. Exit status: 0 all valid, 1 some invalid, 2 some file unreadable.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import click

from iotref.cli.output import is_quiet
from iotref.protocol.message_schemas import (
    MessageValidator,
    ValidationIssue,
    default_validator,
    parse_json,
)

_WS = " \t\n\r"


@dataclass
class _Entry:
    """One message found in a file: where it starts, and its value or parse problem."""

    line: int
    index: int
    value: Any = None
    problem: ValidationIssue | None = None


@dataclass
class _Report:
    valid: int = 0
    invalid: list[dict[str, Any]] = field(default_factory=list)
    unreadable: list[dict[str, str]] = field(default_factory=list)


def _issue_json(issue: ValidationIssue) -> dict[str, str]:
    return {"path": issue.path, "message": issue.message}


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


def _decode_error(exc: json.JSONDecodeError) -> ValidationIssue:
    return ValidationIssue("$", f"invalid JSON: {exc}")


def _array_entries(text: str, start: int) -> Iterator[_Entry]:
    """The elements of a top-level array, each with the line it starts on."""
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, start + 1)
    index = 0
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            yield _Entry(exc.lineno, index, problem=_decode_error(exc))
            return
        yield _Entry(_line_of(text, pos), index, value=value)
        index += 1
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
            continue
        return  # ']' (the whole document parsed before, so nothing else can follow)


def _entries(text: str) -> Iterator[_Entry]:
    """Split a file's text into messages: a document (object or array) or JSON lines."""
    start = _skip_ws(text, 0)
    if start == len(text):
        return
    value, problem = parse_json(text)
    if problem is None:
        if isinstance(value, list):
            yield from _array_entries(text, start)
        else:
            yield _Entry(_line_of(text, start), 0, value=value)
        return
    lines = text.splitlines()
    if not _looks_like_json_lines(lines):
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            yield _Entry(exc.lineno, 0, problem=_decode_error(exc))
            return
        except (ValueError, RecursionError):
            pass
        yield _Entry(_line_of(text, start), 0, problem=problem)
        return
    index = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        value, problem = parse_json(line)
        if problem is None and isinstance(value, list):
            for item in value:
                yield _Entry(number, index, value=item)
                index += 1
            continue
        yield _Entry(number, index, value=value, problem=problem)
        index += 1


def _looks_like_json_lines(lines: list[str]) -> bool:
    """Several non-blank lines of which at least one is a whole JSON object or array."""
    filled = [line for line in lines if line.strip()]
    if len(filled) < 2:
        return False
    for line in filled:
        value, problem = parse_json(line)
        if problem is None and isinstance(value, dict | list):
            return True
    return False


def _read(name: str) -> bytes:
    if name == "-":
        return sys.stdin.buffer.read()
    with open(name, "rb") as handle:
        return handle.read()


def _check_file(
    name: str,
    display: str,
    validator: MessageValidator,
    report: _Report,
    every_issue: bool = False,
) -> Iterator[str]:
    """Validate one file, recording into ``report``; yield the text lines to print: one
    per invalid message with its first issue and how many more, or with ``every_issue``
    one per issue. Raises OSError if the file cannot be read."""
    data = _read(name)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        issue = ValidationIssue("$", f"invalid JSON: not UTF-8 ({exc.reason} at byte {exc.start})")
        report.invalid.append(
            {"file": display, "line": line, "index": 0, "issues": [_issue_json(issue)]}
        )
        yield f"{display}:{line}: {issue}"
        return
    for entry in _entries(text):
        issues = [entry.problem] if entry.problem is not None else validator.validate(entry.value)
        if not issues:
            report.valid += 1
            continue
        report.invalid.append(
            {
                "file": display,
                "line": entry.line,
                "index": entry.index,
                "issues": [_issue_json(issue) for issue in issues],
            }
        )
        if every_issue:
            for issue in issues:
                yield f"{display}:{entry.line}: {issue}"
            continue
        more = f" (+{len(issues) - 1} more; --all shows them)" if len(issues) > 1 else ""
        yield f"{display}:{entry.line}: {issues[0]}{more}"


@click.command("validate")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="Print no report (errors still go to stderr); the exit status tells.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON report instead of text lines."
)
@click.option(
    "--all",
    "every_issue",
    is_flag=True,
    help="One line per issue (default: each invalid message's first issue and a count).",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Also require millisecond timestamps and a UUID sendereventuuid (contract rules).",
)
@click.pass_context
def validate(
    ctx: click.Context,
    files: tuple[str, ...],
    quiet: bool,
    as_json: bool,
    every_issue: bool,
    strict: bool,
) -> None:
    """Check telemetry messages against the platform's schemas.

    Each FILE ('-' for stdin) holds a JSON object, an array of objects, or JSON lines.
    Prints one line per invalid message (file:line: path: reason; --all: one per issue)
    and a summary (alone with 'iotref --quiet validate').
    Exit status 0 if all are valid, 1 if any is invalid, 2 if a file cannot be read.
    """
    lines_too = not quiet and not as_json and not is_quiet()
    validator = MessageValidator(strict=True) if strict else default_validator()
    report = _Report()
    for name in files:
        display = "<stdin>" if name == "-" else name
        try:
            for line in _check_file(name, display, validator, report, every_issue):
                if lines_too:
                    click.echo(line)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            report.unreadable.append({"file": display, "error": reason})
            if not as_json:
                click.echo(f"iotref validate: cannot read {display}: {reason}", err=True)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "valid": report.valid,
                    "invalid": len(report.invalid),
                    "unreadable": len(report.unreadable),
                    "messages": report.invalid,
                    "errors": report.unreadable,
                },
                indent=2,
                ensure_ascii=False,
            )
        )
    elif not quiet:
        summary = f"{report.valid} valid, {len(report.invalid)} invalid"
        if report.unreadable:
            summary += f", {len(report.unreadable)} unreadable"
        click.echo(summary)
    code = 2 if report.unreadable else 1 if report.invalid else 0
    ctx.exit(code)
