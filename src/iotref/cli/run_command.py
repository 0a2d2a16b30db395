"""``iotref run``: run this machine's sender until stopped.

Owns the command line around :class:`iotref.device.client.AsyncClient`: finding the
certificate store (``--store``, or the one of ``--env``/``--env-file``, with the same
helpers as ``iotref provision``), starting the client, feeding it
(:mod:`iotref.cli.run_inputs`: simulated presses or JSON lines from stdin) while the status
line runs (:mod:`iotref.cli.run_status`), and a clean stop on Ctrl-C, SIGTERM,
``--duration`` or the end of stdin: the outbox gets up to ``--close-timeout`` seconds to
drain (reconnecting meanwhile if the platform is out of reach; at the end of stdin the run
first goes on sending for as long as the platform keeps acknowledging, see
:class:`EndOfInputDrain`), the rest stays in the outbox for the next run, and a summary
says what was accepted, acknowledged and left (``--json``: also as one JSON object on
stdout). One signal is enough; a second one exits at once. The exit status is
:func:`iotref.cli.run_status.exit_code_of`'s.

The platform need not be reachable at the start: the run starts offline, queues what it
is fed and says "waiting for the platform" with the reason until it connects
(``--fail-fast`` exits with an error instead). ``--port`` and ``--alpn`` reach the broker
on another port, e.g. AWS IoT Core's 443 with ALPN ``x-amzn-mqtt-ca``. A damaged outbox
found at start is reported in one line on stderr
(:mod:`iotref.device.telemetry.outbox_integrity`).

As a systemd ``Type=notify`` service (``NOTIFY_SOCKET`` set) it says READY=1 once the
outbox is open and the client started (connected or not), renews STATUS= with the status
line, says STOPPING=1 when it stops, and with ``WatchdogSec=`` sends WATCHDOG=1 at half
the interval for as long as its event loop runs (:mod:`iotref.device.systemd_notify`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, TextIO

import click

from iotref._version import __version__
from iotref.cli.onboarding_commands import (
    _env,
    _environment_options,
    _expected_errors,
    _store_option,
)
from iotref.cli.output import is_quiet
from iotref.cli.run_inputs import Kind, make_presses, read_stdin, simulate
from iotref.cli.run_status import (
    EXIT_FAILED,
    EXIT_REFUSED,
    Display,
    RunCounters,
    error_line,
    exit_code_of,
    pacing_text,
    status_text,
    summary_record,
    summary_text,
)
from iotref.device import stdlib_compat
from iotref.device.client import AsyncClient
from iotref.device.connection.state import ConnectionState
from iotref.device.errors import (
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
from iotref.device.telemetry.messages import Sender, SenderType
from iotref.device.telemetry.outbox_opening import RECOVERY_LOG_ATTRIBUTE

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


class EndOfInputDrain:
    """When the input ends (stdin closed), the run sends what it was fed before it stops:
    it goes on while the outbox holds messages and the platform acknowledged one within
    the last ``patience_s`` seconds (``--close-timeout``; a backlog drains at the publish
    quota, which can take longer than any fixed timeout). A connection that was up in this
    run and is down now gets ``reconnect_wait_s`` more (the largest reconnect delay plus
    the connect timeout), so that a broker restart near the end of input does not end the
    run before the device is back. Otherwise (the platform never reached, sending not
    permitted, ``--close-timeout 0``) it stops, and the close gets its usual
    ``--close-timeout``. A signal or ``--duration`` stops at once, as always."""

    def __init__(self, patience_s: float, reconnect_wait_s: float = 0.0) -> None:
        self._patience_s = patience_s
        self._reconnect_wait_s = reconnect_wait_s
        self._acked: int | None = None
        self._since = 0.0

    def goes_on(self, stats: ClientStats, now: float) -> bool:
        """Whether to keep running after the end of input, given the client's ``stats``."""
        if stats.queued == 0 or self._patience_s <= 0:
            return False
        if self._acked is None or stats.acked != self._acked:
            self._acked = stats.acked
            self._since = now
        limit = self._patience_s
        if not stats.connected and stats.connects > 0:
            limit += self._reconnect_wait_s
        return now - self._since < limit


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

        presses = make_presses(identity, options.assets, options.kind, options.seed)
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
            progress = EndOfInputDrain(
                options.close_timeout,
                client.options.max_backoff_s + client.options.connect_timeout_s,
            )
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
    "without an acknowledgement (plus the reconnect's time if the connection was lost).",
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
