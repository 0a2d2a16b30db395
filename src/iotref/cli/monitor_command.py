"""``iotref monitor``: the sandbox monitor's live stream in the terminal.

Reads ``sandbox.json`` in the data dir (the sandbox's HTTP address and admin token),
follows ``/monitor/api/stream`` (server-sent events) and prints one line per message:
time, device, ✓ valid or ✗ invalid, and a short summary; for an invalid message the
JSON path and reason of each issue follow, indented. Ctrl-C ends it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import httpx

from iotref.cli.output import is_quiet
from iotref.device.onboarding.next_steps import shell_word
from iotref.sandbox.context import DEFAULT_DATA_DIR
from iotref.sandbox.runner import read_running

MAX_ISSUES_SHOWN = 5


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """``(event, data)`` pairs from the lines of a server-sent event stream."""
    event = "message"
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r")
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)


def _clock(t: Any) -> str:
    if not isinstance(t, int | float):
        return "--:--:--.---"
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int((t % 1) * 1000):03d}"


def _num(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def summarize(event: dict[str, Any]) -> str:
    """A short description of a message (type, asset, status, speed, counters)."""
    parts: list[str] = []
    if event.get("eventtype"):
        version = event.get("payloadversion")
        parts.append(
            f"{event['eventtype']}/{event.get('eventsubtype') or '?'} "
            f"v{version if version is not None else '?'}"
        )
    if event.get("assetid"):
        parts.append(f"asset {event['assetid']}")
    if event.get("status"):
        parts.append(str(event["status"]))
    for key, label in (
        ("speed", "speed"),
        ("productioncounter", "count"),
        ("totalproductioncounter", "total"),
    ):
        if event.get(key) is not None:
            parts.append(f"{label} {_num(event[key])}")
    if not parts:
        parts.append(_kind_of(event))
    return " · ".join(parts)


def _kind_of(event: dict[str, Any]) -> str:
    """What a message without recognisable fields is: valid, unreadable (not JSON) or
    invalid (JSON, but not a telemetry message), with the first issue."""
    if event.get("valid"):
        return "message"
    issues = [i for i in event.get("errors") or [] if isinstance(i, dict)]
    first = issues[0] if issues else None
    reason = str(first.get("reason", "")) if first else ""
    if reason.startswith("invalid JSON"):
        return f"unreadable message ({reason})"
    if first is None:
        return "invalid message"
    return f"invalid message ({first.get('path')}: {reason})"


def format_event(event: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Lines to print for one message event, each with ``click.style`` arguments."""
    valid = bool(event.get("valid"))
    mark = "✓" if valid else "✗"
    prefix = "duplicate · " if event.get("duplicate") else ""
    head = (
        f"{_clock(event.get('t'))}  {event.get('client_id', '?')}  {mark}  "
        f"{prefix}{summarize(event)}"
    )
    style: dict[str, Any] = {} if valid else {"fg": "red"}
    if event.get("duplicate"):
        style = {"dim": True}
    lines = [(head, style)]
    issues = list(event.get("errors") or [])
    for issue in issues[:MAX_ISSUES_SHOWN]:
        lines.append((f"      {issue.get('path')}: {issue.get('reason')}", {"fg": "red"}))
    if len(issues) > MAX_ISSUES_SHOWN:
        lines.append((f"      … and {len(issues) - MAX_ISSUES_SHOWN} more", {"fg": "red"}))
    if event.get("topic_problem"):
        lines.append((f"      topic: {event['topic_problem']}", {"fg": "yellow"}))
    return lines


def _sandbox(data_dir: Path) -> tuple[str, str]:
    running = read_running(data_dir)
    info = running.info or {}
    url = info.get("http_url")
    token = info.get("admin_token")
    if running.pid is None or not isinstance(url, str) or not isinstance(token, str):
        start = "iotref sandbox up"
        if data_dir != DEFAULT_DATA_DIR:
            start += f" --data-dir {shell_word(str(data_dir))}"
        raise click.ClickException(f"no sandbox is running on {data_dir} (start one with: {start})")
    return url, token


@click.command()
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_DATA_DIR,
    show_default=True,
    help="The running sandbox's data directory.",
)
@click.option("--device", "device", metavar="CLIENT_ID", help="Only this device's messages.")
@click.option("--invalid-only", is_flag=True, help="Only invalid messages (and bad topics).")
@click.option("--json", "as_json", is_flag=True, help="Print each event as one JSON line.")
def monitor(data_dir: Path, device: str | None, invalid_only: bool, as_json: bool) -> None:
    """Follow the sandbox's telemetry live: one line per message, ✓ valid / ✗ invalid."""
    url, token = _sandbox(data_dir)
    params = {"stats": "0"}
    if device:
        params["device"] = device
    if invalid_only:
        params["invalid_only"] = "1"
    headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
    timeout = httpx.Timeout(10.0, read=60.0)
    try:
        with (
            httpx.Client(base_url=url, headers=headers, timeout=timeout) as client,
            client.stream("GET", "/monitor/api/stream", params=params) as response,
        ):
            if response.status_code != 200:
                response.read()
                raise click.ClickException(_refusal(response))
            what = f"device {device}" if device else "all devices"
            if not is_quiet():
                click.echo(
                    f"following {what}{' (invalid only)' if invalid_only else ''} "
                    f"at {url}; Ctrl-C to stop",
                    err=True,
                )
            for event, data in sse_events(response.iter_lines()):
                if event == "message":
                    _print(data, as_json)
                elif event == "dropped" and not as_json:
                    click.secho(
                        "… some messages were skipped here (too fast); all are stored",
                        fg="yellow",
                        err=True,
                    )
    except KeyboardInterrupt:
        click.echo("", err=True)
        return
    except httpx.HTTPError as exc:
        raise click.ClickException(f"lost the sandbox at {url}: {exc}") from None
    raise click.ClickException("the sandbox ended the stream (stopped?)")


def _print(data: str, as_json: bool) -> None:
    try:
        event = json.loads(data)
    except ValueError:
        return
    if not isinstance(event, dict):
        return
    if as_json:
        click.echo(json.dumps(event, ensure_ascii=False))
        return
    for text, style in format_event(event):
        click.secho(text, **style)


def _refusal(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = {}
    detail = body.get("error_description") or body.get("error") or response.reason_phrase
    if response.status_code == 401:
        return "the sandbox refused the admin token from sandbox.json (restarted with another?)"
    return f"the sandbox answered {response.status_code}: {detail}"
