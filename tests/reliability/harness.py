"""The pieces of the reliability scenarios: a sender streaming telemetry and applying
desired changes, an operator changing desired state through the shadow REST API, the
sandbox that can be restarted on its data dir, the faults, and the figures a run records.
The independent watcher that counts what the platform delivers is
:class:`~tests.support.telemetry_watcher.TelemetryWatcher`.

The sender (:class:`Sender`) runs the device library on its own asyncio loop in a thread:
:class:`~iotref.device.connection.Connection` + :class:`~iotref.device.shadow.sync.ShadowSync`
+ :class:`~iotref.device.telemetry.publisher.Telemetry` over a durable
:class:`~iotref.device.telemetry.outbox.Outbox`, connected through a
:class:`~tests.support.fault_proxy.FaultProxy`. The proxy is also the "door": while the
sandbox side is down, it keeps the device out until the watcher and the sandbox's ingestion
have subscribed again (Mosquitto keeps no messages for a subscriber whose session died
with it, so without the door the watcher could not tell a lost message from a missed one).

Sizes: the short size (``make test``) unless ``IOTREF_SOAK`` is set (``make reliability``).
Each scenario's figures are recorded with :func:`tests.support.figures.record`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from iotref.device.connection.connection import Connection
from iotref.device.connection.settings import ConnectionSettings
from iotref.device.connection.state import ConnectionEvent
from iotref.device.shadow.sync import ShadowSync
from iotref.device.telemetry.messages import Asset, AssetType
from iotref.device.telemetry.outbox import Outbox
from iotref.device.telemetry.permission import ShadowPermission
from iotref.device.telemetry.publisher import Telemetry
from tests.support.counted_messages import status_message
from tests.support.sandbox_process import SandboxProcess

SOAK = os.environ.get("IOTREF_SOAK", "").strip() not in ("", "0")
SANDBOX_ARGS = ["--auto-approve", "--poll-interval", "0"]


@dataclass(frozen=True)
class Size:
    """How big a scenario run is."""

    assets: int
    rate: float
    """Messages per second, over all assets."""
    repeats: int
    """How often each fault is injected."""
    phase_s: float
    """How long a timed fault (latency, throttling) lasts."""
    operator_interval_s: float
    """Pause between the operator's desired changes."""


# Both stay under the platform's 100 publishes a second per connection, which the device
# paces to as shipped (96.9 a second): a faster stream could never drain after a fault.
SHORT = Size(assets=3, rate=60.0, repeats=1, phase_s=2.0, operator_interval_s=0.7)
LONG = Size(assets=6, rate=72.0, repeats=5, phase_s=8.0, operator_interval_s=0.5)
SIZE = LONG if SOAK else SHORT


# --------------------------------------------------------------------------- sandbox


class Platform:
    """One sandbox of the scenarios, restartable on its data dir (same or new ports)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.process = SandboxProcess(data_dir, list(SANDBOX_ARGS)).start()
        self.restarts = 0

    @property
    def info(self) -> dict[str, Any]:
        return self.process.info

    def kill_mosquitto(self) -> None:
        """SIGKILL Mosquitto and wait until the sandbox has started a new one."""
        old = self.process.mosquitto()
        old.send_signal(signal.SIGKILL)
        old.wait(10)
        self.process.wait_mosquitto_restarted(old)

    def restart(self, *, same_ports: bool) -> None:
        """Stop the sandbox (SIGTERM) and start it again on the same data dir."""
        self.come_back(self.go_down(), same_ports=same_ports)

    def go_down(self) -> dict[str, Any]:
        """Stop the whole sandbox (SIGTERM); returns what :meth:`come_back` needs."""
        old = dict(self.process.info)
        code = self.process.stop()
        assert code == 0, f"sandbox exited with {code}:\n{self.process.output()}"
        return old

    def come_back(self, old: dict[str, Any], *, same_ports: bool) -> None:
        """Start the sandbox again on its data dir (and the ports of ``old``)."""
        args = list(SANDBOX_ARGS)
        if same_ports:
            http_port = int(str(old["http_url"]).rsplit(":", 1)[1])
            args += ["--http-port", str(http_port), "--mqtt-port", str(old["mqtt_port"])]
        self.process = SandboxProcess(self.data_dir, args).start()
        self.restarts += 1
        if same_ports:
            assert self.process.mqtt_port == int(old["mqtt_port"])

    def ingestion_subscribed(self) -> bool | None:
        """Whether the sandbox's ingestion is subscribed (``None``: no monitor API)."""
        try:
            answer = httpx.get(
                f"{self.process.http_url}/monitor/api/summary",
                headers=self.process.admin_headers,
                timeout=5,
            )
        except httpx.HTTPError:
            return False
        if answer.status_code == 404:
            return None
        if answer.status_code != 200:
            return False
        return bool(answer.json().get("ingestion", {}).get("subscribed"))

    def wait_ingestion(self, timeout: float = 20) -> None:
        """Until the ingestion has subscribed again (or 3 s, without a monitor API)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.ingestion_subscribed()
            if state is None:
                time.sleep(3)
                return
            if state:
                return
            time.sleep(0.1)
        raise AssertionError("the sandbox's ingestion did not subscribe again")

    def stop(self) -> None:
        self.process.stop()


# --------------------------------------------------------------------------- messages


# --------------------------------------------------------------------------- sender


@dataclass
class SenderSnapshot:
    """What the sender's own counters said at the end."""

    connects: int = 0
    disconnects: int = 0
    connect_failures: int = 0
    published: int = 0
    republished: int = 0
    acked: int = 0
    publish_failures: int = 0
    shadow_syncs: int = 0
    shadow_reports: int = 0
    outbox_depth: int = -1
    reported: dict[str, Any] = field(default_factory=dict)


