"""Telemetry delivery against the real sandbox: an independent subscriber (paho, with the
sandbox operator's identity) counts what arrives while the sender publishes through the
durable outbox.

- Mosquitto SIGKILLed (and restarted by the sandbox) midway: all arrive, first deliveries
  in order; as shipped (publishes paced under the platform's 100 a second: 1,500 messages
  fed at 80 a second), and with pacing off (10,000 fed at 2,500 a second, up to 1,000 in
  flight when the broker dies), as on a platform without that quota.
- The sender process SIGKILLed mid-stream and started again on the same outbox: none lost
  (1,500 messages, as shipped).
- ``sendTelemetryData`` set false through the shadow REST API: nothing more arrives; true:
  publishing resumes as the policy (hold / drop) says.
- Outbox full: ``reject_new`` and ``drop_oldest`` apply and are reported.

The sender of the first two runs as a subprocess (``python -m
tests.integration.test_telemetry_delivery ...``, see :func:`sender_main`). It reaches the
broker through a small TCP relay that the test can close: while the broker restarts, the
relay keeps the sender out until the subscriber has subscribed again, because Mosquitto
does not keep messages for a subscriber whose session died with it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from iotref.device.connection.connection import Connection
from iotref.device.connection.settings import ConnectionSettings
from iotref.device.shadow.sync import ShadowSync
from iotref.device.telemetry.messages import (
    Asset,
    AssetType,
)
from iotref.device.telemetry.outbox import Outbox
from iotref.device.telemetry.outbox_errors import OutboxFull
from iotref.device.telemetry.permission import PermissionFlag, ShadowPermission
from iotref.device.telemetry.publisher import Telemetry
from iotref.device.telemetry.results import SendStatus
from tests.support.counted_messages import status_message
from tests.support.device_connection import UNPACED, device_settings
from tests.support.device_keys import DeviceFiles
from tests.support.mqtt_probe import device_topic
from tests.support.sandbox_process import SandboxProcess
from tests.support.shadow_rest import set_permission
from tests.support.telemetry_watcher import TelemetryWatcher
from tests.support.waiting import wait_until, wait_until_async

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def delivery_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxProcess]:
    """A sandbox of this module's own: its broker gets killed here."""
    args = ["--auto-approve", "--poll-interval", "0"]
    with SandboxProcess(tmp_path_factory.mktemp("delivery-sandbox"), args).start() as proc:
        yield proc


@pytest.fixture
def device(delivery_sandbox: SandboxProcess, tmp_path: Path) -> DeviceFiles:
    from tests.support.tokens import provision_device

    return provision_device(delivery_sandbox, directory=tmp_path / "device")


# --------------------------------------------------------------------------- subscriber


@pytest.fixture
def collector(delivery_sandbox: SandboxProcess) -> Iterator[TelemetryWatcher]:
    """Every device's telemetry, counted on the device listener."""
    with TelemetryWatcher().attach(delivery_sandbox.info, listener="device") as watcher:
        yield watcher


def first_deliveries(indices: list[int]) -> list[int]:
    seen: set[int] = set()
    out = []
    for i in indices:
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


def assert_complete_and_ordered(got: list[int], expected: range) -> None:
    firsts = first_deliveries(got)
    assert set(firsts) >= set(expected), "messages lost"
    out_of_order = [(a, b) for a, b in itertools.pairwise(firsts) if b < a]
    assert not out_of_order, f"first deliveries out of order: {out_of_order[:10]}"


# --------------------------------------------------------------------------- the relay


