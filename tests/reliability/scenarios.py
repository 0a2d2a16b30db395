"""The reliability scenarios: a sender streams telemetry for several assets and applies the
operator's desired changes while faults are injected; then what arrived is checked and the
figures are recorded (see :mod:`tests.reliability.harness`).

Faults: through the proxy (latency, throttling, cuts, half-open stalls) and in the sandbox
(Mosquitto SIGKILLed, the whole sandbox restarted on the same ports - the only way to
restart its shadow service - or on new ports, with the proxy pointed at them).

The device's connection has a takeover heuristic (several short-lived connections closed
by the broker within a minute mean another process uses the identity; see
:class:`iotref.device.connection.takeover.TakeoverDetector`). The scenarios space the faults that
drop a connection so that they stay under it; what happens when a network does not is
tested on its own (``test_rapid_resets_are_not_mistaken_for_a_takeover``).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from iotref.device.connection.settings import ConnectionSettings
from iotref.device.connection.state import ConnectionState
from tests.reliability.harness import (
    SIZE,
    SOAK,
    FaultRecord,
    Operator,
    Platform,
    ScenarioResult,
    Sender,
    Size,
    stored_telemetry,
)
from tests.support.device_connection import device_settings
from tests.support.device_keys import DeviceFiles
from tests.support.fault_proxy import FaultProxy
from tests.support.mqtt_probe import device_topic
from tests.support.telemetry_watcher import TelemetryWatcher
from tests.support.waiting import wait_until

KEEPALIVE_S = 3
PING_TIMEOUT_S = 2.0
"""The one shortened setting of these scenarios: keepalive and ping timeout, so that a
half-open stall is noticed within seconds (shipped: 30 s and 10 s). Reconnect backoff and
connect timeout are the shipped ones; test_shipped_defaults.py runs its faults with
nothing shortened at all."""
LATENCY_S = (0.25, 0.25)
"""Latency and jitter of the latency fault (each direction)."""
BANDWIDTH = 12_000
"""Bytes per second of the throttling fault (below the stream's ~40 KB/s)."""

SCENARIOS: dict[str, list[str]] = {
    "network": ["latency", "throttle", "cut", "stall"],
    "broker-kill": ["broker-kill"],
    "shadow-service-restart": ["sandbox-restart-same-ports"],
    "sandbox-restart": ["sandbox-restart-new-ports"],
}
FAULT_DESCRIPTIONS = {
    "latency": f"proxy latency {LATENCY_S[0]:g} s + up to {LATENCY_S[1]:g} s jitter each way",
    "throttle": f"proxy bandwidth {BANDWIDTH // 1000} KB/s each way",
    "cut": "proxy resets the connection (RST both sides)",
    "stall": "proxy stops forwarding without closing (half-open), longer than keepalive + "
    "ping timeout",
    "broker-kill": "Mosquitto SIGKILLed; the sandbox restarts it",
    "sandbox-restart-same-ports": "whole sandbox (shadow service included) stopped and "
    "started on the same data dir and ports",
    "sandbox-restart-new-ports": "whole sandbox stopped and started on the same data dir, "
    "new ports; proxy retargeted",
}


def connection_settings(platform: Platform, device: DeviceFiles, port: int) -> ConnectionSettings:
    """The scenarios' device settings: through the proxy, a quick keepalive (see
    :data:`KEEPALIVE_S`), everything else as shipped."""
    return device_settings(
        platform.info, device, port=port, keepalive_s=KEEPALIVE_S, ping_timeout_s=PING_TIMEOUT_S
    )


class Scenario:
    """One run: set up, :meth:`inject` faults, :meth:`finish` and get the figures."""

    def __init__(
        self, name: str, platform: Platform, device: DeviceFiles, workdir: Path, size: Size
    ) -> None:
        self.name = name
        self.platform = platform
        self.device = device
        self.size = size
        self.proxy = FaultProxy(platform.process.mqtt_port).start()
        self.settings = connection_settings(platform, device, self.proxy.port)
        self.bound_s = self.settings.max_backoff_s + self.settings.connect_timeout_s
        self.watcher = TelemetryWatcher(device_topic(device))
        self.watcher.attach(platform.info)
        self.sender = Sender(
            self.settings, device_topic(device), workdir / "outbox.sqlite3", size.assets, size.rate
        )
        self.operator = Operator(platform, device.client_id, size.operator_interval_s)
        self.faults: list[FaultRecord] = []
        self._dropping_faults: list[float] = []
        self._started = time.monotonic()

    def start(self) -> None:
        self.sender.start()
        self.operator.start()
        time.sleep(1.0)

    def close(self) -> None:
        """Stop everything (also after a failure)."""
        self.operator.stop()
        try:
            self.sender.finish()
        finally:
            self.proxy.close()
            self.watcher.detach()

    # ------------------------------------------------------------------ faults

    def inject(self, kind: str) -> None:
        handler: Callable[[], FaultRecord] = {
            "latency": self._latency,
            "throttle": self._throttle,
            "cut": self._cut,
            "stall": self._stall,
            "broker-kill": self._broker_kill,
            "sandbox-restart-same-ports": lambda: self._sandbox_restart(same_ports=True),
            "sandbox-restart-new-ports": lambda: self._sandbox_restart(same_ports=False),
        }[kind]
        self.faults.append(handler())
        time.sleep(0.5)  # let the stream flow again before the next fault

    def _uptime(self) -> float:
        events = self.sender.events_since(0)
        if events and events[-1][1].state is ConnectionState.CONNECTED:
            return time.monotonic() - events[-1][0]
        return 0.0

    def _before_dropping(self) -> None:
        """Stay under the takeover heuristic: if this drop would be the limit-th drop of
        a young connection within the window, wait until the connection is old enough."""
        s = self.settings
        now = time.monotonic()
        recent = [t for t in self._dropping_faults if now - t < s.takeover_window_s]
        if len(recent) >= max(1, s.takeover_limit - 1):
            wait_until(self.sender_connected, 60, "the connection")
            while self._uptime() < s.takeover_uptime_s + 0.5:
                time.sleep(0.1)
        else:
            wait_until(self.sender_connected, 60, "the connection")
        self._dropping_faults.append(time.monotonic())

    def sender_connected(self) -> bool:
        return self.sender.connected

    def _came_back(self, kind: str, detail: str, fault_at: float, heal_at: float) -> FaultRecord:
        """Wait for the reconnect that follows a fault healed at ``heal_at``."""
        disconnected = any(
            e.state is ConnectionState.DISCONNECTED for _, e in self.sender.events_since(fault_at)
        )
        reconnect: float | None = None
        if disconnected:
            deadline = time.monotonic() + self.bound_s + 20
            while reconnect is None and time.monotonic() < deadline:
                events = self.sender.events_since(fault_at)
                last_down = max(
                    (t for t, e in events if e.state is ConnectionState.DISCONNECTED), default=0
                )
                ups = [
                    t for t, e in events if e.state is ConnectionState.CONNECTED and t >= last_down
                ]
                if ups:
                    reconnect = max(0.0, ups[0] - heal_at)
                else:
                    time.sleep(0.02)
            assert reconnect is not None, f"{kind}: no reconnect within {self.bound_s + 20:g} s"
        return FaultRecord(kind, detail, disconnected, reconnect, self.bound_s)

    def _timed(self, kind: str, apply: Callable[[], None]) -> FaultRecord:
        fault_at = time.monotonic()
        apply()
        time.sleep(self.size.phase_s)
        self.proxy.clear()
        heal_at = time.monotonic()
        return self._came_back(kind, FAULT_DESCRIPTIONS[kind], fault_at, heal_at)

    def _latency(self) -> FaultRecord:
        return self._timed("latency", lambda: self.proxy.set_latency(*LATENCY_S))

    def _throttle(self) -> FaultRecord:
        return self._timed("throttle", lambda: self.proxy.set_bandwidth(BANDWIDTH))

    def _cut(self) -> FaultRecord:
        self._before_dropping()
        at = time.monotonic()
        self.proxy.cut()
        wait_until(
            lambda: any(
                e.state is ConnectionState.DISCONNECTED for _, e in self.sender.events_since(at)
            ),
            10,
            "the device to notice the cut",
        )
        return self._came_back("cut", FAULT_DESCRIPTIONS["cut"], at, at)

    def _stall(self) -> FaultRecord:
        at = time.monotonic()
        self.proxy.stall()
        time.sleep(KEEPALIVE_S + PING_TIMEOUT_S + 1.0)
        self.proxy.resume()
        heal = time.monotonic()
        record = self._came_back("stall", FAULT_DESCRIPTIONS["stall"], at, heal)
        assert record.disconnected, "the device did not notice the half-open connection"
        return record

    def _broker_kill(self) -> FaultRecord:
        self._before_dropping()
        at = time.monotonic()
        self.proxy.refuse()  # the door: the device stays out until the watchers are back
        subscriptions = self.watcher.subscriptions
        self.platform.kill_mosquitto()
        self.watcher.wait_subscribed(subscriptions + 1, 30)
        self.platform.wait_ingestion()
        self.proxy.admit()
        heal = time.monotonic()
        return self._came_back("broker-kill", FAULT_DESCRIPTIONS["broker-kill"], at, heal)

    def _sandbox_restart(self, *, same_ports: bool) -> FaultRecord:
        kind = "sandbox-restart-same-ports" if same_ports else "sandbox-restart-new-ports"
        self._before_dropping()
        at = time.monotonic()
        self.proxy.refuse()
        self.proxy.cut()
        self.watcher.detach()
        self.platform.restart(same_ports=same_ports)
        # A desired change while the device is away: it must pick it up when it is back.
        self.operator.change()
        self.watcher.attach(self.platform.info)
        self.platform.wait_ingestion()
        self.proxy.retarget(self.platform.process.mqtt_port)
        self.proxy.admit()
        heal = time.monotonic()
        return self._came_back(kind, FAULT_DESCRIPTIONS[kind], at, heal)

    # ------------------------------------------------------------------ the end

    def finish(self) -> ScenarioResult:
        """Stop the faults and the stream, wait for everything to arrive, and count."""
        self.operator.stop()
        self.operator.change()  # the final desired state
        converge_started = time.monotonic()
        document: dict[str, Any] = {}

        def converged() -> bool:
            nonlocal document
            document = self.operator.shadow()
            state = document.get("state", {})
            return "delta" not in state and state.get("desired") == state.get("reported")

        try:
            wait_until(converged, 30, "reported == desired")
            final_equal = True
        except AssertionError:
            final_equal = False
        converge_s = time.monotonic() - converge_started
        self.sender.stop_sending()
        self.sender.wait_drained(90)
        accepted = list(self.sender.accepted)
        accepted_uuids = {u for _, _, u in accepted}

        def all_arrived() -> bool:
            return accepted_uuids <= {u for _, _, u in self.watcher.snapshot()}

        with contextlib.suppress(AssertionError):  # what is missing is counted as lost
            wait_until(all_arrived, 30, "every accepted message at the watcher")
        stored = stored_telemetry(self.platform.data_dir, self.device.client_id)
        if stored.available:
            deadline = time.monotonic() + 30
            while not accepted_uuids <= stored.uuids and time.monotonic() < deadline:
                time.sleep(0.2)
                stored = stored_telemetry(self.platform.data_dir, self.device.client_id)
        received = self.watcher.snapshot()
        self.close()
        received_uuids = {u for _, _, u in received}
        reconnects = [f.reconnect_s for f in self.faults if f.reconnect_s is not None]
        return ScenarioResult(
            scenario=self.name,
            size="soak" if SOAK else "short",
            assets=self.size.assets,
            duration_s=round(time.monotonic() - self._started, 1),
            faults=self.faults,
            sent=len(accepted_uuids),
            received=len(received),
            received_distinct=len(received_uuids),
            lost=len(accepted_uuids - received_uuids),
            duplicates_delivered=len(received) - len(received_uuids),
            max_copies=max(Counter(u for _, _, u in received).values(), default=0),
            order_violations=order_violations(received),
            stored_available=stored.available,
            stored=stored.distinct,
            stored_lost=len(accepted_uuids - stored.uuids) if stored.available else -1,
            duplicates_stored=stored.rows - stored.distinct,
            duplicates_dropped_by_platform=stored.duplicates_dropped,
            desired_changes=self.operator.changes,
            final_reported_equals_desired=final_equal,
            converge_s=round(converge_s, 2),
            max_reconnect_s=round(max(reconnects), 2) if reconnects else None,
            backoff_bound_s=self.bound_s,
            sender=asdict(self.sender.snapshot) | {"reported": None},
            proxy=asdict(self.proxy.stats()),
        )


def order_violations(received: list[tuple[str, int | None, str]]) -> int:
    """First deliveries per asset that come after a higher index of the same asset."""
    firsts: dict[str, list[int]] = {}
    seen: set[str] = set()
    for asset, index, uuid in received:
        if uuid in seen or index is None:
            continue
        seen.add(uuid)
        firsts.setdefault(asset, []).append(index)
    return sum(1 for indices in firsts.values() for a, b in itertools.pairwise(indices) if b < a)


def run_scenario(
    name: str, platform: Platform, device: DeviceFiles, workdir: Path, size: Size = SIZE
) -> ScenarioResult:
    """Run scenario ``name`` (a key of :data:`SCENARIOS`) once and return its figures."""
    scenario = Scenario(name, platform, device, workdir, size)
    try:
        scenario.start()
        for _ in range(size.repeats):
            for fault in SCENARIOS[name]:
                scenario.inject(fault)
        return scenario.finish()
    except BaseException:
        with contextlib.suppress(Exception):  # already failing; the first error matters
            scenario.close()
        raise
