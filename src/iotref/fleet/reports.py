"""A fleet run's report: the JSON document (``iotref-fleet-report/1``) with its histograms,
the text for people, shard reports merged into one, and reading a saved report."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from iotref.fleet.errors import FleetError
from iotref.fleet.histogram import Histogram

REPORT_FORMAT: Final = "iotref-fleet-report/1"


class FleetReport:
    """A run's (or merged runs') report: the JSON document plus derived figures."""

    def __init__(self, data: dict[str, Any]) -> None:
        if data.get("format") != REPORT_FORMAT:
            raise ValueError(f"not an {REPORT_FORMAT} document")
        self.data = data

    def to_json(self) -> dict[str, Any]:
        """The document with the percentiles (derived from the histograms) filled in."""
        out = json.loads(json.dumps(self.data))
        out["connect"].update(
            Histogram.from_json(self.data["connect"]["histogram_us"]).summary_ms()
        )
        out["connect"]["sync"] = Histogram.from_json(
            self.data["connect"]["sync_histogram_us"]
        ).summary_ms()
        out["latency"]["steady"] = Histogram.from_json(
            self.data["latency"].get("steady_histogram_us")
        ).summary_ms()
        out["latency"].update(
            Histogram.from_json(self.data["latency"]["histogram_us"]).summary_ms()
        )
        return dict(out)

    @property
    def lost(self) -> int | None:
        """Messages lost by the best source available (monitor, else watcher)."""
        lost = self.data["lost"]
        for source in ("monitor", "watcher"):
            if lost.get(source) is not None:
                return int(lost[source]["lost"])
        return None

    def text(self) -> str:
        """The report for people."""
        d = self.to_json()
        c, t, lat, lost = d["connect"], d["telemetry"], d["latency"], d["lost"]
        shards = ", ".join(f"{s['index']}/{s['count']}" for s in d["shards"])

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:,.1f} ms"

        lines = [
            f"fleet: {d['devices']} devices (of {d['fleet_devices']}; shard {shards}) on "
            f"{d['environment']} [{d['target']}]",
            f"  provisioning  {d['provisioning']['provisioned']} new ({d['provisioning']['path']}),"
            f" {d['provisioning']['reused']} reused, {d['provisioning']['seconds']:.1f} s",
            f"  connect       {c['connected']} connected, {c['failed']} failed; p50 "
            f"{ms(c['p50_ms'])}, p99 {ms(c['p99_ms'])}; all connected in "
            f"{c['all_connected_s']:.1f} s (concurrency {c['concurrency']}, "
            f"{_connect_rate_text(c.get('connect_rate'))})",
            f"  shadow sync   {c['synced']} synced; p50 {ms(c['sync']['p50_ms'])}, p99 "
            f"{ms(c['sync']['p99_ms'])} after CONNACK",
            f"  telemetry     {t['generated']} of {t['expected']} sent, {t['acknowledged']} "
            f"acknowledged; {t['throughput_msgs_per_s']:,.1f} msgs/s over "
            f"{t['send_window_s']:.1f} s",
            f"  latency       p50 {ms(lat['p50_ms'])}, p99 {ms(lat['p99_ms'])}, max "
            f"{ms(lat['max_ms'])} ({lat['histogram_us']['count']} messages; "
            f"{lat['source'] or 'not measured: no operator identity'})",
        ]
        steady = lat.get("steady") or {}
        if steady.get("p50_ms") is not None:
            lines.append(
                f"    once all connected: p50 {ms(steady['p50_ms'])}, p99 "
                f"{ms(steady['p99_ms'])}, max {ms(steady['max_ms'])}"
            )
        watcher, monitor = lost.get("watcher"), lost.get("monitor")
        parts = []
        if monitor is not None:
            parts.append(f"{monitor['lost']} by the monitor ({monitor['stored']} stored)")
        if watcher is not None:
            parts.append(
                f"{watcher['lost']} by the independent subscriber ({watcher['unique']} unique, "
                f"{watcher['duplicates']} duplicates)"
            )
        lines.append(f"  lost          {'; '.join(parts) if parts else 'not measured'}")
        mem = d["memory"]
        extra = (
            f" (sum over shards {mem['peak_rss_mb_sum']:,.0f} MB)"
            if "peak_rss_mb_sum" in mem
            else ""
        )
        lines.append(f"  memory        peak RSS {mem['peak_rss_mb']:,.0f} MB{extra}")
        errors = ", ".join(f"{k} {v}" for k, v in sorted(d["errors"].items())) or "none"
        lines.append(f"  errors        {errors}")
        limits = d.get("limits")
        if limits:
            lines.append(
                f"  limits        files {limits['nofile_soft']} (hard {limits['nofile_hard']}, "
                f"was {limits['nofile_soft_before']}); broker max_connections "
                f"{limits['broker_max_connections'] or '?'}, broker files "
                f"{limits['broker_nofile'] or '?'}; local ports {limits['ephemeral_ports'] or '?'}"
            )
        return "\n".join(lines)


def _connect_rate_text(rate: float | None) -> str:
    if rate is None:
        return "connect rate not recorded"
    return f"at most {rate:g} connects/s" if rate else "connect rate not limited"


def merge_reports(reports: Sequence[FleetReport]) -> FleetReport:
    """One report for shard reports of one fleet run: counts summed, histograms merged
    (percentiles recomputed from them), connect time the slowest shard's, throughput the
    sum (shards run at the same time), peak memory the largest shard's (and the sum)."""
    if not reports:
        raise ValueError("nothing to merge")
    docs = [r.data for r in reports]
    first = docs[0]
    for doc in docs[1:]:
        for key in ("fleet_devices", "rate_per_device", "duration_s", "messages_per_device"):
            if doc[key] != first[key]:
                raise ValueError(f"reports differ in {key}: {first[key]} vs {doc[key]}")
    shards = [s for doc in docs for s in doc["shards"]]
    seen = {(s["index"], s["count"]) for s in shards}
    if len(seen) != len(shards):
        raise ValueError("the same shard appears twice")

    def total(path: str) -> int:
        out = 0
        for doc in docs:
            node: Any = doc
            for part in path.split("."):
                node = node[part]
            out += int(node)
        return out

    def merged_hist(section: str, key: str) -> dict[str, Any]:
        hist = Histogram()
        for doc in docs:
            hist.merge(Histogram.from_json(doc[section].get(key)))
        return hist.to_json()

    def merged_lost(source: str) -> dict[str, Any] | None:
        parts = [doc["lost"].get(source) for doc in docs]
        if any(p is None for p in parts):
            return None
        keys = parts[0].keys() if parts[0] else []
        return {k: sum(int(p[k]) for p in parts if p) for k in keys}

    errors: Counter[str] = Counter()
    cpu: Counter[str] = Counter()
    main_cpu: Counter[str] = Counter()
    for doc in docs:
        errors.update(doc["errors"])
        cpu.update(doc.get("cpu_s", {}))
        main_cpu.update(doc.get("cpu_main_thread_s", {}))
    limits = [doc.get("limits") for doc in docs if doc.get("limits")]
    merged = {
        "format": REPORT_FORMAT,
        "environment": first["environment"],
        "target": first["target"],
        "fleet_devices": first["fleet_devices"],
        "shards": sorted(shards, key=lambda s: (s["count"], s["index"])),
        "devices": total("devices"),
        "rate_per_device": first["rate_per_device"],
        "duration_s": first["duration_s"],
        "messages_per_device": first["messages_per_device"],
        "started_at": min(doc["started_at"] for doc in docs),
        "finished_at": max(doc["finished_at"] for doc in docs),
        "provisioning": {
            "path": "+".join(sorted({doc["provisioning"]["path"] for doc in docs})),
            "reused": total("provisioning.reused"),
            "provisioned": total("provisioning.provisioned"),
            "seconds": max(doc["provisioning"]["seconds"] for doc in docs),
        },
        "connect": {
            "connected": total("connect.connected"),
            "failed": total("connect.failed"),
            "concurrency": sum(doc["connect"]["concurrency"] for doc in docs),
            # Each shard paces its own attempts: together they make the sum (0: one was
            # not limited, so neither is the whole).
            "connect_rate": (
                0.0
                if any(not doc["connect"].get("connect_rate") for doc in docs)
                else sum(doc["connect"]["connect_rate"] for doc in docs)
            ),
            "all_connected_s": max(doc["connect"]["all_connected_s"] for doc in docs),
            "histogram_us": merged_hist("connect", "histogram_us"),
            "synced": total("connect.synced"),
            "sync_histogram_us": merged_hist("connect", "sync_histogram_us"),
        },
        "telemetry": {
            "expected": total("telemetry.expected"),
            "generated": total("telemetry.generated"),
            "acknowledged": total("telemetry.acknowledged"),
            "unacknowledged": total("telemetry.unacknowledged"),
            "drained": all(doc["telemetry"]["drained"] for doc in docs),
            "send_window_s": max(doc["telemetry"]["send_window_s"] for doc in docs),
            "throughput_msgs_per_s": round(
                sum(doc["telemetry"]["throughput_msgs_per_s"] for doc in docs), 2
            ),
        },
        "latency": {
            "source": first["latency"]["source"],
            "histogram_us": merged_hist("latency", "histogram_us"),
            "steady_histogram_us": merged_hist("latency", "steady_histogram_us"),
        },
        "lost": {"watcher": merged_lost("watcher"), "monitor": merged_lost("monitor")},
        "memory": {
            "peak_rss_mb": max(doc["memory"]["peak_rss_mb"] for doc in docs),
            "peak_rss_mb_sum": round(sum(doc["memory"]["peak_rss_mb"] for doc in docs), 1),
        },
        "cpu_s": dict(cpu),
        "cpu_main_thread_s": dict(main_cpu),
        "errors": dict(errors),
        "limits": limits[0] if limits else None,
    }
    return FleetReport(merged)


def load_report(path: Path) -> FleetReport:
    """A report written by ``iotref fleet --json`` (or ``--report FILE``)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FleetError(f"cannot read the report {path}: {exc}") from None
    try:
        return FleetReport(data)
    except ValueError as exc:
        raise FleetError(f"{path}: {exc}") from None
