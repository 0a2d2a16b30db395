"""``iotref demo``: the whole story in one command.

Start (or reuse) the local sandbox, log in with the device flow, provision the machine (or
reuse its certificate store), connect, sync the shadow and publish a simulated press's
status for a bounded time. Midway the platform switches ``sendTelemetryData`` off and on
again, and the demo shows the sender obeying. It ends with a summary and the monitor link.

Against ``--env test|live`` the same steps run against the real platform; the person
approves the device flow in a browser, and the platform-side switch is skipped (it needs
operator access the demo does not have).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import httpx
from cryptography import x509
from rich.console import Console
from rich.live import Live
from rich.table import Table

from iotref._version import __version__
from iotref.cli.onboarding_commands import _environment_options, _expected_errors, _qr_text
from iotref.cli.output import is_quiet
from iotref.device.client import AsyncClient
from iotref.device.errors import IotrefError, LoginRequired, StoreError
from iotref.device.onboarding.certificate_store import (
    ROOT_CA_FILE,
    CertificateStore,
    default_store_path,
)
from iotref.device.onboarding.device_flow import DeviceAuthorization
from iotref.device.onboarding.directory_client import MachineSpec
from iotref.device.onboarding.environment import (
    Environment,
    is_loopback_host,
    load_environment_file,
    resolve_environment,
)
from iotref.device.onboarding.next_steps import Selection, shell_word
from iotref.device.onboarding.provisioning import ProvisionOptions
from iotref.device.onboarding.service import Onboarding
from iotref.device.telemetry.messages import Asset, AssetType, Sender, SenderType
from iotref.fleet.press import Phase, PressSimulator

DEFAULT_DATA_DIR = Path(".sandbox")
DEFAULT_HTTP_PORT = 8780
DEFAULT_MQTT_PORT = 8883
REAL_MONITORS = {
    "test": "http://monitor.iot.stg.connectprint.cloud",
    "live": "https://monitor.iot.connectprint.cloud",
}


class DemoError(IotrefError):
    """A demo step that cannot go on; one line with what to do."""


@dataclass
class SandboxInfo:
    data_dir: Path
    http_url: str
    mqtt_port: int
    admin_token: str
    env_file: Path
    #: The server root CA the sandbox's broker presents (``ca_file`` in sandbox.json).
    ca_file: Path | None
    started_here: bool
    pid: int | None


@dataclass
class Progress:
    """What the display shows."""

    steps: list[tuple[str, str]] = field(default_factory=list)
    permission: str = "-"
    sent: int = 0
    acked: int = 0
    queued: int = 0
    received: int | None = None
    valid: int | None = None
    phase: str = ""


# --------------------------------------------------------------------------- sandbox


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _running_sandbox(data_dir: Path) -> dict[str, Any] | None:
    """``sandbox.json`` of a sandbox that holds ``data_dir``'s lock, else None."""
    from iotref.sandbox.runner import read_running

    running = read_running(data_dir)
    return running.info if running.pid is not None else None


@dataclass(frozen=True)
class PortChoice:
    """The ports a sandbox the demo starts listens on (0: any free port), and the default
    ports that were busy, so that free ones are used instead."""

    http: int
    mqtt: int
    busy_defaults: tuple[int, ...] = ()


def choose_ports(http_port: int | None, mqtt_port: int | None) -> PortChoice:
    """Ports asked for are used as they are (one in use is an error); where none was asked
    for, the default if it is free, else any free port."""
    chosen: list[int] = []
    busy: list[int] = []
    for asked, default, option in (
        (http_port, DEFAULT_HTTP_PORT, "--http-port"),
        (mqtt_port, DEFAULT_MQTT_PORT, "--mqtt-port"),
    ):
        if asked is None:
            free = _port_free(default)
            chosen.append(default if free else 0)
            if not free:
                busy.append(default)
        elif asked and not _port_free(asked):
            raise DemoError(
                f"port {asked} is in use by another program",
                next_step=f"stop it, or run the demo with {option} N (another free port; "
                "0 or no option: a free one)",
            )
        else:
            chosen.append(asked)
    return PortChoice(chosen[0], chosen[1], tuple(busy))


