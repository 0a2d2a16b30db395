"""``iotref run``: run this machine's sender until stopped.

Owns the command line around :class:`iotref.device.client.AsyncClient`: finding the
certificate store (``--store``, or the one of ``--env``/``--env-file``, with the same
helpers as ``iotref provision``), feeding it with simulated presses
(:mod:`iotref.device.simulator`) or with JSON lines read from stdin, the live status line
(rich on a terminal, periodic plain lines otherwise), and a clean stop on Ctrl-C, SIGTERM,
``--duration`` or the end of stdin: the outbox gets up to ``--close-timeout`` seconds to
drain (reconnecting meanwhile if the platform is out of reach), the rest stays in the
outbox for the next run, a summary is printed and the exit code is 0. One signal is
enough; a second one exits at once.

The platform need not be reachable at the start: the run starts offline, queues what it
is fed and says "waiting for the platform" with the reason until it connects
(``--fail-fast`` exits with an error instead). Another process running with this
machine's identity (a copied store) ends the run with exit code 1 and a line that says
so.

stdin lines: a complete message (it has ``headerversion``) is sent as it is; any other
JSON object is taken as a Status payload (``--payload-version``) of the first asset.
A line that is not JSON, not an object, or not valid against the schemas gets one line on
stderr, is counted as invalid, and the run goes on; so does a message over the platform's
payload limit (counted as too large, its size named). Messages the platform refuses for
good after they were queued are counted on the status line ("refused") and kept in the
outbox's refused table. A damaged outbox found at start is reported in one line on stderr
(see :mod:`iotref.device.outbox_integrity` and :mod:`iotref.device.outbox_salvage`).
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
from typing import Any, Literal, TextIO

import click

from iotref._version import __version__
from iotref.cli.onboarding_commands import (
    _env,
    _environment_options,
    _expected_errors,
    _store_option,
)
from iotref.device import stdlib_compat
from iotref.device.certificate_store import CertificateStore, DeviceIdentity, default_store_path
from iotref.device.client import (
    AsyncClient,
    ClientStats,
    InvalidMessageError,
    MessageTooLargeError,
    OutboxFullError,
)
from iotref.device.connection import ConnectionState, ConnectionTakenOver
from iotref.device.environment import ENV_FILE_VAR, ENV_VAR, Environment
from iotref.device.errors import StoreError
from iotref.device.messages import Asset, Sender, SenderType
from iotref.device.outbox import RECOVERY_LOG_ATTRIBUTE
from iotref.device.simulator import PressEvent, PressKind, PressSimulator, profile_for
from iotref.device.store_checks import environment_mismatch
from iotref.device.telemetry import SendStatus

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
    command = f"iotref provision {env.cli_selector}"
    if store is not None:
        command += f" --store {store}"
    provision = f"run '{command}'"
    certificate_store = CertificateStore(path)
    if not path.is_dir() or certificate_store.is_empty():
        raise StoreError(f"there is no certificate store at {path}", provision, path=path)
    identity = certificate_store.load()
    if check_environment:
        progress = certificate_store.read_progress()
        mismatch = (
            None
            if progress is None
            else environment_mismatch(
                path,
                progress,
                env.identity,
                selector=env.cli_selector,
                store_option=store,
                command="run",
            )
        )
        if mismatch is not None:
            raise StoreError(mismatch.reason, mismatch.next_step, path=path)
    return identity


# --------------------------------------------------------------------------- counters


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


def status_text(stats: ClientStats, counters: RunCounters, elapsed: float) -> str:
    """One status line: connected, permission, sent, acked, queued, dropped, invalid."""
    state = stats.connection_status
    permission = "yes" if stats.permission else "no"
    parts = [
        f"{elapsed:6.1f}s",
        state,
        f"permission {permission}",
        f"sent {stats.accepted}",
        f"acked {stats.acked}",
        f"queued {stats.queued}",
    ]
    if stats.held:
        parts.append(f"held {stats.held}")
    parts.append(f"dropped {stats.dropped_no_permission + stats.dropped_overflow}")
    parts.append(f"invalid {counters.invalid}")
    if counters.too_large:
        parts.append(f"too large {counters.too_large}")
    if stats.refused:
        parts.append(f"refused by platform {stats.refused}")
    if counters.refused_full:
        parts.append(f"refused (outbox full) {counters.refused_full}")
    return " | ".join(parts)


def status_renderable(stats: ClientStats, counters: RunCounters, elapsed: float) -> Any:
    """The status line for the terminal: colours, and short enough for 80 columns."""
    from rich.text import Text

    if stats.connected:
        state = ("● connected", "green")
    else:
        colour = "yellow" if not stats.state.terminal else "red"
        state = (f"● {stats.connection_status}", colour)
    permission = ("yes", "green") if stats.permission else ("no", "red")
    dropped = stats.dropped_no_permission + stats.dropped_overflow
    parts: list[Any] = [
        state,
        "  permission ",
        permission,
        f"  sent {stats.accepted}  acked {stats.acked}  queued {stats.queued}",
    ]
    if stats.held:
        parts.append((f" (held {stats.held})", "yellow"))
    parts.append(f"  dropped {dropped}")
    parts.append(("  invalid ", ""))
    parts.append((str(counters.invalid), "red" if counters.invalid else ""))
    if counters.too_large:
        parts.append((f"  too large {counters.too_large}", "red"))
    if stats.refused:
        parts.append((f"  refused {stats.refused}", "red"))
    if counters.refused_full:
        parts.append((f"  outbox full {counters.refused_full}", "red"))
    if elapsed >= 0:
        parts.append((f"  {elapsed:.0f}s", "dim"))
    return Text.assemble(*parts, no_wrap=True, overflow="ellipsis")


def summary_text(stats: ClientStats, counters: RunCounters, elapsed: float) -> str:
    kept = (
        f"{stats.queued} left in the outbox: the next run sends them"
        if stats.queued
        else "outbox empty"
    )
    refused = ""
    if counters.too_large:
        refused += f", too large {counters.too_large}"
    if stats.refused:
        refused += f", refused by the platform {stats.refused} (kept in the outbox's refused table)"
    return (
        f"Stopped after {elapsed:.1f} s: sent {stats.accepted}, acked {stats.acked}, "
        f"dropped {stats.dropped_no_permission + stats.dropped_overflow}, "
        f"invalid {counters.invalid}{refused}; {kept}."
    )


# --------------------------------------------------------------------------- display


class Display:
    """The live status line on a terminal, periodic plain lines otherwise."""

    def __init__(self, live: bool, every_s: float, out: TextIO) -> None:
        self.live_mode = live
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
    """Send what stdin says until it ends (then set ``stop``) or ``stop`` is set."""
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
                stop.set()
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


async def run_sender(client: AsyncClient, identity: DeviceIdentity, options: RunOptions) -> int:
    counters = RunCounters()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
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
    logging.getLogger("iotref.device.outbox").addFilter(
        lambda record: not getattr(record, RECOVERY_LOG_ATTRIBUTE, False)
    )
    # Without --fail-fast the run starts at once, connected or not: it queues what it is
    # fed and connects when it can.
    starting = asyncio.ensure_future(client.start(wait=options.fail_fast))
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        error_line("iotref: stopped before the connection was up; nothing was sent")
        return 0
    stopped.cancel()
    starting.result()  # raises the start's error
    if client.outbox_recovery is not None:
        error_line(f"iotref: warning: {client.outbox_recovery.summary()}")

    presses = make_presses(identity, options)
    began = time.monotonic()
    live = sys.stdout.isatty()
    props = identity.properties
    click.echo(
        f"Running sender {props.client_id} ({client.settings.where()}), "
        + (
            "reading JSON lines from stdin"
            if options.from_stdin
            else f"{options.assets} simulated press(es), every {options.interval:g} s"
        )
        + f", policy {client.options.policy}. Stop with Ctrl-C."
    )
    with Display(live, options.status_every, sys.stdout) as display:
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
        taken_over = False
        try:
            while not stop.is_set():
                stats = client.stats()
                display.update(stats, counters, time.monotonic() - began)
                if stats.state is ConnectionState.TAKEN_OVER:
                    taken_over = True
                    stop.set()
                    break
                if feeding.done():
                    break
                with contextlib.suppress(TimeoutError):
                    async with stdlib_compat.timeout(0.25):
                        await stop.wait()
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await feeding
            final = await client.close(options.close_timeout)
            display.update(final, counters, time.monotonic() - began, force=True)
        finally:
            if not feeding.done():
                feeding.cancel()
    click.echo(summary_text(final, counters, time.monotonic() - began))
    if taken_over or final.state is ConnectionState.TAKEN_OVER:
        error_line(
            f"iotref: stopped: another process is connected with this machine's identity "
            f"(client id {props.client_id}) and keeps taking its MQTT session over "
            f"({final.connection_error or 'taken over'}); run only one sender per "
            "certificate store (a copied store is the usual cause)"
        )
        return 1
    return 0


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
    help="Seconds between status lines when stdout is not a terminal.",
)
@click.option(
    "--close-timeout",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="On stop, at most this many seconds to send what is queued (reconnecting if "
    "need be); the rest stays in the outbox for the next run.",
)
@click.option(
    "--fail-fast",
    is_flag=True,
    help="Exit with an error when the platform cannot be reached at the start, instead of "
    "starting offline and connecting when it can.",
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
) -> int:
    """Run this machine's sender: simulated presses (or stdin) until stopped."""
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
    )
    sender = Sender(SenderType.SYSTEM, "iotref run", __version__)
    client = AsyncClient(
        identity,
        sender=sender,
        policy=policy,
        close_timeout_s=close_timeout,
        fail_fast=fail_fast,
    )
    return asyncio.run(run_sender(client, identity, options))