class Sender:
    """The device under test, on its own loop in a thread (see the module docstring)."""

    def __init__(
        self,
        settings: ConnectionSettings,
        topic: str,
        outbox_path: Path,
        asset_count: int,
        rate: float,
    ) -> None:
        self.settings = settings
        self.topic = topic
        self.outbox_path = outbox_path
        self.assets = [
            Asset(f"press-{n}", f"SN-{n}", AssetType.SHEETFED_PRESS) for n in range(asset_count)
        ]
        self.rate = rate
        self.accepted: list[tuple[str, int, str]] = []
        self.events: list[tuple[float, ConnectionEvent]] = []
        """``(time.monotonic(), event)`` of every connection state change."""
        self.snapshot = SenderSnapshot()
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._stop_sending = threading.Event()
        self._drained = threading.Event()
        self._finish = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)
        self._connected = False

    # ------------------------------------------------------------------ control

    def start(self, timeout: float = 30) -> Sender:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            if self.error is not None or time.monotonic() > deadline:
                self._finish.set()
                raise AssertionError(f"the sender did not start: {self.error!r}")
        return self

    @property
    def connected(self) -> bool:
        """Whether the device is connected; raises if the device failed."""
        if self.error is not None:
            raise AssertionError(f"the sender failed: {self.error!r}") from self.error
        return self._connected

    def stop_sending(self) -> None:
        self._stop_sending.set()

    def wait_drained(self, timeout: float) -> None:
        """Until everything accepted was acknowledged (the outbox is empty)."""
        deadline = time.monotonic() + timeout
        while not self._drained.wait(0.1):
            if self.error is not None:
                raise AssertionError(f"the sender failed: {self.error!r}") from self.error
            if time.monotonic() < deadline:
                continue
            raise AssertionError(
                f"the outbox did not drain in {timeout:g} s ({self.snapshot.outbox_depth} left)"
            )

    def finish(self, timeout: float = 30) -> None:
        """Stop the device; raises what went wrong inside it."""
        self._stop_sending.set()
        self._finish.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the sender did not stop"
        if self.error is not None:
            raise AssertionError(f"the sender failed: {self.error!r}") from self.error

    def accepted_count(self) -> int:
        with self._lock:
            return len(self.accepted)

    def events_since(self, since: float) -> list[tuple[float, ConnectionEvent]]:
        with self._lock:
            return [(t, e) for t, e in self.events if t >= since]

    # ------------------------------------------------------------------ the device

    def _on_event(self, event: ConnectionEvent) -> None:
        with self._lock:
            self.events.append((time.monotonic(), event))
            self._connected = event.state.value == "connected"

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.error = exc

    async def _main(self) -> None:
        with Outbox(self.outbox_path, max_messages=2_000_000) as outbox:
            conn = Connection(self.settings, on_event=self._on_event)
            await conn.start()
            shadow = ShadowSync(conn, self.settings.client_id)
            telemetry: Telemetry | None = None
            try:
                await shadow.start()
                telemetry = Telemetry(conn, outbox, self.topic, permission=ShadowPermission(shadow))
                await telemetry.start()
                self._ready.set()
                await self._stream(telemetry)
                while outbox.depth and not self._finish.is_set():
                    self.snapshot.outbox_depth = outbox.depth
                    await asyncio.sleep(0.05)
                self.snapshot.outbox_depth = outbox.depth
                if outbox.depth == 0:
                    self._drained.set()
                while not self._finish.is_set():  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
                self._take_snapshot(conn, shadow, telemetry, outbox)
            finally:
                if telemetry is not None:
                    await telemetry.close(2)
                await shadow.stop()
                await conn.stop()

    async def _stream(self, telemetry: Telemetry) -> None:
        counters = dict.fromkeys((a.assetid for a in self.assets), 0)
        started = time.monotonic()
        n = 0
        while not self._stop_sending.is_set():
            asset = self.assets[n % len(self.assets)]
            index = counters[asset.assetid]
            message = status_message(asset, index)
            result = await telemetry.send(message)
            assert result.queued, result
            counters[asset.assetid] = index + 1
            with self._lock:
                self.accepted.append((asset.assetid, index, message["sendereventuuid"]))
            n += 1
            ahead = started + n / self.rate - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)

    def _take_snapshot(
        self, conn: Connection, shadow: ShadowSync, telemetry: Telemetry, outbox: Outbox
    ) -> None:
        cs = conn.stats
        ts = telemetry.stats()
        self.snapshot = SenderSnapshot(
            connects=cs.connects,
            disconnects=cs.disconnects,
            connect_failures=cs.failures,
            published=ts.published,
            republished=ts.republished,
            acked=ts.acked,
            publish_failures=ts.failed,
            shadow_syncs=shadow.syncs,
            shadow_reports=shadow.reports,
            outbox_depth=outbox.depth,
            reported=shadow.reported,
        )


