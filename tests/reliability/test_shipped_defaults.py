"""Faults under the shipped defaults: nothing shortened, the device library and ``iotref
run`` exactly as they ship, against the real sandbox (its Mosquitto SIGKILLed or frozen
with SIGSTOP, the whole sandbox down at boot, a certificate revoked, one identity on two
gateways). What arrived is counted from outside: in the platform's store
(``telemetry.db``, read directly) and, for the reconnect times, with an independent TCP
probe of the broker's port. Each test records its figures for docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from iotref.device.connection.state import ConnectionState
from iotref.device.onboarding.environment import Environment
from iotref.device.onboarding.token_store import TokenStore
from iotref.device.telemetry.messages import Asset, AssetType
from iotref.sandbox.broker.supervisor import STABLE_AFTER
from tests.reliability.harness import (
    Platform,
    Sender,
    stored_telemetry,
)
from tests.support.cli_process import revoke, start_iotref
from tests.support.counted_messages import status_message
from tests.support.device_connection import device_settings
from tests.support.device_keys import DeviceFiles
from tests.support.fault_proxy import FaultProxy
from tests.support.figures import record
from tests.support.mqtt_probe import device_topic
from tests.support.onboarding import client_id_of, logged_in, outbox_depth, provision_store
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

KILLS = 3
RECONNECT_MEDIAN_S = 1.0
RECONNECT_MAX_S = 2.5
STOP_BOUND_S = 12.0
"""``iotref run --duration 6 --close-timeout 2`` must have exited within this (wall clock,
from launching the process)."""

# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def onboarding(
    platform: Platform, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Environment, TokenStore]:
    return logged_in(platform.process, tmp_path_factory.mktemp("defaults-home") / "tokens")


@pytest.fixture
def store(onboarding: tuple[Environment, TokenStore], tmp_path: Path) -> Path:
    return provision_store(*onboarding, tmp_path / "store", "Client test press")


class Run:
    """``iotref run`` as a subprocess, its output lines timestamped as they come."""

    def __init__(self, *args: str, stdin: bool = False) -> None:
        self.started = time.monotonic()
        self.proc = start_iotref(
            "run", *args, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL
        )
        self.out: list[tuple[float, str]] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        self.ended: float | None = None

    def _read(self, stream: Any, is_out: bool) -> None:
        for line in stream:
            if is_out:
                self.out.append((time.monotonic(), line.rstrip("\n")))
            else:
                self.err.append(line.rstrip("\n"))

    def feed(self, lines: list[str], rate: float) -> threading.Thread:
        """Write ``lines`` at ``rate`` per second in a thread, then close stdin."""

        def write() -> None:
            assert self.proc.stdin is not None
            began = time.monotonic()
            try:
                for n, line in enumerate(lines, 1):
                    self.proc.stdin.write(line + "\n")
                    self.proc.stdin.flush()
                    ahead = began + n / rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
                self.proc.stdin.close()
            except (BrokenPipeError, ValueError):
                pass

        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        return thread

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        self.ended = time.monotonic()
        for reader in self._readers:
            reader.join(5)
        return code

    @property
    def took(self) -> float:
        assert self.ended is not None
        return self.ended - self.started

    def summary(self) -> str:
        lines = [line for _, line in self.out if line.startswith("Stopped after")]
        assert lines, self.transcript()
        return lines[-1]

    def transcript(self) -> str:
        return "\n".join([line for _, line in self.out][-15:] + self.err[-15:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)


def accepted_of(summary: str) -> int:
    """How many messages ``iotref run``'s summary line says it accepted into the outbox."""
    found = re.search(r"accepted (\d+)", summary)
    assert found, summary
    return int(found.group(1))


def counted_lines(count: int, asset_id: str) -> tuple[list[str], set[str]]:
    """``count`` complete, valid messages as stdin lines, and their ``sendereventuuid``s."""
    asset = Asset(asset_id, f"SN-{asset_id}", AssetType.SHEETFED_PRESS)
    messages = [status_message(asset, i) for i in range(count)]
    return [json.dumps(m) for m in messages], {m["sendereventuuid"] for m in messages}


