"""``iotref run``: run this machine's sender until stopped.

Owns the command line around :class:`iotref.device.client.AsyncClient`: finding the
certificate store (``--store``, or the one of ``--env``/``--env-file``, with the same
helpers as ``iotref provision``), feeding it with simulated presses
(:mod:`iotref.fleet.press`) or with JSON lines read from stdin, the live status line
(rich on a terminal, periodic plain lines otherwise; on stderr with ``--json``), and a
clean stop on Ctrl-C, SIGTERM, ``--duration`` or the end of stdin: the outbox gets up to
``--close-timeout`` seconds to drain (reconnecting meanwhile if the platform is out of
reach; at the end of stdin the run first goes on sending for as long as the platform keeps
acknowledging, see :class:`EndOfInputDrain`), the rest stays in the outbox for the next
run, and a summary says what was accepted into the outbox, acknowledged by the platform
and left in the outbox (``--json``: also as one JSON object on stdout). One signal is
enough; a second one exits at once.

Exit status: 0 when everything fed was accepted, 3 when some input was refused (an
invalid line or message, the outbox full), 1 on an error or when another process runs with
this machine's identity (a copied store: the run stops with a line that says so), 2 for a
wrong command line.

The platform need not be reachable at the start: the run starts offline, queues what it
is fed and says "waiting for the platform" with the reason until it connects
(``--fail-fast`` exits with an error instead). ``--port`` and ``--alpn`` reach the broker
on another port, e.g. AWS IoT Core's 443 with ALPN ``x-amzn-mqtt-ca``.

As a systemd ``Type=notify`` service (``NOTIFY_SOCKET`` set) it says READY=1 once the
outbox is open and the client started (connected or not), renews STATUS= with the status
line, says STOPPING=1 when it stops, and with ``WatchdogSec=`` sends WATCHDOG=1 at half
the interval for as long as its event loop runs (:mod:`iotref.device.systemd_notify`).

stdin lines: a complete message (it has ``headerversion``) is sent as it is; any other
JSON object is taken as a Status payload (``--payload-version``) of the first asset.
A line that is not JSON, not an object, or not valid against the schemas gets one line on
stderr, is counted as invalid, and the run goes on; so does a message over the platform's
payload limit (counted as too large, its size named). Messages the platform refuses for
good after they were queued are counted on the status line ("refused") and kept in the
outbox's refused table. A damaged outbox found at start is reported in one line on stderr
(see :mod:`iotref.device.telemetry.outbox_integrity` and
:mod:`iotref.device.telemetry.outbox_salvage`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final, Literal, TextIO

import click

from iotref._version import __version__
from iotref.cli.onboarding_commands import (
    _env,
    _environment_options,
    _expected_errors,
    _store_option,
)
from iotref.cli.output import is_quiet
from iotref.device import stdlib_compat
from iotref.device.client import AsyncClient
from iotref.device.connection.errors import ConnectionTakenOver
from iotref.device.connection.rate_limit import pacing
from iotref.device.connection.state import ConnectionState
from iotref.device.errors import (
    InvalidMessageError,
    MessageTooLargeError,
    OutboxFullError,
    StoreError,
)
from iotref.device.onboarding.certificate_store import (
    CertificateStore,
    DeviceIdentity,
    default_store_path,
)
from iotref.device.onboarding.environment import ENV_FILE_VAR, ENV_VAR, Environment
from iotref.device.onboarding.next_steps import Selection, provision_new_machine
from iotref.device.onboarding.store_checks import environment_mismatch
from iotref.device.options import ClientStats
from iotref.device.systemd_notify import SystemdNotifier
from iotref.device.telemetry import outbox_opening
from iotref.device.telemetry.messages import Asset, Sender, SenderType
from iotref.device.telemetry.outbox_opening import RECOVERY_LOG_ATTRIBUTE
from iotref.device.telemetry.results import SendStatus
from iotref.fleet.press import PressEvent, PressKind, PressSimulator, profile_for

Kind = Literal["offset", "digital", "mixed"]
READ_CHUNK = 65536


# --------------------------------------------------------------------------- the store


def _explicit_environment(env_name: str | None, env_file: Path | None) -> bool:
    return bool(
        env_name
        or env_file
        or os.environ.get(ENV_VAR, "").strip()
        or os.environ.get(ENV_FILE_VAR, "").strip()
    )


def load_identity(
    env: Environment, store: Path | None, *, check_environment: bool
) -> DeviceIdentity:
    """The store's identity, or a :class:`StoreError` with what to do."""
    path = store or default_store_path(env.name)
    provision = provision_new_machine().within(Selection.of(env, store))
    certificate_store = CertificateStore(path, selection=Selection.of(env, store))
    if not path.is_dir() or certificate_store.is_empty():
        raise StoreError(f"there is no certificate store at {path}", provision, path=path)
    identity = certificate_store.load()
    if check_environment:
        progress = certificate_store.read_progress()
        mismatch = (
            None
            if progress is None
            else environment_mismatch(
                path, progress, env.identity, selection=Selection.of(env, store), command="run"
            )
        )
        if mismatch is not None:
            raise StoreError(mismatch.reason, mismatch.hint or mismatch.next_step, path=path)
    return identity


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