# --------------------------------------------------------------------------- operator


class Operator:
    """Changes the device's desired state through the shadow REST API (admin token),
    every ``interval`` seconds while running, retrying while the sandbox is away."""

    def __init__(self, platform: Platform, thing: str, interval: float) -> None:
        self.platform = platform
        self.thing = thing
        self.interval = interval
        self.changes = 0
        self.failed_attempts = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._step = 0

    def change(self, timeout: float = 30) -> None:
        """One desired change (``setpoint``, ``mode``, a nested ``recipe``), retried."""
        self._step += 1
        k = self._step
        desired = {
            "setpoint": k,
            "mode": ("run", "idle", "setup")[k % 3],
            "recipe": {"ink": f"ink-{k % 5}", "sheets": 100 + k},
        }
        deadline = time.monotonic() + timeout
        while True:
            try:
                answer = httpx.post(
                    f"{self.platform.process.http_url}/things/{self.thing}/shadow",
                    json={"state": {"desired": desired}},
                    headers=self.platform.process.admin_headers,
                    timeout=5,
                )
                if answer.status_code == 200:
                    self.changes += 1
                    return
            except (httpx.HTTPError, KeyError):
                pass
            self.failed_attempts += 1
            if time.monotonic() > deadline:
                raise AssertionError("the operator could not change the desired state")
            time.sleep(0.2)

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.interval):
                with contextlib.suppress(AssertionError):
                    self.change(timeout=5)

        self._thread = threading.Thread(target=loop, name="operator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)

    def shadow(self) -> dict[str, Any]:
        answer = httpx.get(
            f"{self.platform.process.http_url}/things/{self.thing}/shadow",
            headers=self.platform.process.admin_headers,
            timeout=5,
        )
        assert answer.status_code == 200, answer.text
        document: dict[str, Any] = answer.json()
        return document


# --------------------------------------------------------------------------- platform store


@dataclass
class Stored:
    """What the sandbox's ingestion stored for one device (``telemetry.db``)."""

    available: bool
    rows: int = 0
    distinct: int = 0
    duplicates_dropped: int = 0
    uuids: frozenset[str] = frozenset()


def stored_telemetry(data_dir: Path, client_id: str) -> Stored:
    """Read ``DATA_DIR/telemetry.db`` (read-only); ``available=False`` if it is not there."""
    path = data_dir / "telemetry.db"
    if not path.exists():
        return Stored(False)
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return Stored(False)
    try:
        uuids = [
            str(row[0])
            for row in db.execute(
                "SELECT sendereventuuid FROM telemetry_messages WHERE client_id = ?", (client_id,)
            )
        ]
        dropped = 0
        with contextlib.suppress(sqlite3.Error):
            row = db.execute(
                "SELECT duplicates FROM telemetry_devices WHERE client_id = ?", (client_id,)
            ).fetchone()
            dropped = int(row[0]) if row else 0
    except sqlite3.Error:
        return Stored(False)
    finally:
        db.close()
    return Stored(True, len(uuids), len(set(uuids)), dropped, frozenset(uuids))


# --------------------------------------------------------------------------- figures


@dataclass
class FaultRecord:
    """One injected fault and how the device came back."""

    kind: str
    detail: str
    disconnected: bool
    reconnect_s: float | None
    """From the moment the fault was healed to the next CONNECTED."""
    bound_s: float


@dataclass
class ScenarioResult:
    """The figures of one scenario run."""

    scenario: str
    size: str
    assets: int
    duration_s: float
    faults: list[FaultRecord]
    sent: int
    """Messages accepted by ``Telemetry.send`` (distinct)."""
    received: int
    """Deliveries to the independent watcher, duplicates included."""
    received_distinct: int
    lost: int
    duplicates_delivered: int
    max_copies: int
    """The most deliveries of one message."""
    order_violations: int
    stored_available: bool
    stored: int
    stored_lost: int
    duplicates_stored: int
    duplicates_dropped_by_platform: int
    desired_changes: int
    final_reported_equals_desired: bool
    converge_s: float
    max_reconnect_s: float | None
    backoff_bound_s: float
    sender: dict[str, Any]
    proxy: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