def wait_stored(platform: Platform, client_id: str, uuids: set[str], timeout: float) -> set[str]:
    """The uuids of ``uuids`` that are in the platform's store (waiting up to ``timeout``
    for all of them)."""
    deadline = time.monotonic() + timeout
    while True:
        stored = stored_telemetry(platform.data_dir, client_id)
        found = uuids & stored.uuids
        if found == uuids or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


class PortProbe:
    """An independent watcher of the broker's port: the first moment after ``since`` at
    which a TCP connection is accepted (polled every 5 ms)."""

    def __init__(self, port: int) -> None:
        self.port = port

    def open_after(self, since: float, timeout: float = 60) -> float:
        deadline = since + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                time.sleep(0.005)
                continue
            return time.monotonic()
        raise AssertionError(f"port {self.port} not open again within {timeout:g} s")


def broker_started_at(platform: Platform) -> float:
    """``time.time()`` at which the running Mosquitto started."""
    return float(platform.process.mosquitto().create_time())


# --------------------------------------------------------------------------- reconnect


def test_broker_sigkill_three_times_the_device_is_back_within_a_second(
    platform: Platform, device: DeviceFiles, tmp_path: Path
) -> None:
    """The device library with its shipped settings streams telemetry; Mosquitto is
    SIGKILLed three times (each time after it had run long enough for the sandbox to
    restart it after its first, short delay). From the moment the broker's port accepts
    connections again (an independent probe) to the device's CONNECTED: median <= 1 s,
    max <= 2.5 s; everything accepted is acknowledged by the broker (the outbox drains).
    How much of it reached the platform's store is recorded, not asserted: nothing keeps
    the device out while the sandbox's ingestion subscribes again (see the next test)."""
    settings = device_settings(platform.info, device)  # everything else as shipped
    sender = Sender(settings, device_topic(device), tmp_path / "outbox.sqlite3", 3, 30.0)
    sender.start()
    probe = PortProbe(platform.process.mqtt_port)
    latencies: list[float] = []
    outages: list[float] = []
    try:
        for _ in range(KILLS):
            stable_at = broker_started_at(platform) + STABLE_AFTER + 1.0
            while time.time() < stable_at:
                _ = sender.connected  # raises if the device failed
                time.sleep(0.2)
            wait_until(lambda: sender.connected, 30, "the device connected before the kill")
            old = platform.process.mosquitto()
            killed = time.monotonic()
            old.send_signal(signal.SIGKILL)
            old.wait(10)
            opened = probe.open_after(killed)
            outages.append(opened - killed)

            def back(since: float = killed) -> bool:
                return any(
                    e.state is ConnectionState.CONNECTED for _, e in sender.events_since(since)
                )

            wait_until(back, 60, "the device to reconnect")
            connected = next(
                t for t, e in sender.events_since(killed) if e.state is ConnectionState.CONNECTED
            )
            latencies.append(max(0.0, connected - opened))
        sender.stop_sending()
        sender.wait_drained(120)
    finally:
        sender.finish()
    accepted = {u for _, _, u in sender.accepted}
    stored = wait_stored(platform, device.client_id, accepted, 30)
    figures = {
        "scenario": "broker SIGKILL x3, shipped defaults (library)",
        "kills": KILLS,
        "broker_down_s": [round(o, 2) for o in outages],
        "reconnect_s": [round(v, 2) for v in latencies],
        "reconnect_median_s": round(statistics.median(latencies), 2),
        "reconnect_max_s": round(max(latencies), 2),
        "fed": len(accepted),
        "stored": len(stored),
        "left_in_outbox": sender.snapshot.outbox_depth,
        "attempts_failed": sender.snapshot.connect_failures,
    }
    record("defaults", figures)
    assert len(latencies) == KILLS, figures
    assert statistics.median(latencies) <= RECONNECT_MEDIAN_S, figures
    assert max(latencies) <= RECONNECT_MAX_S, figures
    assert sender.snapshot.outbox_depth == 0, figures