def _start_sandbox(data_dir: Path, ports: PortChoice) -> SandboxInfo:
    http_port, mqtt_port = ports.http, ports.mqtt
    data_dir.mkdir(parents=True, exist_ok=True)
    log_dir = data_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    (data_dir / "sandbox.json").unlink(missing_ok=True)
    with (log_dir / "sandbox-demo.out").open("ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "iotref.cli.main",
                "sandbox",
                "up",
                "--data-dir",
                str(data_dir),
                "--http-port",
                str(http_port),
                "--mqtt-port",
                str(mqtt_port),
                "--auto-approve",
                "--poll-interval",
                "1",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            lines = (log_dir / "sandbox-demo.out").read_text(errors="replace").splitlines()
            reason = next(
                (
                    ln.removeprefix("iotref sandbox: ")
                    for ln in reversed(lines)
                    if ln.startswith("iotref sandbox: ")
                ),
                f"it exited with {proc.returncode}",
            )
            raise DemoError(
                f"the sandbox did not start: {reason}",
                next_step=f"see {log_dir / 'sandbox-demo.out'}",
            )
        info = _running_sandbox(data_dir)
        if info and (data_dir / "sandbox.json").exists():
            return _info(data_dir, info, started_here=True)
        time.sleep(0.1)
    proc.terminate()
    raise DemoError(
        "the sandbox did not become ready within 60 s",
        next_step=f"see {log_dir / 'sandbox-demo.out'}",
    )


def _info(data_dir: Path, info: dict[str, Any], *, started_here: bool) -> SandboxInfo:
    return SandboxInfo(
        data_dir=data_dir,
        http_url=str(info["http_url"]),
        mqtt_port=int(info["mqtt_port"]),
        admin_token=str(info["admin_token"]),
        env_file=Path(str(info["env_file"])),
        ca_file=Path(str(info["ca_file"])) if info.get("ca_file") else None,
        started_here=started_here,
        pid=int(info["pid"]) if info.get("pid") else None,
    )


def _stop_sandbox(sandbox: SandboxInfo) -> None:
    if sandbox.pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(sandbox.pid, signal.SIGTERM)
    from iotref.sandbox.runner import read_running

    # The lock is released only after every component (Mosquitto too) has stopped.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and read_running(sandbox.data_dir).pid is not None:
        time.sleep(0.1)


# --------------------------------------------------------------------------- platform side


class Platform:
    """The operator's side of the sandbox: the shadow REST API and the monitor's counts."""

    def __init__(self, sandbox: SandboxInfo) -> None:
        self.http = httpx.AsyncClient(
            base_url=sandbox.http_url,
            headers={"Authorization": f"Bearer {sandbox.admin_token}"},
            timeout=10,
        )

    async def set_send_telemetry(self, client_id: str, allowed: bool) -> None:
        body = {"state": {"desired": {"sendTelemetryData": allowed}}}
        answer = await self.http.post(f"/things/{client_id}/shadow", json=body)
        if answer.status_code != 200:
            raise DemoError(f"the shadow service refused the switch ({answer.status_code})")

    async def counts(self, client_id: str) -> tuple[int, int]:
        answer = await self.http.get(f"/monitor/api/devices/{client_id}")
        if answer.status_code == 404:
            return 0, 0
        answer.raise_for_status()
        body = answer.json()
        return int(body.get("received", 0)), int(body.get("valid", 0))

    async def aclose(self) -> None:
        await self.http.aclose()


# --------------------------------------------------------------------------- display


class Display:
    """Steps, then live counters: a rich live view on a terminal, plain lines otherwise.
    With ``iotref --quiet`` neither is shown: only what needs the user (the approval link,
    notes about what the demo handled by itself) and the summary."""

    def __init__(self, console: Console, quiet: bool = False) -> None:
        self.console = console
        self.quiet = quiet
        self.progress = Progress()
        self.live: Live | None = None
        self._last_plain = 0.0

    def step(self, name: str, detail: str) -> None:
        self.progress.steps.append((name, detail))
        if self.quiet:
            return
        if self.live is None:
            self.console.print(f"[green]✓[/] [bold]{name}[/]  {detail}", highlight=False)
        else:
            self.live.update(self._render())

    def note(self, text: str) -> None:
        """One line about something the demo handled by itself."""
        self.console.print(f"[yellow]![/] {text}", highlight=False)

    def start_live(self) -> None:
        if self.console.is_terminal and not self.quiet:
            self.live = Live(self._render(), console=self.console, refresh_per_second=8)
            self.live.start()

    def stop_live(self) -> None:
        if self.live is not None:
            self.live.update(self._render())
            self.live.stop()
            self.live = None

    def refresh(self) -> None:
        if self.live is not None:
            self.live.update(self._render())
        elif not self.quiet and time.monotonic() - self._last_plain >= 2:
            self._last_plain = time.monotonic()
            p = self.progress
            self.console.print(
                f"  {p.phase:<28} permission {p.permission:<4} sent {p.sent:>4}  "
                f"acked {p.acked:>4}  queued {p.queued:>3}  "
                f"received {_n(p.received):>4}  valid {_n(p.valid):>4}",
                highlight=False,
            )

    def _render(self) -> Table:
        table = Table.grid(padding=(0, 2))
        p = self.progress
        if p.phase:
            table.add_row("[cyan]▶[/]", "[bold]publishing[/]", p.phase)
            table.add_row("", "permission", p.permission)
            table.add_row("", "sent / acknowledged", f"{p.sent} / {p.acked}  (queued {p.queued})")
            table.add_row(
                "", "received by the platform / valid", f"{_n(p.received)} / {_n(p.valid)}"
            )
        return table


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)


