"""One fleet run (or one shard of it): check the limits, provision, connect every device,
sync its shadow, send at the planned rate, drain, count what arrived from outside, and
report (:class:`FleetRun`). How a run goes and what it measures: docs/fleet.md."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import random
import resource
import threading
import time
from collections import Counter
from typing import Any, Final

from iotref.device.connection.errors import ConnectionFailed, MqttError
from iotref.device.connection.rate_limit import ConnectGate
from iotref.device.errors import IotrefError
from iotref.device.onboarding.environment import Environment
from iotref.device.shadow.errors import ShadowError
from iotref.device.telemetry.seams import MessageValidatorLike
from iotref.fleet.device import FleetDevice
from iotref.fleet.histogram import Histogram
from iotref.fleet.memory import (
    malloc_tuning,
    memory_map_count,
    peak_rss_mb,
    rss_mb,
    trim_malloc,
    tune_malloc,
)
from iotref.fleet.memory_outbox import OutboxTotals
from iotref.fleet.monitor import monitor_counts, monitor_delta
from iotref.fleet.options import FleetOptions
from iotref.fleet.os_limits import Limits, check_limits
from iotref.fleet.progress import FleetProgress
from iotref.fleet.provisioning import provision_fleet
from iotref.fleet.reports import REPORT_FORMAT, FleetReport
from iotref.fleet.scheduler import SendScheduler
from iotref.fleet.stores import FleetDeviceIdentity, FleetStores
from iotref.fleet.target import SandboxInfo
from iotref.fleet.tls_contexts import build_tls_contexts
from iotref.fleet.watchers import Watchers, WatchResult

STOP_WORKER_THREADS: Final = 32
"""Threads for ``Connection.stop()``, which waits for awscrt on a thread."""
STOP_CONCURRENCY: Final = 2 * STOP_WORKER_THREADS
"""Devices stopping at the same time: more than the threads would only queue."""


class FleetRun:
    """One fleet run (or one shard of it). ``await FleetRun(env, options).run()``."""

    def __init__(
        self,
        env: Environment,
        options: FleetOptions,
        *,
        sandbox: SandboxInfo | None = None,
        validator: MessageValidatorLike | None = None,
    ) -> None:
        self.env = env
        self.options = options
        self.sandbox = sandbox
        self.stores = FleetStores(options.store_root, env)
        if validator is None:
            from iotref.protocol.message_schemas import default_validator

            validator = default_validator()
        self.validator = validator
        self.outbox_totals = OutboxTotals()
        # One gate for every device's attempts: the run's share of the account's quota.
        self.connect_gate = ConnectGate(options.connect_rate) if options.connect_rate else None
        self.errors: Counter[str] = Counter()
        self.devices: list[FleetDevice] = []
        self.indices = options.shard.indices(options.devices)
        self.phase = "starting"
        self.provisioned = 0
        self.connected_now = 0
        self.synced = 0
        self.failed = 0
        self.connect_hist = Histogram()
        self.sync_hist = Histogram()
        self._started = time.monotonic()
        self._rate_mark = (time.monotonic(), 0)
        self._rate = 0.0
        self.watchers: Watchers | None = None
        self.platform_received: int | None = None
        self.limits: Limits | None = None
        self.scheduler = SendScheduler(
            options.rate, options.messages_per_device, random.Random(options.seed), self.error
        )
        self._tasks: set[asyncio.Future[None]] = set()
        self.cpu_by_phase: dict[str, float] = {}
        self.main_cpu_by_phase: dict[str, float] = {}
        self._phase_mark: tuple[str, float, float] | None = None
        self.memory_maps: int | None = None
        self.trimmed_mb: dict[str, float] = {}

    # ------------------------------------------------------------------ observing

    def _enter(self, phase: str) -> None:
        """Switch to ``phase``, booking this process's CPU time so far to the last one."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = usage.ru_utime + usage.ru_stime
        main = time.thread_time()
        if self._phase_mark is not None:
            name, mark, main_mark = self._phase_mark
            self.cpu_by_phase[name] = round(self.cpu_by_phase.get(name, 0.0) + cpu - mark, 3)
            self.main_cpu_by_phase[name] = round(
                self.main_cpu_by_phase.get(name, 0.0) + main - main_mark, 3
            )
        self._phase_mark = (phase, cpu, main)
        self.phase = phase

    def _trim(self, when: str) -> None:
        """With ``tune_malloc``: return the memory a phase left free to the system."""
        if self.options.tune_malloc:
            released = trim_malloc()
            if released is not None:
                self.trimmed_mb[when] = released

    @property
    def generated(self) -> int:
        """Messages sent so far."""
        return self.scheduler.sent

    def error(self, kind: str) -> None:
        """Count one error (or noteworthy event) of ``kind``."""
        self.errors[kind] += 1

    def progress(self) -> FleetProgress:
        """A snapshot for the live display (cheap: counters only)."""
        now = time.monotonic()
        mark_t, mark_n = self._rate_mark
        if now - mark_t >= 1.0:
            self._rate = (self.generated - mark_n) / (now - mark_t)
            self._rate_mark = (now, self.generated)
        totals = self.outbox_totals
        return FleetProgress(
            phase=self.phase,
            devices=len(self.indices),
            provisioned=self.provisioned,
            connected=self.connected_now,
            synced=self.synced,
            failed=self.failed,
            generated=self.generated,
            acked=totals.acked,
            outbox_depth=totals.depth,
            platform_received=self.platform_received,
            msgs_per_s=self._rate,
            errors=sum(self.errors.values())
            - self.errors.get("connect_attempt_failed", 0)
            - self.errors.get("reconnected", 0),
            elapsed_s=now - self._started,
            rss_mb=rss_mb(),
        )

    async def poll_platform(self) -> None:
        """Ask the watchers how much arrived (for the live display)."""
        if self.watchers is not None:
            received, _unique = await asyncio.to_thread(self.watchers.progress)
            self.platform_received = received

    # ------------------------------------------------------------------ phases

    async def run(self) -> FleetReport:
        """Provision, connect, sync, send, drain, measure; return the report."""
        opts = self.options
        loop = asyncio.get_running_loop()
        # Connection.stop() waits for awscrt in a thread: give the fleet enough of them.
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(STOP_WORKER_THREADS))
        self.limits = check_limits(len(self.indices), opts.devices, self.sandbox)
        if opts.tune_malloc:
            tune_malloc()
        started_at = time.time()

        self._enter("provisioning")
        t0 = time.monotonic()
        identities, reused, path = await self._provision()
        provision_s = time.monotonic() - t0
        self._trim("after provisioning")
        self.devices = [FleetDevice(identity, self) for identity in identities]
        clients = [d.client_id for d in self.devices]
        prefix = (
            identities[0].properties.telemetry_topic if identities else "connectprint/telemetry"
        )

        baseline: dict[str, int] | None = None
        if self.sandbox is not None:
            baseline = await monitor_counts(self.sandbox, set(clients))
            if opts.watchers > 0:
                self._enter("starting watchers")
                self.watchers = Watchers(self.sandbox, prefix, clients, opts.watchers)
                await asyncio.to_thread(self.watchers.start)
        try:
            report = await self._simulate(started_at, provision_s, reused, path, baseline)
        finally:
            if self.watchers is not None:
                self.watchers.kill()
        return report

    async def _provision(self) -> tuple[list[FleetDeviceIdentity], int, str]:
        def done(n: int) -> None:
            self.provisioned += n

        return await provision_fleet(
            self.env,
            self.stores,
            self.indices,
            sandbox=self.sandbox,
            bulk=self.options.bulk,
            site=self.options.site,
            on_done=done,
        )

    async def _connect_all(self) -> float:
        """Connect every device, ``connect_concurrency`` handshakes at a time; return the
        seconds until the last one connected (or gave up).

        ``connect_concurrency`` workers take the devices one after another, in order: no
        waiting task per device, whose thousands of coroutines and futures would be freed
        only as the ramp goes on, scattered between the devices' long-lived objects."""
        opts = self.options
        start = time.monotonic()
        last = start
        self._enter("building TLS contexts")
        stop = threading.Event()
        try:
            await asyncio.to_thread(build_tls_contexts, self.devices, stop)
        finally:
            stop.set()
        self._enter("connecting")
        devices = iter(self.devices)

        async def worker() -> None:
            nonlocal last
            for device in devices:
                try:
                    await device.connect()
                except ConnectionFailed as exc:
                    self.failed += 1
                    device.failed = f"connect_failed_{exc.kind}"
                    self.error(device.failed)
                    continue
                except (MqttError, ShadowError, IotrefError) as exc:
                    self.failed += 1
                    device.failed = f"connect_{type(exc).__name__}"
                    self.error(device.failed)
                    continue
                assert device.connect_started is not None and device.connected_at is not None
                self.connect_hist.record((device.connected_at - device.connect_started) * 1e6)
                last = max(last, device.connected_at)
                self._spawn_sync(device)

        workers = min(opts.connect_concurrency, len(self.devices))
        await asyncio.gather(*(worker() for _ in range(workers)))
        return last - start

    def _spawn_sync(self, device: FleetDevice) -> None:
        async def sync() -> None:
            try:
                await device.wait_synced(self.options.sync_timeout_s)
            except TimeoutError:
                self.error("shadow_sync_timeout")
                return
            except ShadowError as exc:
                self.error(f"shadow_sync_{type(exc).__name__}")
                return
            assert device.synced_at is not None and device.connected_at is not None
            self.sync_hist.record((device.synced_at - device.connected_at) * 1e6)
            self.synced += 1
            self.scheduler.add(device)

        task = asyncio.ensure_future(sync())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _simulate(
        self,
        started_at: float,
        provision_s: float,
        reused: int,
        provision_path: str,
        baseline: dict[str, int] | None,
    ) -> FleetReport:
        scheduler = asyncio.ensure_future(self.scheduler.run())
        try:
            self._enter("connecting")
            self._started = time.monotonic()
            all_connected_s = await self._connect_all()
            if self.watchers is not None:
                await asyncio.to_thread(self.watchers.mark_steady, time.time())
            self._enter("syncing and sending")
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            self._trim("after connecting")
            self.scheduler.close()
            self._enter("sending")
            send_started = time.monotonic()
            await scheduler
            send_window = time.monotonic() - self._first_send_time(send_started)
            self._enter("draining")
            drained = await self._drain()
            self._enter("collecting")
            watch = None
            if self.watchers is not None:
                watch = await self._collect_watchers()
        finally:
            scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await scheduler
            self.memory_maps = memory_map_count()
            self._enter("stopping")
            await self._stop_all()
        # The monitor's counts after stopping: every message was acknowledged before
        # (drained), and its summary is one JSON document about every device the sandbox
        # knows (~1.2 kB each, tens of MB parsed), better read once the fleet's memory is free.
        monitor = None
        if baseline is not None and self.sandbox is not None:
            self._enter("counting")
            monitor = await self._monitor_delta(baseline)
        self._enter("done")
        return self._report(
            started_at=started_at,
            provision_s=provision_s,
            reused=reused,
            provision_path=provision_path,
            all_connected_s=all_connected_s,
            send_window=send_window,
            drained=drained,
            watch=watch,
            monitor=monitor,
        )

    def _first_send_time(self, fallback: float) -> float:
        synced = [d.synced_at for d in self.devices if d.synced_at is not None]
        return min(synced) if synced else fallback

    async def _drain(self) -> bool:
        """Wait until every queued message was acknowledged (or the drain timeout)."""
        deadline = time.monotonic() + self.options.drain_timeout_s
        while self.outbox_totals.depth > 0 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        if self.outbox_totals.depth > 0:
            self.error("not_acknowledged_at_end")
            return False
        return True

    async def _collect_watchers(self) -> WatchResult:
        """Wait until the watchers saw everything acknowledged (or stop changing), then
        stop them."""
        assert self.watchers is not None

        def received(n: int) -> None:
            self.platform_received = n

        result = await self.watchers.collect(
            self.outbox_totals.acked, self.options.drain_timeout_s, received
        )
        self.watchers = None
        return result

    async def _monitor_delta(self, baseline: dict[str, int]) -> dict[str, int] | None:
        assert self.sandbox is not None
        return await monitor_delta(
            self.sandbox,
            {d.client_id for d in self.devices},
            baseline,
            sum(d.generated for d in self.devices),
            self.options.drain_timeout_s,
        )

    async def _stop_all(self) -> None:
        """Stop every device, ``STOP_CONCURRENCY`` at a time. A fixed set of workers takes
        the devices one after another (rather than one waiting task per device), so
        stopping 10,000 devices does not first allocate 10,000 coroutines, and each
        stopped device's objects are freed before the next ones stop."""
        devices = iter(self.devices)

        async def worker() -> None:
            for device in devices:
                with contextlib.suppress(Exception):
                    await device.stop()

        workers = min(STOP_CONCURRENCY, len(self.devices))
        await asyncio.gather(*(worker() for _ in range(workers)), return_exceptions=True)

    # ------------------------------------------------------------------ the report

    def _report(
        self,
        *,
        started_at: float,
        provision_s: float,
        reused: int,
        provision_path: str,
        all_connected_s: float,
        send_window: float,
        drained: bool,
        watch: WatchResult | None,
        monitor: dict[str, int] | None,
    ) -> FleetReport:
        opts = self.options
        generated = sum(d.generated for d in self.devices)
        expected = len(self.devices) * opts.messages_per_device
        connected = sum(1 for d in self.devices if d.ever_connected)
        per_device = {d.client_id: d.generated for d in self.devices}
        watcher_json: dict[str, Any] | None = None
        latency = Histogram()
        steady = Histogram()
        if watch is not None:
            lost = sum(max(0, n - watch.per_client.get(c, 0)) for c, n in per_device.items())
            watcher_json = {
                "received": watch.received,
                "unique": watch.unique,
                "duplicates": watch.duplicates,
                "lost": lost,
                "invalid": watch.invalid,
                "disconnects": watch.disconnects,
                "devices_with_loss": sum(
                    1 for c, n in per_device.items() if watch.per_client.get(c, 0) < n
                ),
            }
            latency = watch.latency
            steady = watch.steady_latency
            if watch.disconnects:
                self.error("watcher_disconnected")
        monitor_json: dict[str, Any] | None = None
        if monitor is not None:
            stored = sum(monitor.values())
            monitor_json = {
                "stored": stored,
                "lost": sum(max(0, n - monitor.get(c, 0)) for c, n in per_device.items()),
                "devices_with_loss": sum(1 for c, n in per_device.items() if monitor.get(c, 0) < n),
            }
        errors = dict(self.errors)
        return FleetReport(
            {
                "format": REPORT_FORMAT,
                "environment": str(self.env),
                "target": "sandbox" if self.sandbox is not None else "platform",
                "fleet_devices": opts.devices,
                "shards": [{"index": opts.shard.index, "count": opts.shard.count}],
                "devices": len(self.devices),
                "rate_per_device": opts.rate,
                "duration_s": opts.duration_s,
                "messages_per_device": opts.messages_per_device,
                "started_at": started_at,
                "finished_at": time.time(),
                "provisioning": {
                    "path": provision_path,
                    "reused": reused,
                    "provisioned": len(self.devices) - reused,
                    "seconds": round(provision_s, 3),
                },
                "connect": {
                    "connected": connected,
                    "failed": self.failed,
                    "concurrency": opts.connect_concurrency,
                    "connect_rate": opts.connect_rate,
                    "all_connected_s": round(all_connected_s, 3),
                    "histogram_us": self.connect_hist.to_json(),
                    "synced": self.synced,
                    "sync_histogram_us": self.sync_hist.to_json(),
                },
                "telemetry": {
                    "expected": expected,
                    "generated": generated,
                    "acknowledged": self.outbox_totals.acked,
                    "unacknowledged": self.outbox_totals.depth,
                    "drained": drained,
                    "send_window_s": round(send_window, 3),
                    "throughput_msgs_per_s": round(generated / send_window, 2)
                    if send_window > 0
                    else 0.0,
                },
                "latency": {
                    "source": "watcher sendertimestamp" if watch is not None else None,
                    "histogram_us": latency.to_json(),
                    "steady_histogram_us": steady.to_json(),
                },
                "lost": {"watcher": watcher_json, "monitor": monitor_json},
                "memory": {
                    "peak_rss_mb": round(peak_rss_mb(), 1),
                    "malloc": malloc_tuning(),
                    "memory_maps_before_stop": self.memory_maps,
                    "trimmed_mb": dict(self.trimmed_mb),
                },
                "cpu_s": dict(self.cpu_by_phase),
                "cpu_main_thread_s": dict(self.main_cpu_by_phase),
                "errors": errors,
                "limits": self.limits.to_json() if self.limits else None,
            }
        )