def test_stdin_run_through_three_broker_kills_ends_with_everything_stored(
    platform: Platform, store: Path
) -> None:
    """3,000 messages fed to ``iotref run --stdin`` at 100/s while Mosquitto is SIGKILLed
    three times (10 s apart: the sandbox restarts it after 0.5, 1 and 2 s): the run ends on
    its own when the input ends, and every message is in the platform's store. The device
    paces itself under the platform's 100 publishes a second, so the input outruns it and
    the outages add to the backlog: at the end of input the run sends on while the
    platform acknowledges (:class:`iotref.cli.run_command.EndOfInputDrain`).

    The device reaches the broker through a TCP door (:class:`FaultProxy`) that keeps it
    out after each kill until the sandbox's ingestion has subscribed again: Mosquitto 2.0
    does not restore the ingestion's shared subscription after a crash, so what a device
    published before that would reach nobody (AWS IoT Core's rules engine never misses a
    message). Everything else is as shipped."""
    lines, uuids = counted_lines(3000, f"stdin-kills-{uuid.uuid4().hex[:6]}")
    proxy = FaultProxy(platform.process.mqtt_port).start()
    properties = store / "properties.json"
    props = json.loads(properties.read_text())
    props["mqtt_port"] = proxy.port
    properties.write_text(json.dumps(props))
    run = Run("--store", str(store), "--stdin", "--status-every", "1", stdin=True)
    feeder = run.feed(lines, 100.0)
    kills = []
    try:
        for at in (5.0, 15.0, 25.0):
            time.sleep(max(0.0, run.started + at - time.monotonic()))
            proxy.refuse()
            platform.process.mosquitto().send_signal(signal.SIGKILL)
            kills.append(round(time.monotonic() - run.started, 1))
            wait_until(lambda: _mosquitto_running(platform), 30, "the sandbox to restart it")
            with contextlib.suppress(AssertionError):  # it may be back already
                wait_until(lambda: not platform.ingestion_subscribed(), 5, "ingestion down")
            platform.wait_ingestion()
            proxy.admit()
        code = run.wait(180)
    finally:
        proxy.close()
    feeder.join(5)
    client_id = client_id_of(store)
    stored = wait_stored(platform, client_id, uuids, 30)
    left = outbox_depth(store)
    figures = {
        "scenario": "iotref run --stdin, 3,000 at 100/s, broker SIGKILL x3",
        "fed": len(uuids),
        "stored": len(stored),
        "left_in_outbox": left,
        "exit_code": code,
        "run_s": round(run.took, 1),
        "kills_at_s": kills,
        "summary": run.summary(),
    }
    record("defaults", figures)
    assert code == 0, run.transcript()
    assert stored == uuids, (figures, run.transcript()[-3000:])
    assert left == 0, figures
    assert "outbox empty" in run.summary(), figures


def _mosquitto_running(platform: Platform) -> bool:
    try:
        return platform.process.mosquitto().status() != psutil.STATUS_ZOMBIE
    except (AssertionError, psutil.NoSuchProcess):
        return False


# --------------------------------------------------------------------------- bounded stops


def _bounded_run(store: Path, lines: list[str], freeze: Any = None) -> tuple[Run, int]:
    """``iotref run --duration 6 --close-timeout 2`` fed ``lines`` at 10/s (stdin kept
    open); ``freeze(run)`` is called right after the launch."""
    run = Run(
        "--store", str(store), "--stdin", "--duration", "6", "--close-timeout", "2",
        "--status-every", "0.5",
        stdin=True,
    )  # fmt: skip
    assert run.proc.stdin is not None

    def write() -> None:
        assert run.proc.stdin is not None
        try:
            for line in lines:
                run.proc.stdin.write(line + "\n")
                run.proc.stdin.flush()
                time.sleep(0.1)
        except (BrokenPipeError, ValueError):
            pass

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    if freeze is not None:
        freeze(run)
    code = run.wait(60)
    with contextlib.suppress(OSError, ValueError):
        assert run.proc.stdin is not None
        run.proc.stdin.close()
    return run, code