class Relay:
    """A TCP relay to the broker in a thread. ``close_door()`` refuses new connections
    (existing ones go on until either side closes); ``open_door()`` lets them in again."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.open = True
        self._stop = False
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.listener, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def close_door(self) -> None:
        self.open = False

    def open_door(self) -> None:
        self.open = True

    def _run(self) -> None:
        while not self._stop:
            for key, _ in self._sel.select(0.1):
                if key.data is None:
                    self._accept()
                else:
                    self._pump(key.fileobj, key.data)  # type: ignore[arg-type]

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except BlockingIOError:
            return
        if not self.open:
            client.close()
            return
        try:
            upstream = socket.create_connection(self.target, timeout=2)
        except OSError:
            client.close()
            return
        for s in (client, upstream):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sel.register(client, selectors.EVENT_READ, upstream)
        self._sel.register(upstream, selectors.EVENT_READ, client)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            data = src.recv(65536)
            if data:
                dst.setblocking(True)
                dst.sendall(data)
                dst.setblocking(False)
                return
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(s)
            s.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        for key in list(self._sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._sel.close()


# --------------------------------------------------------------------------- sender process


def sender_main(argv: list[str]) -> int:
    """The sender: connect, send ``--count`` messages from ``--start`` at ``--rate`` per
    second, print ``accepted N`` after each accepted one, wait until the outbox is empty,
    print ``drained`` and exit."""
    p = argparse.ArgumentParser()
    for name in ("host", "ca", "cert", "key", "client-id", "topic", "outbox", "asset"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--rate", type=float, default=0)
    p.add_argument("--unpaced", action="store_true", help="publishes not paced to the quota")
    args = p.parse_args(argv)
    unpaced = UNPACED if args.unpaced else {}

    async def run() -> None:
        settings = ConnectionSettings(
            endpoint=args.host,
            port=args.port,
            client_id=args.client_id,
            cert_path=Path(args.cert),
            key_path=Path(args.key),
            ca_path=Path(args.ca),
            min_backoff_s=0.1,
            max_backoff_s=1.0,
            **unpaced,
        )
        asset = Asset(args.asset, "SN-" + args.asset, AssetType.SHEETFED_PRESS)
        out = sys.stdout
        with Outbox(args.outbox, max_messages=200_000) as outbox:
            async with Connection(settings) as conn:
                tel = Telemetry(conn, outbox, args.topic)
                await tel.start()
                started = time.monotonic()
                for n, i in enumerate(range(args.start, args.start + args.count)):
                    if args.rate and n % 50 == 0:
                        ahead = started + n / args.rate - time.monotonic()
                        if ahead > 0:
                            await asyncio.sleep(ahead)
                    result = await tel.send(status_message(asset, i))
                    assert result.status is SendStatus.QUEUED
                    out.write(f"accepted {i}\n")
                    out.flush()
                while outbox.depth:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
                stats = tel.stats()
                await tel.close()
                connects = conn.stats.connects
                out.write(
                    f"drained connects={connects} republished={stats.republished}"
                    f" failed={stats.failed}\n"
                )
                out.flush()

    asyncio.run(run())
    return 0


class SenderProcess:
    def __init__(
        self,
        info: dict[str, Any],
        dev: DeviceFiles,
        outbox: Path,
        asset: str,
        *,
        port: int,
        start: int,
        count: int,
        rate: float,
        paced: bool = True,
    ) -> None:
        cmd = [
            sys.executable, "-m", "tests.integration.test_telemetry_delivery",
            "--host", info["mqtt_host"], "--port", str(port), "--ca", info["ca_file"],
            "--cert", str(dev.cert_path), "--key", str(dev.key_path),
            "--client-id", dev.client_id, "--topic", device_topic(dev),
            "--outbox", str(outbox), "--asset", asset,
            "--start", str(start), "--count", str(count), "--rate", str(rate),
        ]  # fmt: skip
        if not paced:
            cmd.append("--unpaced")
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.accepted: list[int] = []
        self.drained: str | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("accepted "):
                self.accepted.append(int(line.split()[1]))
            elif line.startswith("drained"):
                self.drained = line.strip()

    def wait_accepted(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.accepted) < n:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"sender: {len(self.accepted)} accepted; {self.stderr()}")
            time.sleep(0.01)

    def wait_done(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"sender did not finish in {timeout}s") from None
        self._reader.join(5)
        assert self.proc.returncode == 0, self.stderr()
        assert self.drained, "sender exited without draining"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._reader.join(5)

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read()[-3000:]


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    ("paced", "total", "rate", "kill_after"),
    [(True, 1500, 80.0, 400), (False, 10_000, 2500.0, 3000)],
    ids=["as-shipped-paced", "pacing-off"],
)
def test_broker_killed_midway_every_message_arrives_in_order(
    delivery_sandbox: SandboxProcess,
    device: DeviceFiles,
    collector: TelemetryWatcher,
    tmp_path: Path,
    paced: bool,
    total: int,
    rate: float,
    kill_after: int,
) -> None:
    info = delivery_sandbox.info
    asset = f"press-broker-kill-{'paced' if paced else 'unpaced'}"
    relay = Relay(delivery_sandbox.mqtt_port)
    sender = SenderProcess(
        info, device, tmp_path / "outbox.sqlite3", asset,
        port=relay.port, start=0, count=total, rate=rate, paced=paced,
    )  # fmt: skip
    try:
        wait_until(
            lambda: len(collector.indices(asset)) >= kill_after,
            60,
            f"{kill_after} arrivals",
        )
        old = delivery_sandbox.mosquitto()
        relay.close_door()
        old.send_signal(signal.SIGKILL)
        old.wait(10)
        at_kill = len(sender.accepted)
        delivery_sandbox.wait_mosquitto_restarted(old)
        collector.wait_subscribed(2)
        relay.open_door()
        sender.wait_done(120)
        got = collector.wait_for(asset, set(range(total)), 30)
    finally:
        sender.kill()
        relay.close()
    assert kill_after <= at_kill < total, "the broker was not killed midway"
    assert_complete_and_ordered(got, range(total))
    # The sender saw the outage and reconnected (what was in flight then was re-published).
    assert sender.drained is not None and "connects=1 " not in sender.drained, sender.drained
    print(f"broker killed at {at_kill} accepted; {sender.drained}; {len(got)} deliveries")


def test_sender_killed_midway_loses_nothing(
    delivery_sandbox: SandboxProcess,
    device: DeviceFiles,
    collector: TelemetryWatcher,
    tmp_path: Path,
) -> None:
    total = 1500
    info = delivery_sandbox.info
    outbox = tmp_path / "outbox.sqlite3"
    first = SenderProcess(
        info, device, outbox, "press-sender-kill",
        port=delivery_sandbox.mqtt_port, start=0, count=total, rate=2000,
    )  # fmt: skip
    try:
        first.wait_accepted(600)
        first.kill()
    finally:
        first.kill()
    accepted = max(first.accepted)
    assert accepted < total - 1
    second = SenderProcess(
        info, device, outbox, "press-sender-kill",
        port=delivery_sandbox.mqtt_port, start=accepted + 1, count=total - accepted - 1, rate=0,
    )  # fmt: skip
    try:
        second.wait_done(120)
    finally:
        second.kill()
    got = collector.wait_for("press-sender-kill", set(range(total)), 30)
    assert_complete_and_ordered(got, range(total))


def test_shadow_permission_gates_publishing_hold_and_drop(
    delivery_sandbox: SandboxProcess,
    device: DeviceFiles,
    collector: TelemetryWatcher,
    tmp_path: Path,
) -> None:
    thing = device.client_id

    async def main() -> None:
        hold_asset = Asset("press-hold", "SN-H", AssetType.SHEETFED_PRESS)
        drop_asset = Asset("press-drop", "SN-D", AssetType.SHEETFED_PRESS)
        async with (
            Connection(device_settings(delivery_sandbox.info, device)) as conn,
            ShadowSync(conn, thing) as shadow,
        ):
            assert shadow.send_telemetry_allowed is True  # set by provisioning
            with Outbox(tmp_path / "hold.sqlite3") as outbox:
                tel = Telemetry(
                    conn, outbox, device_topic(device), permission=ShadowPermission(shadow)
                )
                for i in range(100):
                    assert (await tel.send(status_message(hold_asset, i))).queued
                await wait_until_async(
                    lambda: len(collector.indices("press-hold")) >= 100, 20, "100"
                )

                set_permission(delivery_sandbox, thing, False)
                await wait_until_async(lambda: not tel.permission, 10, "permission withdrawn")
                for i in range(100, 200):
                    result = await tel.send(status_message(hold_asset, i))
                    assert result.status is SendStatus.QUEUED  # hold: kept in the outbox
                await asyncio.sleep(1.5)
                assert max(collector.indices("press-hold")) < 100, "published without permission"
                assert outbox.depth == 100
                assert tel.stats().permission is False

                set_permission(delivery_sandbox, thing, True)
                await wait_until_async(lambda: outbox.depth == 0, 20, "the held messages")
                got = collector.wait_for("press-hold", set(range(200)), 10)
                assert_complete_and_ordered(got, range(200))
                await tel.close()

            with Outbox(tmp_path / "drop.sqlite3") as outbox:
                tel = Telemetry(
                    conn,
                    outbox,
                    device_topic(device),
                    permission=ShadowPermission(shadow),
                    policy="drop",
                )
                set_permission(delivery_sandbox, thing, False)
                await wait_until_async(lambda: not tel.permission, 10, "permission withdrawn")
                dropped = [await tel.send(status_message(drop_asset, i)) for i in range(50)]
                assert {r.status for r in dropped} == {SendStatus.DROPPED_NO_PERMISSION}
                assert outbox.depth == 0 and tel.stats().dropped_no_permission == 50
                set_permission(delivery_sandbox, thing, True)
                await wait_until_async(lambda: tel.permission, 10, "permission granted")
                for i in range(50, 100):
                    assert (await tel.send(status_message(drop_asset, i))).queued
                await wait_until_async(lambda: outbox.depth == 0, 20, "the new messages")
                got = collector.wait_for("press-drop", set(range(50, 100)), 10)
                await asyncio.sleep(0.3)
                assert set(collector.indices("press-drop")) == set(range(50, 100))
                assert_complete_and_ordered(got, range(50, 100))
                await tel.close()

    asyncio.run(main())


def test_outbox_full_policies_apply_and_are_reported(
    delivery_sandbox: SandboxProcess,
    device: DeviceFiles,
    collector: TelemetryWatcher,
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with Connection(device_settings(delivery_sandbox.info, device)) as conn:
            asset = Asset("press-full-reject", "SN-R", AssetType.SHEETFED_PRESS)
            flag = PermissionFlag(False)  # nothing drains while we fill the outbox
            with Outbox(tmp_path / "reject.sqlite3", max_messages=50) as outbox:
                tel = Telemetry(conn, outbox, device_topic(device), permission=flag)
                refused = 0
                for i in range(60):
                    try:
                        await tel.send(status_message(asset, i))
                    except OutboxFull:
                        refused += 1
                stats = tel.stats()
                assert refused == 10 and stats.rejected_full == 10 and stats.depth == 50
                flag.set(True)
                await wait_until_async(lambda: outbox.depth == 0, 20, "drained")
                got = collector.wait_for("press-full-reject", set(range(50)), 10)
                assert set(got) == set(range(50))
                await tel.close()

            asset = Asset("press-full-drop", "SN-D", AssetType.SHEETFED_PRESS)
            flag = PermissionFlag(False)
            with Outbox(
                tmp_path / "drop.sqlite3", max_messages=50, overflow="drop_oldest"
            ) as outbox:
                tel = Telemetry(conn, outbox, device_topic(device), permission=flag)
                results = [await tel.send(status_message(asset, i)) for i in range(60)]
                assert sum(r.evicted for r in results) == 10
                stats = tel.stats()
                assert stats.dropped_overflow == 10 and stats.depth == 50
                flag.set(True)
                await wait_until_async(lambda: outbox.depth == 0, 20, "drained")
                got = collector.wait_for("press-full-drop", set(range(10, 60)), 10)
                await asyncio.sleep(0.3)
                assert set(collector.indices("press-full-drop")) == set(range(10, 60))
                assert_complete_and_ordered(got, range(10, 60))
                await tel.close()

    asyncio.run(main())


if __name__ == "__main__":
    sys.exit(sender_main(sys.argv[1:]))
