"""Independent subscribers: processes that connect with the sandbox's operator identity,
receive every telemetry message of the fleet and count, per device, the unique messages
that arrived and their latency from ``sendertimestamp``. The platform's view of a run,
counted outside the library."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import secrets
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from awscrt import mqtt5

from iotref.device import stdlib_compat
from iotref.device.connection.awscrt_options import build_client_options, build_tls_context
from iotref.device.connection.settings import ConnectionSettings
from iotref.fleet.errors import FleetError
from iotref.fleet.histogram import Histogram
from iotref.fleet.options import SETTLED_AFTER_S
from iotref.fleet.target import SandboxInfo


@dataclass(frozen=True)
class WatcherSpec:
    """How a watcher process connects and what it listens to."""

    endpoint: str
    port: int
    ca_file: str
    cert_file: str
    key_file: str
    client_id: str
    topic_filter: str
    telemetry_prefix: str
    clients: tuple[str, ...]


def _uuid64(text: str) -> int:
    return int(text.replace("-", "")[:16], 16)


class _WatchState:
    """What one watcher saw; updated on awscrt's thread, read on the main thread."""

    def __init__(self, clients: Iterable[str]) -> None:
        self.lock = threading.Lock()
        self.per_client: dict[str, array[int]] = {c: array("Q") for c in clients}
        self.seen: set[int] = set()
        self.latency = Histogram()
        self.steady = Histogram()
        self.steady_from: float | None = None
        self.received = 0
        self.duplicates = 0
        self.foreign = 0
        self.invalid = 0
        self.disconnects = 0
        self.first: float | None = None
        self.last: float | None = None

    def on_publish(self, data: mqtt5.PublishReceivedData) -> None:
        now = time.time()
        packet = data.publish_packet
        client_id = str(packet.topic).rsplit("/", 1)[-1]
        with self.lock:
            self.received += 1
            self.first = self.first if self.first is not None else now
            self.last = now
            ids = self.per_client.get(client_id)
            if ids is None:
                self.foreign += 1
                return
            try:
                message = orjson.loads(packet.payload or b"")
                sent = stdlib_compat.fromisoformat(message["sendertimestamp"]).timestamp()
                key = _uuid64(message["sendereventuuid"])
            except (ValueError, KeyError, TypeError):
                self.invalid += 1
                return
            if key in self.seen:
                self.duplicates += 1
                return
            self.seen.add(key)
            ids.append(key)
            self.latency.record((now - sent) * 1_000_000)
            if self.steady_from is not None and sent >= self.steady_from:
                self.steady.record((now - sent) * 1_000_000)

    def progress(self) -> dict[str, Any]:
        with self.lock:
            return {"received": self.received, "unique": len(self.seen)}

    def result(self) -> dict[str, Any]:
        with self.lock:
            return {
                "received": self.received,
                "duplicates": self.duplicates,
                "foreign": self.foreign,
                "invalid": self.invalid,
                "disconnects": self.disconnects,
                "first": self.first,
                "last": self.last,
                "latency": self.latency.to_json(),
                "steady_latency": self.steady.to_json(),
                "per_client": {c: ids.tobytes() for c, ids in self.per_client.items() if ids},
            }


def watcher_main(pipe: multiprocessing.connection.Connection, spec: WatcherSpec) -> None:
    """Entry point of a watcher process: connect with the operator identity, subscribe
    at QoS 1, answer ``"progress"`` and ``"stop"`` requests on ``pipe``."""
    state = _WatchState(spec.clients)
    try:
        settings = ConnectionSettings(
            endpoint=spec.endpoint,
            port=spec.port,
            client_id=spec.client_id,
            cert_path=Path(spec.cert_file),
            key_path=Path(spec.key_file),
            ca_path=Path(spec.ca_file),
            session_expiry_s=0,
            keepalive_s=30,
        )
        options = build_client_options(settings)
        # Let the broker send without waiting for our PUBACKs: Mosquitto queues at most
        # 1000 messages per client beyond those in flight and drops the rest.
        options.connect_options.receive_maximum = 65535
        options.tls_ctx = build_tls_context(settings)
        connected = threading.Event()
        options.on_publish_callback_fn = state.on_publish
        options.on_lifecycle_event_connection_success_fn = lambda _: connected.set()

        def lost(_: Any) -> None:
            with state.lock:
                state.disconnects += 1

        options.on_lifecycle_event_disconnection_fn = lost
        client = mqtt5.Client(options)
        client.start()
        if not connected.wait(30):
            pipe.send(("error", f"watcher could not connect to {spec.endpoint}:{spec.port}"))
            client.stop()
            return
        packet = mqtt5.SubscribePacket(
            [mqtt5.Subscription(spec.topic_filter, mqtt5.QoS.AT_LEAST_ONCE)]
        )
        suback = client.subscribe(packet).result(30)
        codes = [int(c) for c in (suback.reason_codes or [])]
        if not codes or codes[0] >= 0x80:
            pipe.send(("error", f"watcher subscription refused: {codes}"))
            client.stop()
            return
        pipe.send(("ready", None))
        while True:
            command = pipe.recv()
            if command == "progress":
                pipe.send(("progress", state.progress()))
            elif isinstance(command, tuple) and command[0] == "steady":
                with state.lock:
                    state.steady_from = float(command[1])
            elif command == "stop":
                break
        client.stop()
        pipe.send(("result", state.result()))
    except (EOFError, KeyboardInterrupt):
        return
    except Exception as exc:
        with contextlib.suppress(Exception):
            pipe.send(("error", f"watcher failed: {type(exc).__name__}: {exc}"))