@pytest.mark.parametrize("when", ["mid-run", "at-start"])
def test_frozen_broker_stop_is_bounded_and_the_next_run_sends_the_rest(
    platform: Platform, store: Path, when: str
) -> None:
    """Mosquitto frozen (SIGSTOP) during the run or from its start: ``iotref run
    --duration 6 --close-timeout 2`` exits 0 within 12 s, says how many messages it left
    and that the next run sends them; the next run (broker thawed) does."""
    lines, uuids = counted_lines(50, f"frozen-{when}-{uuid.uuid4().hex[:6]}")
    broker = platform.process.mosquitto()

    def freeze(run: Run) -> None:
        if when == "mid-run":
            wait_until(lambda: any("| connected |" in line for _, line in run.out), 30, "connected")
            time.sleep(1.0)
        broker.suspend()

    if when == "at-start":
        broker.suspend()
        run, code = _bounded_run(store, lines)
    else:
        run, code = _bounded_run(store, lines, freeze)
    broker.resume()
    left = outbox_depth(store)
    summary = run.summary()
    # The next run: stdin closed at once, it sends what was left and ends.
    again = Run("--store", str(store), "--stdin", stdin=True)
    again.feed([], 1.0)
    again_code = again.wait(90)
    stored = wait_stored(platform, client_id_of(store), uuids, 30)
    figures = {
        "scenario": f"frozen broker (SIGSTOP) {when}: iotref run --duration 6 --close-timeout 2",
        "took_s": round(run.took, 1),
        "bound_s": STOP_BOUND_S,
        "exit_code": code,
        "left_in_outbox": left,
        "summary": summary,
        "next_run_exit_code": again_code,
        "fed_at_most": len(lines),
        "stored_after_next_run": len(stored),
        "left_after_next_run": outbox_depth(store),
    }
    record("defaults", figures)
    assert code == 0, run.transcript()
    assert run.took <= STOP_BOUND_S, figures
    assert left > 0 and f"{left} left in the outbox: the next run sends them" in summary, figures
    assert again_code == 0, again.transcript()
    sent = accepted_of(summary)
    assert len(stored) >= sent, figures  # everything the first run accepted arrived
    assert outbox_depth(store) == 0, figures
    if when == "at-start":
        assert any("waiting for the platform" in line for _, line in run.out), run.transcript()


def test_revoked_certificate_stop_is_bounded(platform: Platform, store: Path) -> None:
    """The device's certificate revoked while it runs (the broker disconnects it and reads
    the new CRL; every reconnect fails in TLS), then a run started with the revoked
    certificate: each exits 0 within 12 s, the second one saying why it waits."""
    lines, _ = counted_lines(60, f"revoked-{uuid.uuid4().hex[:6]}")
    client_id = client_id_of(store)

    def revoke_once_connected(run: Run) -> None:
        wait_until(lambda: any("| connected |" in line for _, line in run.out), 30, "connected")
        result = revoke(platform.data_dir, client_id)
        assert result.returncode == 0, result.stderr

    first, first_code = _bounded_run(store, lines, revoke_once_connected)
    second, second_code = _bounded_run(store, lines[:10])
    figures = {
        "scenario": "certificate revoked: iotref run --duration 6 --close-timeout 2",
        "took_s": [round(first.took, 1), round(second.took, 1)],
        "bound_s": STOP_BOUND_S,
        "exit_code": [first_code, second_code],
        "summary": [first.summary(), second.summary()],
        "status_of_the_second": next(
            (line for _, line in reversed(second.out) if "waiting for the platform" in line), ""
        ),
    }
    record("defaults", figures)
    assert first_code == 0 and second_code == 0, first.transcript() + second.transcript()
    assert first.took <= STOP_BOUND_S and second.took <= STOP_BOUND_S, figures
    assert "waiting for the platform (" in figures["status_of_the_second"], second.transcript()


# --------------------------------------------------------------------------- offline boot


def test_offline_boot_queues_and_delivers_once_the_platform_is_back(
    platform: Platform, store: Path
) -> None:
    """``iotref run --stdin`` started while the whole sandbox is down keeps running (its
    status says it waits for the platform, and why), accepts everything, and once the
    sandbox is back on the same ports delivers it all to the platform's store."""
    lines, uuids = counted_lines(300, f"offline-{uuid.uuid4().hex[:6]}")
    old = platform.go_down()
    try:
        run = Run("--store", str(store), "--stdin", "--status-every", "0.5", stdin=True)
        feeder = run.feed(lines, 20.0)  # 15 s of input
        time.sleep(6.0)
        assert run.proc.poll() is None, run.transcript()
        waiting = [line for _, line in run.out if "waiting for the platform (" in line]
    finally:
        platform.come_back(old, same_ports=True)
    back_at = time.monotonic()
    code = run.wait(120)
    feeder.join(5)
    connected_at = next(
        (t for t, line in run.out if "| connected |" in line and t >= back_at), None
    )
    stored = wait_stored(platform, client_id_of(store), uuids, 30)
    figures = {
        "scenario": "offline boot: iotref run --stdin with the sandbox down, back after 6 s",
        "fed": len(uuids),
        "stored": len(stored),
        "left_in_outbox": outbox_depth(store),
        "exit_code": code,
        "status_while_down": waiting[-1] if waiting else "",
        "connected_s_after_sandbox_back": (
            round(connected_at - back_at, 1) if connected_at is not None else None
        ),
        "summary": run.summary(),
    }
    record("defaults", figures)
    assert waiting, run.transcript()
    assert code == 0, run.transcript()
    assert stored == uuids, (figures, run.transcript()[-3000:])
    assert figures["left_in_outbox"] == 0, figures