# --------------------------------------------------------------------------- inputs


async def simulate(
    client: AsyncClient,
    sims: list[tuple[Asset, PressSimulator]],
    interval: float,
    speedup: float,
    version: int,
    counters: RunCounters,
    display: Display,
    stop: asyncio.Event,
) -> None:
    """Every ``interval`` seconds, move every press on and send its status."""
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while not stop.is_set():
        for asset, sim in sims:
            events: list[PressEvent] = sim.step(interval * speedup)
            for event in events:
                if event.kind != "phase":
                    display.note(f"{asset.assetid}: {event.message}")
            await _send(client, counters, client.send(asset, sim.payload(version)))
        next_at += interval
        delay = next_at - loop.time()
        if delay < 0:
            next_at = loop.time()  # fell behind: do not try to catch up in a burst
            delay = 0
        with contextlib.suppress(TimeoutError):
            async with stdlib_compat.timeout(delay):
                await stop.wait()


async def _send(client: AsyncClient, counters: RunCounters, sending: Any, where: str = "") -> None:
    try:
        result = await sending
    except InvalidMessageError as exc:
        counters.invalid += 1
        error_line(f"iotref: {where}{exc.reason}")
        return
    except MessageTooLargeError as exc:
        counters.too_large += 1
        error_line(f"iotref: {where}{exc.reason}; not queued")
        return
    except OutboxFullError as exc:
        counters.refused_full += 1
        if counters.refused_full == 1 or counters.refused_full % 1000 == 0:
            error_line(f"iotref: {where}{exc.one_line()}")
        return
    except ConnectionTakenOver:
        counters.refused_taken_over += 1  # the run is stopping: see run_sender
        return
    if result.status is SendStatus.DROPPED_NO_PERMISSION:
        counters.dropped += 1


