"""What ``iotref run`` shows: the counters of the run, the live status line (rich on a
terminal, periodic plain lines otherwise), the summary and its ``--json`` record, and the
exit status they add up to: 0 when everything fed was accepted, 3 when some input was
refused (an invalid line or message, the outbox full), 1 on an error or when another
process runs with this machine's identity, 2 for a wrong command line."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Final, TextIO

from iotref.device.client import AsyncClient
from iotref.device.connection.rate_limit import pacing
from iotref.device.connection.state import ConnectionState
from iotref.device.options import ClientStats

# --------------------------------------------------------------------------- counters

EXIT_OK: Final = 0
"""Everything fed to the run was accepted into the outbox (or dropped by ``--policy drop``)."""
EXIT_FAILED: Final = 1
"""An error (one line on stderr), or the identity was taken over by another process."""
EXIT_USAGE: Final = 2
"""The command line is wrong (click's usage error)."""
EXIT_REFUSED: Final = 3
"""The run went to its end, but some input was refused: an invalid line or message, or
the outbox full."""


@dataclass
class RunCounters:
    """What the command itself counts (the client counts the rest)."""

    lines: int = 0
    invalid: int = 0
    too_large: int = 0
    refused_full: int = 0
    dropped: int = 0
    refused_taken_over: int = 0
    """Not accepted because another process took this identity over (the run stops)."""

    @property
    def refused(self) -> int:
        """Input that was not taken into the outbox, for whatever reason."""
        return self.invalid + self.too_large + self.refused_full + self.refused_taken_over


def _earlier(stats: ClientStats) -> str:
    return f" (+{stats.carried_over} from earlier runs)" if stats.carried_over else ""


StatusPart = tuple[str, str]
"""A piece of the status line and its colour on a terminal (``""``: none)."""

DRAIN_SHOWN_FROM_S: Final = 2.0
"""The status line shows the drain rate and the time left once the outbox holds at least
this many seconds of sending (a backlog, not the few messages a steady run has queued)."""


def duration_text(seconds: float) -> str:
    """``45 s``, ``3 min 20 s``, ``2 h 05 min``: a time left, to the second below an hour."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def draining_part(stats: ClientStats) -> StatusPart | None:
    """``draining 96/s, 3 min 20 s left`` while a backlog is being sent (connected,
    permitted, messages acknowledged at ``ack_rate``); ``None`` otherwise."""
    if not (stats.connected and stats.permission and stats.queued and stats.ack_rate > 0):
        return None
    left = stats.queued / stats.ack_rate
    if left < DRAIN_SHOWN_FROM_S:
        return None
    return (f"draining {stats.ack_rate:.0f}/s, {duration_text(left)} left", "")


def pacing_text(limit: float | None) -> str:
    """What the intro line says about the connection's pace."""
    if not limit:
        return "publishes not paced"
    rate, _ = pacing(limit)
    return f"publishes paced at {rate:g}/s (quota {limit:g}/s)"


def throttled_part(stats: ClientStats) -> StatusPart | None:
    """How often the platform throttled a publish (PUBACK "quota exceeded"), and the slower
    pace while it holds; ``None`` if it never did."""
    if not stats.throttled:
        return None
    text = f"throttled by platform {stats.throttled}"
    if stats.slowed and stats.pace is not None:
        text += f" (pacing {stats.pace:.0f}/s)"
    return (text, "yellow")


def status_parts(stats: ClientStats, counters: RunCounters) -> list[StatusPart]:
    """The status line, built once for :func:`status_text` (plain, periodic lines and
    systemd's STATUS=) and :func:`status_renderable` (the live line on a terminal): the
    connection, the permission, then the outbox's counts, which add up (accepted + earlier
    runs' = acked + queued + evicted + refused by the platform), then what was not
    accepted."""
    if stats.connected:
        state: StatusPart = ("connected", "green")
    elif stats.state is ConnectionState.STOPPED:
        state = (stats.connection_status, "")
    else:
        taken_over = stats.state is ConnectionState.TAKEN_OVER
        state = (stats.connection_status, "red" if taken_over else "yellow")
    queued = f"queued {stats.queued}"
    if stats.held:
        queued += f" (held {stats.held})"
    parts: list[StatusPart] = [
        state,
        ("permission yes", "green") if stats.permission else ("permission no", "red"),
        (f"accepted {stats.accepted}{_earlier(stats)}", ""),
        (f"acked {stats.acked}", ""),
        (queued, "yellow" if stats.held else ""),
    ]
    for part in (draining_part(stats), throttled_part(stats)):
        if part is not None:
            parts.append(part)
    if stats.dropped_overflow:
        parts.append((f"evicted {stats.dropped_overflow}", "red"))
    if stats.dropped_no_permission:
        parts.append((f"dropped (no permission) {stats.dropped_no_permission}", ""))
    parts.append((f"invalid {counters.invalid}", "red" if counters.invalid else ""))
    if counters.too_large:
        parts.append((f"too large {counters.too_large}", "red"))
    if stats.refused:
        parts.append((f"refused by platform {stats.refused}", "red"))
    if counters.refused_full:
        parts.append((f"refused (outbox full) {counters.refused_full}", "red"))
    return parts


def status_text(stats: ClientStats, counters: RunCounters, elapsed: float) -> str:
    """One plain status line: the time since the start, then :func:`status_parts`."""
    return " | ".join([f"{elapsed:6.1f}s", *(text for text, _ in status_parts(stats, counters))])


def status_renderable(stats: ClientStats, counters: RunCounters, elapsed: float) -> Any:
    """:func:`status_parts` for the terminal, in colour, cut to the terminal's width."""
    from rich.text import Text

    pieces: list[Any] = []
    for n, (text, style) in enumerate(status_parts(stats, counters)):
        pieces.append(("● " if n == 0 else "  ", style if n == 0 else ""))
        pieces.append((text, style))
    if elapsed >= 0:
        pieces.append((f"  {elapsed:.0f}s", "dim"))
    return Text.assemble(*pieces, no_wrap=True, overflow="ellipsis")


def summary_text(stats: ClientStats, counters: RunCounters, elapsed: float) -> str:
    """The last line: what was accepted into the outbox, delivered (acked), left in it,
    and what was refused."""
    kept = (
        f"{stats.queued} left in the outbox: the next run sends them"
        if stats.queued
        else "outbox empty"
    )
    notes = [f"invalid {counters.invalid}"]
    if counters.too_large:
        notes.append(f"too large {counters.too_large}")
    if counters.refused_full:
        notes.append(f"refused (outbox full) {counters.refused_full}")
    if counters.refused_taken_over:
        notes.append(f"refused (taken over) {counters.refused_taken_over}")
    if stats.dropped_no_permission:
        notes.append(f"dropped (no permission) {stats.dropped_no_permission}")
    if stats.dropped_overflow:
        notes.append(f"evicted (outbox full) {stats.dropped_overflow}")
    if stats.refused:
        notes.append(
            f"refused by the platform {stats.refused} (kept in the outbox's refused table)"
        )
    return (
        f"Stopped after {elapsed:.1f} s: accepted {stats.accepted}{_earlier(stats)}, "
        f"acked {stats.acked}, {kept}; {', '.join(notes)}."
    )


def exit_code_of(stats: ClientStats, counters: RunCounters) -> int:
    """:data:`EXIT_FAILED` when taken over, :data:`EXIT_REFUSED` when input was refused,
    else :data:`EXIT_OK`."""
    if stats.state is ConnectionState.TAKEN_OVER or counters.refused_taken_over:
        return EXIT_FAILED
    if counters.refused:
        return EXIT_REFUSED
    return EXIT_OK


def summary_record(
    stats: ClientStats,
    counters: RunCounters,
    elapsed: float,
    *,
    client: AsyncClient,
    from_stdin: bool,
    exit_code: int,
) -> dict[str, Any]:
    """The run's summary as one JSON object (``--json``; fields in docs/operations.md)."""
    outcome = {EXIT_OK: "ok", EXIT_FAILED: "taken_over", EXIT_REFUSED: "input_refused"}
    return {
        "exit_code": exit_code,
        "outcome": outcome.get(exit_code, "failed"),
        "elapsed_s": round(elapsed, 3),
        "client_id": client.client_id,
        "endpoint": f"{client.settings.endpoint}:{client.settings.port}",
        "alpn": client.settings.alpn,
        "state": stats.state.value,
        "permission": stats.permission,
        "policy": stats.policy,
        "messages": {
            "carried_over": stats.carried_over,
            "accepted": stats.accepted,
            "acked": stats.acked,
            "left_in_outbox": stats.queued,
            "held": stats.held,
            "evicted": stats.dropped_overflow,
            "refused_by_platform": stats.refused,
            "dropped_no_permission": stats.dropped_no_permission,
        },
        "refused": {
            "total": counters.refused,
            "invalid": counters.invalid,
            "too_large": counters.too_large,
            "outbox_full": counters.refused_full,
            "taken_over": counters.refused_taken_over,
        },
        "stdin_lines": counters.lines if from_stdin else None,
        "connects": stats.connects,
        "disconnects": stats.disconnects,
        "throttled": stats.throttled,
        "publish_rate_limit": client.options.publish_rate_limit,
        "last_error": stats.last_error,
    }


# --------------------------------------------------------------------------- display


class Display:
    """The live status line on a terminal, periodic plain lines otherwise; nothing with
    ``iotref --quiet`` (``shown`` false)."""

    def __init__(self, live: bool, every_s: float, out: TextIO, shown: bool = True) -> None:
        self.live_mode = live and shown
        self.shown = shown
        self.every_s = every_s
        self.out = out
        self._live: Any = None
        self._last = 0.0

    def __enter__(self) -> Display:
        if self.live_mode:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(
                "",
                console=Console(file=self.out),
                refresh_per_second=4,
                transient=False,
                redirect_stdout=self.out is sys.stdout,
                redirect_stderr=sys.stderr.isatty(),
            )
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None

    def update(
        self, stats: ClientStats, counters: RunCounters, elapsed: float, *, force: bool = False
    ) -> None:
        if self._live is not None:
            self._live.update(status_renderable(stats, counters, elapsed))
            return
        if not self.shown:
            return
        text = status_text(stats, counters, elapsed)
        now = time.monotonic()
        if force or now - self._last >= self.every_s:
            self._last = now
            self.out.write(text + "\n")
            self.out.flush()

    def note(self, text: str) -> None:
        """An occasional event line (press events): shown above the live line only."""
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False)


def error_line(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