# --------------------------------------------------------------------------- two gateways


def test_one_identity_on_two_gateways_is_detected(
    platform: Platform, store: Path, tmp_path: Path
) -> None:
    """A copied certificate store: two ``iotref run`` take the MQTT session from each
    other (Mosquitto closes the older connection without a reason code). Within a few
    takeovers one of them stops with exit code 1 and a line naming the cause; the other
    then runs undisturbed. Nothing either accepted is lost."""
    copy = tmp_path / "copied-store"
    shutil.copytree(store, copy, ignore=shutil.ignore_patterns("outbox.sqlite3*"))
    first_lines, first_uuids = counted_lines(400, f"twin-a-{uuid.uuid4().hex[:6]}")
    second_lines, second_uuids = counted_lines(400, f"twin-b-{uuid.uuid4().hex[:6]}")
    first = Run("--store", str(store), "--stdin", "--status-every", "1", stdin=True)
    first.feed(first_lines, 10.0)
    wait_until(lambda: any("| connected |" in line for _, line in first.out), 30, "connected")
    second = Run("--store", str(copy), "--stdin", "--status-every", "1", stdin=True)
    second.feed(second_lines, 10.0)
    both_started = time.monotonic()
    deadline = both_started + 90
    while time.monotonic() < deadline and first.proc.poll() is None and second.proc.poll() is None:
        time.sleep(0.1)
    detected_after = time.monotonic() - both_started
    stopped = [r for r in (first, second) if r.proc.poll() is not None]
    # The survivor runs on undisturbed; stop it.
    time.sleep(3.0)
    for r in (first, second):
        r.stop()
    codes = [first.wait(60), second.wait(60)]
    takeovers = sum(
        1
        for r in (first, second)
        for line in r.err
        if "connection lost" in line and "connected -> disconnected" in line
    )
    stored_first = wait_stored(platform, client_id_of(store), first_uuids, 20)
    stored_second = wait_stored(platform, client_id_of(store), second_uuids, 20)
    accepted = {
        "first": accepted_of(first.summary()),
        "second": accepted_of(second.summary()),
    }
    left = {"first": outbox_depth(store), "second": outbox_depth(copy)}
    error_lines = [line for r in (first, second) for line in r.err if line.startswith("iotref:")]
    figures = {
        "scenario": "one identity on two gateways (copied store), two iotref run",
        "detected_after_s": round(detected_after, 1),
        "connections_lost_before": takeovers,
        "exit_codes": codes,
        "error_line": error_lines[0] if error_lines else "",
        "accepted": accepted,
        "stored": {"first": len(stored_first), "second": len(stored_second)},
        "left_in_outbox": left,
    }
    record("defaults", figures)
    assert stopped, f"neither run stopped within 90 s: {figures}"
    assert 1 in codes, figures
    assert any("another process is connected with this machine's identity" in line
               for line in error_lines), figures  # fmt: skip
    # Nothing accepted is lost: delivered, or left in that run's outbox for its next run.
    assert len(stored_first) + left["first"] >= accepted["first"], figures
    assert len(stored_second) + left["second"] >= accepted["second"], figures


@pytest.fixture(autouse=True)
def _thawed(platform: Platform) -> Iterator[None]:
    """Never leave the shared sandbox's broker frozen behind a failed test."""
    yield
    for proc in platform.process.descendants():
        if proc.name() == "mosquitto":
            with contextlib.suppress(psutil.Error):
                proc.resume()
