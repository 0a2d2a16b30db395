"""Fleet simulator at increasing sizes against the bench sandbox on the same machine.

For each size (``IOTREF_BENCH_FLEET_SIZES``, default ``100,1000``; the goal is 10,000) it
runs ``iotref fleet --json`` as a subprocess (so its peak RSS is the simulator's own) with
one status message per device every ``IOTREF_BENCH_FLEET_INTERVAL`` seconds (default 10)
for ``IOTREF_BENCH_FLEET_DURATION`` seconds (default 30), and measures meanwhile the CPU
time of the simulator, the sandbox process (shadow service, ingestion, HTTP) and
Mosquitto, so the report can say which of them is the limit.

Figures per size: connect p50/p99 and time until all connected, shadow sync p99, telemetry
throughput, publish-to-platform latency p50/p99/max, messages lost (monitor, else the
independent subscriber), peak RSS (total and per device), CPU seconds per device of each
process (and of the simulator's main thread while connecting), and errors. The stores
are reused across sizes (only new devices are provisioned), as they would be across runs.

The fleet's account-level connect rate is not limited here (``--connect-rate 0``): the
figures say how fast the simulator and the sandbox can connect devices, not how fast a
fleet may connect to AWS IoT Core (``iotref fleet``'s default, 100 a second, would make
"all connected" a tenth of the device count in seconds). Each device's publish pace stays
as shipped (it sends far below it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench.harness import BenchContext, Figure

SIZES = [int(s) for s in os.environ.get("IOTREF_BENCH_FLEET_SIZES", "100,1000").split(",") if s]
INTERVAL_S = float(os.environ.get("IOTREF_BENCH_FLEET_INTERVAL", "10"))
DURATION_S = float(os.environ.get("IOTREF_BENCH_FLEET_DURATION", "30"))
CONCURRENCY = int(os.environ.get("IOTREF_BENCH_FLEET_CONCURRENCY", "100"))


class CpuMeter:
    """CPU seconds (user + system) used by a set of processes while it runs."""

    def __init__(self, procs: dict[str, psutil.Process]) -> None:
        self.procs = procs
        self.start = {name: _cpu(p) for name, p in procs.items()}
        self.last = dict(self.start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            for name, proc in self.procs.items():
                self.last[name] = _cpu(proc, self.last[name])

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        for name, proc in self.procs.items():
            self.last[name] = _cpu(proc, self.last[name])
        return {name: self.last[name] - self.start[name] for name in self.procs}


def _cpu(proc: psutil.Process, default: float = 0.0) -> float:
    try:
        times = proc.cpu_times()
        return float(times.user + times.system + times.children_user + times.children_system)
    except psutil.Error:
        return default


def run_size(ctx: BenchContext, devices: int) -> tuple[dict[str, Any], dict[str, float], float]:
    sandbox = ctx.sandbox()
    assert sandbox.proc is not None
    stores = ctx.workdir / "fleet-stores"
    cmd = [
        sys.executable,
        "-m",
        "iotref.cli.main",
        "fleet",
        "--devices",
        str(devices),
        "--rate",
        str(1.0 / INTERVAL_S),
        "--duration",
        str(DURATION_S),
        "--connect-concurrency",
        str(CONCURRENCY),
        "--connect-rate",
        "0",
        "--env-file",
        str(sandbox.info["env_file"]),
        "--store-root",
        str(stores),
        "--no-progress",
        "--json",
    ]
    procs = {"sandbox": psutil.Process(sandbox.proc.pid)}
    for broker in sandbox.mosquitto_processes()[:1]:
        procs["mosquitto"] = broker
    started = time.perf_counter()
    fleet = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs["simulator"] = psutil.Process(fleet.pid)
    meter = CpuMeter(procs)
    out, err = fleet.communicate(timeout=1800)
    cpu = meter.stop()
    elapsed = time.perf_counter() - started
    if not out.strip():
        raise RuntimeError(f"fleet of {devices} failed: {err.decode(errors='replace')[-2000:]}")
    return json.loads(out), cpu, elapsed


def _memory_note(report: dict[str, Any]) -> str:
    """Which malloc tuning the simulator ran with, and its memory mappings (the kernel
    caps them at ``vm.max_map_count``)."""
    memory = report["memory"]
    malloc = memory.get("malloc") or {}
    if not malloc:
        return "simulator (malloc not tuned)"
    return (
        f"simulator; glibc mmap threshold {malloc['mmap_threshold'] // 1024} kB, "
        f"{memory.get('memory_maps_before_stop')} mappings of max {malloc.get('max_map_count')}"
    )


def run(ctx: BenchContext) -> list[Figure]:
    figures: list[Figure] = []
    for devices in SIZES:
        report, cpu, elapsed = run_size(ctx, devices)
        c, t, lat = report["connect"], report["telemetry"], report["latency"]
        lost = report["lost"]
        source = "monitor" if lost.get("monitor") else "watcher"
        lost_n = (lost.get(source) or {}).get("lost", -1)
        errors = ", ".join(f"{k}={v}" for k, v in sorted(report["errors"].items())) or "none"
        p = f"fleet {devices}:"
        note = (
            f"1 msg/{INTERVAL_S:g} s per device for {DURATION_S:g} s, concurrency "
            f"{CONCURRENCY}, connect rate not limited"
        )
        figures += [
            Figure(f"{p} connected", c["connected"], "devices", f"failed {c['failed']}"),
            Figure(f"{p} all connected", c["all_connected_s"], "s", note),
            Figure(f"{p} connect p50", c["p50_ms"] or 0, "ms"),
            Figure(f"{p} connect p99", c["p99_ms"] or 0, "ms"),
            Figure(f"{p} shadow sync p99", c["sync"]["p99_ms"] or 0, "ms", "after CONNACK"),
            Figure(f"{p} throughput", t["throughput_msgs_per_s"], "msgs/s"),
            Figure(f"{p} latency p50", lat["p50_ms"] or 0, "ms", "publish to platform"),
            Figure(f"{p} latency p99", lat["p99_ms"] or 0, "ms"),
            Figure(f"{p} latency max", lat["max_ms"] or 0, "ms"),
            Figure(f"{p} lost", lost_n, "messages", f"by the {source}; errors: {errors}"),
            Figure(f"{p} peak RSS", report["memory"]["peak_rss_mb"], "MB", _memory_note(report)),
            Figure(
                f"{p} RSS per device",
                report["memory"]["peak_rss_mb"] * 1000 / devices,
                "kB",
            ),
            Figure(f"{p} wall time", elapsed, "s", "provisioning new devices included"),
        ]
        for name, seconds in sorted(cpu.items()):
            figures.append(
                Figure(
                    f"{p} CPU {name}",
                    seconds * 1000 / devices,
                    "ms/device",
                    f"{seconds:.1f} s in total",
                )
            )
        # The connect limit: the simulator's Python main thread while connecting (the TLS
        # contexts, built on a worker thread before the ramp, are counted in the process's
        # CPU of that phase).
        main = report.get("cpu_main_thread_s", {})
        main_connect = main.get("connecting", 0.0) + main.get("building TLS contexts", 0.0)
        figures.append(
            Figure(
                f"{p} main thread CPU connecting",
                main_connect * 1000 / devices,
                "ms/device",
                f"{main_connect:.1f} s in total",
            )
        )
        for phase, seconds in sorted(report.get("cpu_s", {}).items()):
            if seconds >= 0.5:
                figures.append(
                    Figure(f"{p} simulator CPU {phase}", seconds, "s", "by phase of the run")
                )
        Path(ctx.workdir / f"fleet-{devices}.json").write_text(json.dumps(report, indent=2))
    return figures