# --------------------------------------------------------------------------- the story


@dataclass
class DemoOptions:
    env: Environment
    sandbox: SandboxInfo | None
    store: Path
    #: ``--store`` as given (None: the default store of the environment).
    store_option: Path | None
    duration: float
    interval: float
    switch: bool


def _set_aside_other_sandboxes_store(opts: DemoOptions, display: Display) -> None:
    """The default store of the local environment made with another sandbox (an earlier
    data dir, or other ports) is of no use with this one: move it aside, keeping it, so
    that the demo provisions anew. A store given with ``--store`` is left alone (a
    mismatch is then refused with the reason and what to do)."""
    if opts.sandbox is None or opts.store_option is not None:
        return
    store = CertificateStore(opts.store)
    try:
        progress = store.read_progress()
    except StoreError:
        return  # reported by the checks that follow
    if progress is None:
        return
    recorded = progress.environment
    host = urlsplit(recorded.directory_host).hostname or ""
    if recorded.name != opts.env.name or not is_loopback_host(host):
        return  # not a sandbox's store
    if not recorded.matches(opts.env.identity):
        difference = recorded.difference(opts.env.identity)
    elif recorded.sandbox_id is None and _other_root_ca(store, opts.sandbox.ca_file):
        # Made before sandboxes had ids: its root CA tells that another sandbox made it.
        difference = f"a sandbox at {recorded.directory_host} with another root CA"
    else:
        return
    label = recorded.sandbox_id or time.strftime("%Y%m%d-%H%M%S")
    target = opts.store.with_name(f"{opts.store.name}.sandbox-{label}")
    suffix = 1
    while target.exists():
        suffix += 1
        target = opts.store.with_name(f"{opts.store.name}.sandbox-{label}-{suffix}")
    try:
        opts.store.rename(target)
    except OSError as exc:
        raise DemoError(
            f"the store {opts.store} belongs to {difference}, and moving it aside failed: "
            f"{exc.strerror or exc}",
            next_step=f"move {opts.store} away yourself, or pass --store with a new folder",
        ) from None
    display.note(
        f"the store {_relative(opts.store)} belongs to {difference}; "
        f"moved it to {_relative(target)}"
    )


def _other_root_ca(store: CertificateStore, sandbox_ca: Path | None) -> bool:
    """Whether the store's root CA is not the sandbox's (False when either is unreadable:
    the checks that follow report a broken store)."""
    if sandbox_ca is None:
        return False
    try:
        ours = x509.load_pem_x509_certificate(store.file(ROOT_CA_FILE).read_bytes())
        theirs = x509.load_pem_x509_certificate(sandbox_ca.read_bytes())
    except (OSError, ValueError):
        return False
    return ours != theirs


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