@dataclass
class WatchResult:
    """The watchers' merged view."""

    received: int = 0
    unique: int = 0
    duplicates: int = 0
    foreign: int = 0
    invalid: int = 0
    disconnects: int = 0
    per_client: dict[str, int] = field(default_factory=dict)
    latency: Histogram = field(default_factory=Histogram)
    steady_latency: Histogram = field(default_factory=Histogram)


class Watchers:
    """Independent subscriber processes (the platform's view of what arrived)."""

    def __init__(
        self, sandbox: SandboxInfo, telemetry_prefix: str, clients: Sequence[str], count: int
    ) -> None:
        self.sandbox = sandbox
        self.prefix = telemetry_prefix.rstrip("/")
        self.clients = tuple(clients)
        self.count = max(1, count)
        self._procs: list[tuple[Any, multiprocessing.connection.Connection]] = []
        self._lock = threading.Lock()

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the processes and wait until each has subscribed."""
        ctx = multiprocessing.get_context("spawn")
        run_id = secrets.token_hex(4)
        topic = f"{self.prefix}/#"
        if self.count > 1:
            topic = f"$share/iotref-fleet-{run_id}/{topic}"
        for k in range(self.count):
            parent, child = ctx.Pipe()
            spec = WatcherSpec(
                endpoint=self.sandbox.mqtt_host,
                port=self.sandbox.platform_mqtt_port,
                ca_file=str(self.sandbox.ca_file),
                cert_file=str(self.sandbox.operator_cert),
                key_file=str(self.sandbox.operator_key),
                client_id=f"iotref-fleet-watch-{run_id}-{k}",
                topic_filter=topic,
                telemetry_prefix=self.prefix,
                clients=self.clients,
            )
            proc = ctx.Process(target=watcher_main, args=(child, spec), daemon=True)
            proc.start()
            child.close()
            self._procs.append((proc, parent))
        for _proc, pipe in self._procs:
            if not pipe.poll(timeout_s):
                self.kill()
                raise FleetError("a watcher did not subscribe in time")
            kind, detail = pipe.recv()
            if kind != "ready":
                self.kill()
                raise FleetError(str(detail))

    def mark_steady(self, since: float) -> None:
        """From now on also count messages sent after ``since`` (epoch seconds; every
        device connected) in the steady-state latency."""
        with self._lock:
            for _proc, pipe in self._procs:
                with contextlib.suppress(OSError):
                    pipe.send(("steady", since))

    def progress(self) -> tuple[int, int]:
        """``(received, unique)`` so far."""
        received = unique = 0
        with self._lock:
            for _proc, pipe in self._procs:
                try:
                    pipe.send("progress")
                    if pipe.poll(5):
                        _kind, data = pipe.recv()
                        received += int(data["received"])
                        unique += int(data["unique"])
                except (OSError, EOFError):
                    continue
        return received, unique

    def stop(self) -> WatchResult:
        """Stop the processes and merge what they saw."""
        result = WatchResult()
        seen: dict[str, set[int]] = {}
        with self._lock:
            for proc, pipe in self._procs:
                try:
                    pipe.send("stop")
                    if not pipe.poll(60):
                        continue
                    kind, data = pipe.recv()
                except (OSError, EOFError):
                    continue
                finally:
                    proc.join(10)
                    if proc.is_alive():
                        proc.kill()
                        proc.join(5)
                if kind != "result":
                    continue
                result.received += int(data["received"])
                result.duplicates += int(data["duplicates"])
                result.foreign += int(data["foreign"])
                result.invalid += int(data["invalid"])
                result.disconnects += int(data["disconnects"])
                result.latency.merge(Histogram.from_json(data["latency"]))
                result.steady_latency.merge(Histogram.from_json(data["steady_latency"]))
                for client, raw in data["per_client"].items():
                    ids = array("Q")
                    ids.frombytes(raw)
                    seen.setdefault(client, set()).update(ids)
            self._procs.clear()
        result.per_client = {c: len(ids) for c, ids in seen.items()}
        result.unique = sum(result.per_client.values())
        # Duplicates that went to different watchers are duplicates too.
        with_watchers = result.received - result.foreign - result.invalid
        result.duplicates = max(result.duplicates, with_watchers - result.unique)
        return result

    async def collect(
        self, expected: int, timeout_s: float, on_received: Callable[[int], None] | None = None
    ) -> WatchResult:
        """Wait until the watchers saw ``expected`` unique messages (or their count stopped
        changing, or ``timeout_s`` passed), then stop them and merge what they saw.
        ``on_received`` gets the messages received so far at every look."""
        last = -1
        still = time.monotonic()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            received, unique = await asyncio.to_thread(self.progress)
            if on_received is not None:
                on_received(received)
            if unique >= expected:
                break
            if unique != last:
                last, still = unique, time.monotonic()
            elif time.monotonic() - still > SETTLED_AFTER_S:
                break
            await asyncio.sleep(0.25)
        return await asyncio.to_thread(self.stop)

    def kill(self) -> None:
        for proc, pipe in self._procs:
            with contextlib.suppress(Exception):
                pipe.close()
            if proc.is_alive():
                proc.kill()
            proc.join(5)
        self._procs.clear()