def _start_stdin_reader(
    loop: asyncio.AbstractEventLoop, lines: asyncio.Queue[bytes | None]
) -> None:
    """Read stdin in a daemon thread with ``os.read`` (no buffered reader whose lock could
    be held at exit) and hand complete lines to the loop; ``None`` at the end."""
    fd = sys.stdin.fileno()

    def put(item: bytes | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody listens
            loop.call_soon_threadsafe(lines.put_nowait, item)

    def read() -> None:
        pending = b""
        try:
            while True:
                chunk = os.read(fd, READ_CHUNK)
                if not chunk:
                    break
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    put(line)
        except OSError as exc:
            error_line(f"iotref: reading stdin failed: {exc}")
        if pending:
            put(pending)
        put(None)

    threading.Thread(target=read, name="iotref-stdin", daemon=True).start()


async def read_stdin(
    client: AsyncClient,
    asset: Asset,
    version: int,
    counters: RunCounters,
    stop: asyncio.Event,
) -> None:
    """Send what stdin says until it ends or ``stop`` is set (the run notices the end by
    this coroutine's return, see :class:`EndOfInputDrain`)."""
    lines: asyncio.Queue[bytes | None] = asyncio.Queue()
    _start_stdin_reader(asyncio.get_running_loop(), lines)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while True:
            getting = asyncio.ensure_future(lines.get())
            await asyncio.wait({getting, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not getting.done():
                getting.cancel()
                return
            raw = getting.result()
            if raw is None:
                return
            if not raw.strip():
                continue
            counters.lines += 1
            where = f"stdin line {counters.lines}: "
            try:
                value = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                counters.invalid += 1
                error_line(f"iotref: {where}not JSON ({exc})")
                continue
            if not isinstance(value, dict):
                counters.invalid += 1
                error_line(f"iotref: {where}not a JSON object")
                continue
            if "headerversion" in value:
                await _send(client, counters, client.send_message(value), where)
            else:
                await _send(
                    client, counters, client.send(asset, value, payloadversion=version), where
                )
    finally:
        stopped.cancel()


# --------------------------------------------------------------------------- the run


@dataclass
class RunOptions:
    assets: int
    interval: float
    version: int
    from_stdin: bool
    duration: float | None
    kind: Kind
    seed: int
    speedup: float
    status_every: float
    close_timeout: float
    fail_fast: bool = False
    json_output: bool = False


def make_presses(
    identity: DeviceIdentity, options: RunOptions
) -> list[tuple[Asset, PressSimulator]]:
    machine = identity.properties.machine_id or identity.properties.client_id
    start = datetime.now(timezone.utc)
    presses = []
    for i in range(options.assets):
        if options.kind == "mixed":
            kind = PressKind.OFFSET if i % 2 == 0 else PressKind.DIGITAL
        else:
            kind = PressKind(options.kind)
        profile = profile_for(kind)
        asset = Asset(
            assetid=f"{machine}-press-{i + 1}",
            assetserial=f"SIM-{machine[:8]}-{i + 1}",
            assettype=profile.asset_type,
            assetname=f"Simulated {kind.value} press {i + 1}",
            assetmanufacturername="iotref simulator",
            assetsoftwareversion=__version__,
        )
        presses.append((asset, PressSimulator(kind, seed=options.seed + i, start=start)))
    return presses


class EndOfInputDrain:
    """When the input ends (stdin closed), the run sends what it was fed before it stops:
    it goes on while the outbox holds messages and the platform acknowledged one within
    the last ``close_timeout`` seconds (a backlog drains at the publish quota, which can
    take longer than any fixed timeout). Without acknowledgements for that long (the
    platform out of reach, sending not permitted) it stops, and the close gets its usual
    ``--close-timeout``. A signal or ``--duration`` stops at once, as always."""

    def __init__(self, patience_s: float) -> None:
        self._patience_s = patience_s
        self._acked: int | None = None
        self._since = 0.0

    def goes_on(self, stats: ClientStats, now: float) -> bool:
        """Whether to keep running after the end of input, given the client's ``stats``."""
        if stats.queued == 0:
            return False
        if self._acked is None or stats.acked != self._acked:
            self._acked = stats.acked
            self._since = now
        return now - self._since < self._patience_s


STATUS_NOTIFY_EVERY_S: Final = 1.0
"""How often a service's status text (``STATUS=``) is renewed."""
_TICK_S: Final = 0.25


async def feed_watchdog(notifier: SystemdNotifier) -> None:
    """``WATCHDOG=1`` every half of ``WATCHDOG_USEC``, for as long as this event loop runs
    its tasks (a blocked or starved loop stops it, and systemd restarts the service)."""
    interval = notifier.watchdog_interval_s
    if interval is None:
        return
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


async def run_sender(
    client: AsyncClient,
    identity: DeviceIdentity,
    options: RunOptions,
    notifier: SystemdNotifier | None = None,
) -> int:
    """Start ``client``, feed it until stopped, close it, print the summary; the exit
    code (see :func:`exit_code_of`). ``notifier`` tells systemd about it (readiness,
    status, stopping, watchdog)."""
    counters = RunCounters()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    service = notifier or SystemdNotifier(None)
    # With --json, stdout carries the one JSON object; everything for people goes to stderr.
    out = sys.stderr if options.json_output else sys.stdout
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        stop.set()
        if signals > 1:
            # Everything accepted is already committed to the outbox: a hard exit loses
            # nothing (unwritten acks only mean a few duplicates on the next run).
            error_line("iotref: stopping now (second signal)")
            os._exit(130)

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)

    # A damaged outbox is said once, below, in the command's own words.
    logging.getLogger(outbox_opening.__name__).addFilter(
        lambda record: not getattr(record, RECOVERY_LOG_ATTRIBUTE, False)
    )
    watchdog = asyncio.ensure_future(feed_watchdog(service))
    began = time.monotonic()
    try:
        # Without --fail-fast the run starts at once, connected or not: it queues what it
        # is fed and connects when it can.
        starting = asyncio.ensure_future(client.start(wait=options.fail_fast))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            service.stopping("stopped before the connection was up")
            error_line("iotref: stopped before the connection was up; nothing was sent")
            final = await client.close(0)
            return _finish(final, counters, time.monotonic() - began, client, options, out)
        stopped.cancel()
        starting.result()  # raises the start's error
        if client.outbox_recovery is not None:
            error_line(f"iotref: warning: {client.outbox_recovery.summary()}")

        presses = make_presses(identity, options)
        began = time.monotonic()
        props = identity.properties
        quiet = is_quiet()
        if not quiet:
            out.write(
                f"Running sender {props.client_id} ({client.settings.where()}), "
                + (
                    "reading JSON lines from stdin"
                    if options.from_stdin
                    else f"{options.assets} simulated press(es), every {options.interval:g} s"
                )
                + f", policy {client.options.policy}, "
                + pacing_text(client.options.publish_rate_limit)
                + ". Stop with Ctrl-C.\n"
            )
            out.flush()
        service.ready(status_text(client.stats(), counters, 0.0))
        with Display(out.isatty(), options.status_every, out, shown=not quiet) as display:
            if options.from_stdin:
                feeder = read_stdin(client, presses[0][0], options.version, counters, stop)
            else:
                feeder = simulate(
                    client,
                    presses,
                    options.interval,
                    options.speedup,
                    options.version,
                    counters,
                    display,
                    stop,
                )
            feeding = asyncio.ensure_future(feeder)
            if options.duration is not None:
                loop.call_later(options.duration, stop.set)
            status_at = loop.time()
            progress = EndOfInputDrain(options.close_timeout)
            try:
                while not stop.is_set():
                    stats = client.stats()
                    elapsed = time.monotonic() - began
                    display.update(stats, counters, elapsed)
                    if loop.time() >= status_at:
                        service.status(status_text(stats, counters, elapsed))
                        status_at = loop.time() + STATUS_NOTIFY_EVERY_S
                    if stats.state is ConnectionState.TAKEN_OVER:
                        break
                    if feeding.done() and not progress.goes_on(stats, loop.time()):
                        break
                    with contextlib.suppress(TimeoutError):
                        async with stdlib_compat.timeout(_TICK_S):
                            await stop.wait()
                stop.set()
                stats = client.stats()
                service.stopping(
                    f"stopping: {stats.queued} message(s) in the outbox, sending for at most "
                    f"{options.close_timeout:g} s"
                )
                with contextlib.suppress(asyncio.CancelledError):
                    await feeding
                final = await client.close(options.close_timeout)
                display.update(final, counters, time.monotonic() - began, force=True)
            finally:
                if not feeding.done():
                    feeding.cancel()
        return _finish(final, counters, time.monotonic() - began, client, options, out)
    finally:
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog


def _finish(
    final: ClientStats,
    counters: RunCounters,
    elapsed: float,
    client: AsyncClient,
    options: RunOptions,
    out: TextIO,
) -> int:
    """Print the summary (and with ``--json`` the JSON object); the exit code."""
    code = exit_code_of(final, counters)
    summary = summary_text(final, counters, elapsed)
    out.write(summary + "\n")
    out.flush()
    if code == EXIT_FAILED:
        error_line(
            f"iotref: stopped: another process is connected with this machine's identity "
            f"(client id {client.client_id}) and keeps taking its MQTT session over "
            f"({final.connection_error or 'taken over'}); run only one sender per "
            "certificate store (a copied store is the usual cause)"
        )
    elif code == EXIT_REFUSED:
        error_line(
            f"iotref: {counters.refused} message(s) of the input were refused "
            "(see the lines above); the rest was accepted"
        )
    if options.json_output:
        record = summary_record(
            final,
            counters,
            elapsed,
            client=client,
            from_stdin=options.from_stdin,
            exit_code=code,
        )
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()
    return code


@click.command()
@_environment_options
@_store_option
@click.option(
    "--assets",
    type=click.IntRange(1, 1000),
    default=1,
    show_default=True,
    help="Number of simulated presses.",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.001),
    default=1.0,
    show_default=True,
    help="Seconds between two status messages of each press.",
)
@click.option(
    "--payload-version",
    type=click.Choice(["1", "2"]),
    default="2",
    show_default=True,
    help="Status payload version.",
)
@click.option(
    "--stdin",
    "from_stdin",
    is_flag=True,
    help="Send JSON lines from stdin (full messages, or Status payloads of the first asset) "
    "instead of simulating; the run ends with the input.",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0),
    default=None,
    help="Stop after this many seconds (default: run until Ctrl-C / SIGTERM).",
)
@click.option(
    "--policy",
    type=click.Choice(["hold", "drop"]),
    default="hold",
    show_default=True,
    help="Without permission (sendTelemetryData false): keep messages in the outbox, or drop them.",
)
@click.option(
    "--kind",
    type=click.Choice(["mixed", "offset", "digital"]),
    default="mixed",
    show_default=True,
    help="Simulated press kind (mixed alternates offset and digital).",
)
@click.option("--seed", type=int, default=None, help="Simulation seed (default: random).")
@click.option(
    "--speedup",
    type=click.FloatRange(min=0.01, max=10_000),
    default=1.0,
    show_default=True,
    help="Simulated seconds per real second.",
)
@click.option(
    "--status-every",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Seconds between status lines when they do not go to a terminal.",
)
@click.option(
    "--close-timeout",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="On stop, at most this many seconds to send what is queued (reconnecting if "
    "need be); the rest stays in the outbox for the next run. At the end of stdin the run "
    "first sends on while the platform acknowledges, and stops after this many seconds "
    "without an acknowledgement.",
)
@click.option(
    "--fail-fast",
    is_flag=True,
    help="Exit with an error when the platform cannot be reached at the start, instead of "
    "starting offline and connecting when it can.",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=None,
    help="MQTT port instead of the store's (e.g. 443 with --alpn where only HTTPS is let out).",
)
@click.option(
    "--alpn",
    is_flag=True,
    help="Offer ALPN x-amzn-mqtt-ca in the TLS handshake, as AWS IoT Core needs for MQTT "
    "on port 443.",
)
@click.option(
    "--publish-rate-limit",
    type=click.FloatRange(min=0),
    default=None,
    help="The platform's quota of publishes a second on the connection, paced to stay "
    "under it; 0: no pacing. Default: the environment's PUBLISH_RATE_LIMIT, else 100 "
    "(AWS IoT Core's quota).",
)
@click.option(
    "--json",
    "json_output",
    is_flag=True,
    help="At the end, print the summary as one JSON object on stdout; the status lines "
    "go to stderr.",
)
@_expected_errors
def run(
    env_name: str | None,
    env_file: Path | None,
    store: Path | None,
    assets: int,
    interval: float,
    payload_version: str,
    from_stdin: bool,
    duration: float | None,
    policy: Literal["hold", "drop"],
    kind: Kind,
    seed: int | None,
    speedup: float,
    status_every: float,
    close_timeout: float,
    fail_fast: bool,
    port: int | None,
    alpn: bool,
    publish_rate_limit: float | None,
    json_output: bool,
) -> int:
    """Run this machine's sender: simulated presses (or stdin) until stopped.

    Exit status: 0 everything fed was accepted, 1 an error or the identity taken over by
    another process, 2 a wrong command line, 3 some input refused (invalid, or the outbox
    full). Under systemd (Type=notify) it says when it is ready and feeds the watchdog."""
    env = _env(env_name, env_file)
    identity = load_identity(
        env,
        store,
        check_environment=store is None or _explicit_environment(env_name, env_file),
    )
    options = RunOptions(
        assets=assets,
        interval=interval,
        version=int(payload_version),
        from_stdin=from_stdin,
        duration=duration,
        kind=kind,
        seed=seed if seed is not None else int.from_bytes(os.urandom(4), "big"),
        speedup=speedup,
        status_every=status_every,
        close_timeout=close_timeout,
        fail_fast=fail_fast,
        json_output=json_output,
    )
    sender = Sender(SenderType.SYSTEM, "iotref run", __version__)
    quotas = env.client_limits()
    if publish_rate_limit is not None:
        quotas["publish_rate_limit"] = publish_rate_limit or None
    client = AsyncClient(
        identity,
        sender=sender,
        policy=policy,
        close_timeout_s=close_timeout,
        fail_fast=fail_fast,
        port=port,
        alpn=alpn,
        **quotas,
    )
    notifier = SystemdNotifier.from_environment()
    try:
        return asyncio.run(run_sender(client, identity, options, notifier))
    finally:
        notifier.close()