async def _login_and_provision(opts: DemoOptions, display: Display) -> Path:
    def show(authorization: DeviceAuthorization) -> None:
        if opts.sandbox is not None and opts.sandbox.started_here:
            return  # the sandbox the demo started approves it (--auto-approve)
        display.console.print(
            f"Approve this device: open {authorization.verification_uri_complete} "
            f"(code {authorization.user_code})"
        )
        qr = _qr_text(authorization.verification_uri_complete)
        if qr:
            display.console.print(qr, end="", highlight=False)

    async def login(onboarding: Onboarding) -> None:
        await onboarding.login(show)
        how = (
            "approved by the sandbox" if opts.sandbox and opts.sandbox.started_here else "approved"
        )
        display.step("login", f"device flow {how}; tokens saved (never shown)")

    _set_aside_other_sandboxes_store(opts, display)
    async with Onboarding(opts.env, store_path=opts.store_option) as onboarding:
        status = onboarding.login_status()
        report = onboarding.check()
        reused_login = False
        if report.ok and not report.missing and report.properties is not None:
            display.step("login", "not needed: the certificate store is complete")
        elif status.logged_in:
            reused_login = True
            display.step("login", f"reusing the saved login ({status.token_path.name})")
        else:
            await login(onboarding)
        machine = MachineSpec(
            name="iotref demo press",
            manufacturer="iotref demo",
            serial_number=f"DEMO-{uuid.uuid4().hex[:10].upper()}",
            kind="offset_press",
        )
        # A store with progress (complete, or interrupted) knows its machine already.
        known = onboarding.store.read_progress() is not None
        options = ProvisionOptions(machine=None if known else machine)
        try:
            result = await onboarding.provision(options)
        except LoginRequired as exc:
            if not reused_login:
                raise
            # The saved login no longer works (refresh token expired, revoked or spent, or
            # made with a sandbox this one replaced): drop it and log in again.
            onboarding.logout()
            display.note(f"{exc.reason}: deleted it, logging in again")
            await login(onboarding)
            result = await onboarding.provision(options)
    if result.outcome == "reused":
        display.step(
            "provision",
            f"reusing the certificate store {result.store_path} "
            f"(client id {result.properties.client_id})",
        )
    else:
        display.step(
            "provision",
            f"{result.outcome}: machine {result.properties.machine_id}, client id "
            f"{result.properties.client_id}, store {result.store_path}",
        )
    return result.store_path


async def _publish(opts: DemoOptions, store: Path, display: Display) -> dict[str, Any]:
    sender = Sender(SenderType.SYSTEM, "iotref demo gateway", __version__)
    press = Asset("demo-press-1", "DEMO-SN-1", AssetType.SHEETFED_PRESS, assetname="Demo press")
    # Printing from the first message: a press that starts idle waits longer for its first
    # job than the demo lasts, and its machine chart would be a flat line.
    simulator = PressSimulator(seed=7, start_phase=Phase.PRODUCTION)
    platform = Platform(opts.sandbox) if opts.sandbox is not None else None
    p = display.progress
    findings: dict[str, Any] = {"switch": None}
    try:
        async with AsyncClient.from_store(store, sender=sender) as client:
            display.step(
                "connect",
                f"mutual TLS to {client.properties.mqtt_endpoint}:"
                f"{client.properties.mqtt_port} as {client.client_id}",
            )
            allowed = client.permission
            display.step("shadow", f"synced; desired.sendTelemetryData = {str(allowed).lower()}")
            if not allowed and platform is not None:
                await platform.set_send_telemetry(client.client_id, True)
                await client.wait_permission(True, timeout=10)
            channel = client.asset(press)
            # The platform's counts for this device include earlier runs: count from here.
            base_received, base_valid = (
                await platform.counts(client.client_id) if platform is not None else (0, 0)
            )
            display.start_live()
            started = time.monotonic()
            off_at = opts.duration / 3 if opts.switch and platform else None
            on_at = 2 * opts.duration / 3 if opts.switch and platform else None
            switched_off = switched_on = False
            received_when_off: int | None = None
            next_count = 0.0
            while (elapsed := time.monotonic() - started) < opts.duration:
                if off_at is not None and not switched_off and elapsed >= off_at:
                    assert platform is not None
                    await platform.set_send_telemetry(client.client_id, False)
                    await client.wait_permission(False, timeout=10)
                    await client.wait_drained(timeout=5)
                    await asyncio.sleep(0.5)
                    received_when_off, _ = await platform.counts(client.client_id)
                    switched_off = True
                    p.phase = "platform switched sendTelemetryData OFF: holding"
                if on_at is not None and switched_off and not switched_on and elapsed >= on_at:
                    assert platform is not None
                    received_before_on, _ = await platform.counts(client.client_id)
                    held = client.stats().held
                    findings["switch"] = {
                        "held": held,
                        "arrived_while_off": received_before_on - (received_when_off or 0),
                    }
                    await platform.set_send_telemetry(client.client_id, True)
                    await client.wait_permission(True, timeout=10)
                    switched_on = True
                    p.phase = f"switched back ON: sending the {held} held messages"
                if not p.phase or (not switched_off and not switched_on):
                    p.phase = "sendTelemetryData on: publishing"
                simulator.step(opts.interval)
                await channel.send(simulator.status())
                stats = client.stats()
                p.permission = "on" if stats.permission else "off"
                p.sent, p.acked, p.queued = stats.accepted, stats.acked, stats.queued
                if platform is not None and time.monotonic() >= next_count:
                    received, valid = await platform.counts(client.client_id)
                    p.received, p.valid = received - base_received, valid - base_valid
                    next_count = time.monotonic() + 1
                display.refresh()
                await asyncio.sleep(opts.interval)
            p.phase = "done; waiting for the last acknowledgements"
            drained = await client.wait_drained(timeout=15)
            stats = client.stats()
            p.sent, p.acked, p.queued = stats.accepted, stats.acked, stats.queued
            findings.update(
                sent=stats.accepted,
                acked=stats.acked,
                queued=stats.queued,
                drained=drained,
                client_id=client.client_id,
            )
        if platform is not None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                received, valid = await platform.counts(findings["client_id"])
                p.received, p.valid = received - base_received, valid - base_valid
                if p.received >= findings["sent"]:
                    break
                await asyncio.sleep(0.2)
            findings.update(received=p.received, valid=p.valid)
        display.refresh()
    finally:
        display.stop_live()
        if platform is not None:
            await platform.aclose()
    return findings


def _summary(opts: DemoOptions, findings: dict[str, Any], console: Console) -> bool:
    ok = bool(findings.get("drained"))
    console.print()
    console.print("[bold]Summary[/]")
    console.print(
        f"  sent {findings['sent']}, acknowledged by the broker {findings['acked']}, "
        f"still queued {findings['queued']}"
    )
    if "received" in findings:
        received, valid = findings["received"], findings["valid"]
        console.print(f"  received by the platform {received}, valid {valid}")
        ok = ok and received >= findings["sent"] and valid == received
    switch = findings.get("switch")
    if switch is not None:
        obeyed = switch["arrived_while_off"] == 0
        mark = "[green]✓[/]" if obeyed else "[red]✗[/]"
        console.print(
            f"  {mark} while sendTelemetryData was off, {switch['arrived_while_off']} messages "
            f"reached the platform; {switch['held']} were held and sent after it came back on"
        )
        ok = ok and obeyed
    elif opts.switch and opts.sandbox is None:
        console.print(
            f"  (the platform-side switch needs operator access; skipped on {opts.env.name})"
        )
    if opts.sandbox is not None:
        console.print(
            f"  monitor: {opts.sandbox.http_url}/monitor?token={opts.sandbox.admin_token}"
        )
    elif opts.env.name in REAL_MONITORS:
        console.print(f"  monitor: {REAL_MONITORS[opts.env.name]}")
    console.print("[green]demo finished[/]" if ok else "[red]demo finished with problems[/]")
    return ok


@click.command()
@_environment_options
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_DATA_DIR,
    show_default=True,
    help="The local sandbox's data dir (local environment only).",
)
@click.option(
    "--http-port",
    type=click.IntRange(0, 65535),
    default=None,
    help=f"HTTP port for a sandbox the demo starts [default: {DEFAULT_HTTP_PORT}, or a free "
    "one if it is in use; 0: a free one].",
)
@click.option(
    "--mqtt-port",
    type=click.IntRange(0, 65535),
    default=None,
    help=f"MQTT port for a sandbox the demo starts [default: {DEFAULT_MQTT_PORT}, or a free "
    "one if it is in use; 0: a free one].",
)
@click.option(
    "--store",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Certificate store folder (default: certificate_store/<env>).",
)
@click.option(
    "--duration",
    type=click.FloatRange(3, 3600),
    default=18.0,
    show_default=True,
    help="Seconds of publishing.",
)
@click.option(
    "--interval",
    type=click.FloatRange(0.01, 60),
    default=0.25,
    show_default=True,
    help="Seconds between status messages.",
)
@click.option("--no-switch", is_flag=True, help="Do not switch sendTelemetryData midway.")
@click.option(
    "--stop-sandbox",
    is_flag=True,
    help="Stop a sandbox the demo started when it ends (default: keep it for the monitor).",
)
@_expected_errors
def demo(
    env_name: str | None,
    env_file: Path | None,
    data_dir: Path,
    http_port: int | None,
    mqtt_port: int | None,
    store: Path | None,
    duration: float,
    interval: float,
    no_switch: bool,
    stop_sandbox: bool,
) -> None:
    """Run the whole story: sandbox, login, provision, connect, shadow, telemetry."""
    console = Console(highlight=False, soft_wrap=not sys.stdout.isatty())
    display = Display(console, quiet=is_quiet())
    sandbox: SandboxInfo | None = None
    local = env_file is None and (env_name or os.environ.get("IOTREF_ENV") or "local") == "local"
    if local:
        running = _running_sandbox(data_dir)
        if running is not None:
            sandbox = _info(data_dir, running, started_here=False)
            display.step(
                "sandbox",
                f"using the sandbox already running at {sandbox.http_url} (pid {sandbox.pid})",
            )
        else:
            ports = choose_ports(http_port, mqtt_port)
            sandbox = _start_sandbox(data_dir, ports)
            busy = ""
            if ports.busy_defaults:
                taken = " and ".join(str(port) for port in ports.busy_defaults)
                several = len(ports.busy_defaults) > 1
                busy = (
                    f"; ports {taken} are in use, so it took free ones"
                    if several
                    else f"; port {taken} is in use, so it took a free one"
                )
            display.step(
                "sandbox",
                f"started at {sandbox.http_url}, MQTT port {sandbox.mqtt_port} "
                f"(data in {data_dir}{busy})",
            )
        env = load_environment_file(Path(_relative(sandbox.env_file)), name="local")
    else:
        env = resolve_environment(env_name, env_file)
        display.step("environment", str(env))
    opts = DemoOptions(
        env=env,
        sandbox=sandbox,
        store=store or default_store_path(env.name),
        store_option=store,
        duration=duration,
        interval=interval,
        switch=not no_switch,
    )
    try:

        async def story() -> dict[str, Any]:
            path = await _login_and_provision(opts, display)
            return await _publish(opts, path, display)

        findings = asyncio.run(story())
        ok = _summary(opts, findings, console)
    finally:
        if sandbox is not None and sandbox.started_here:
            if stop_sandbox:
                _stop_sandbox(sandbox)
                console.print("sandbox stopped")
            else:
                use = Selection(("--env-file", str(data_dir / "env.local")), store)
                console.print(
                    f"The sandbox keeps running for the monitor; stop it with "
                    f"'iotref sandbox stop --data-dir {shell_word(str(data_dir))}'. Use it with "
                    f"{' '.join(shell_word(word) for word in use.env)}, e.g. "
                    f"'{use.command('run')}'."
                )
    if not ok:
        raise SystemExit(1)
