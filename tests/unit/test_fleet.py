"""The fleet simulator's pure parts: shards, the histogram, the in-memory outbox, the status
generator, limits, report merging, and the TLS contexts built ahead of connecting."""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import os
import random
import resource
import threading
from pathlib import Path
from typing import Any

import pytest
from awscrt import io

from iotref.device.connection import connection as connection_module
from iotref.device.connection.awscrt_options import build_tls_context
from iotref.device.connection.connection import Connection
from iotref.device.connection.errors import ConnectionFailed
from iotref.device.connection.settings import ConnectionSettings
from iotref.device.onboarding.certificate_store import DeviceProperties
from iotref.device.onboarding.environment import load_environment
from iotref.device.telemetry.messages import Asset, AssetType, Sender, SenderType, build_message
from iotref.device.telemetry.outbox import Outbox
from iotref.device.telemetry.outbox_records import AppendResult, OutboxEntry
from iotref.device.telemetry.seams import MessageStore
from iotref.fleet.device import FleetDevice
from iotref.fleet.errors import FleetLimitError
from iotref.fleet.histogram import Histogram
from iotref.fleet.memory_outbox import MemoryOutbox, OutboxTotals
from iotref.fleet.names import Shard, device_name, messages_per_device
from iotref.fleet.options import DEFAULT_CONNECT_RATE, FleetOptions
from iotref.fleet.os_limits import check_limits
from iotref.fleet.reports import REPORT_FORMAT, FleetReport, merge_reports
from iotref.fleet.run import FleetRun
from iotref.fleet.status_generator import StatusGenerator
from iotref.fleet.stores import FleetDeviceIdentity
from iotref.fleet.target import SandboxInfo
from iotref.fleet.tls_contexts import build_tls_contexts, without_system_trust_store
from iotref.protocol import limits
from iotref.protocol.message_schemas import default_validator
from tests.support.device_keys import self_signed

# --------------------------------------------------------------------------- shards, names


def test_device_names_are_deterministic_and_sortable() -> None:
    assert device_name(0) == "fleet-000000"
    assert device_name(42) == "fleet-000042"
    assert sorted(device_name(i) for i in (10, 2, 100)) == [
        device_name(2),
        device_name(10),
        device_name(100),
    ]


def test_shards_partition_the_fleet() -> None:
    n = 103
    shards = [Shard(i, 4) for i in range(4)]
    parts = [s.indices(n) for s in shards]
    assert sorted(i for p in parts for i in p) == list(range(n))
    assert parts[1][:3] == [1, 5, 9]
    assert Shard().indices(3) == [0, 1, 2]


@pytest.mark.parametrize("text", ["2/2", "-1/2", "1", "a/b", "0/0", "1/0"])
def test_bad_shards_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="shard"):
        Shard.parse(text)


def test_shard_parse_round_trips() -> None:
    assert Shard.parse("1/3") == Shard(1, 3)
    assert str(Shard(1, 3)) == "1/3"


def test_messages_per_device() -> None:
    assert messages_per_device(0.1, 60) == 6
    assert messages_per_device(1, 2.4) == 2
    assert messages_per_device(0.01, 10) == 1  # at least one


def test_options_are_checked() -> None:
    with pytest.raises(ValueError):
        FleetOptions(devices=0, rate=1, duration_s=1)
    with pytest.raises(ValueError):
        FleetOptions(devices=1, rate=0, duration_s=1)
    assert FleetOptions(devices=5, rate=0.5, duration_s=10).messages_per_device == 5
    with pytest.raises(ValueError, match="connect rate"):
        FleetOptions(devices=1, rate=1, duration_s=1, connect_rate=-1)


def _identity(tmp_path: Path, index: int) -> FleetDeviceIdentity:
    props = DeviceProperties(
        "127.0.0.1", 8883, "", "connectprint/telemetry", f"fleet-{index}", "org", "m", "site"
    )
    return FleetDeviceIdentity(index, device_name(index), tmp_path / device_name(index), props)


def test_a_fleet_stays_under_the_connect_quota_and_each_device_under_its_own(
    tmp_path: Path,
) -> None:
    env = load_environment("local")
    options = FleetOptions(devices=3, rate=1, duration_s=1, store_root=tmp_path)
    assert options.connect_rate == DEFAULT_CONNECT_RATE == 100
    run = FleetRun(env, options, validator=default_validator())
    assert run.connect_gate is not None and run.connect_gate.rate == 100
    # Every device paces its publishes like a single device (the same limiter).
    settings = FleetDevice(_identity(tmp_path, 0), run).settings()
    assert settings.publish_rate_limit == limits.PUBLISH_REQUESTS_PER_SECOND_PER_CONNECTION
    assert settings.throughput_limit == limits.THROUGHPUT_BYTES_PER_SECOND_PER_CONNECTION
    unlimited = FleetRun(
        env,
        FleetOptions(
            devices=3,
            rate=1,
            duration_s=1,
            store_root=tmp_path,
            connect_rate=0,
            publish_rate_limit=None,
        ),
        validator=default_validator(),
    )
    assert unlimited.connect_gate is None
    assert FleetDevice(_identity(tmp_path, 1), unlimited).settings().publish_rate_limit is None


# --------------------------------------------------------------------------- histogram


def test_histogram_buckets_are_contiguous_and_ordered() -> None:
    previous_high = -1
    for index in range(Histogram.bucket_of(10**9) + 1):
        low, high = Histogram.bucket_range(index)
        assert low == previous_high + 1
        assert Histogram.bucket_of(low) == index
        assert Histogram.bucket_of(high) == index
        previous_high = high


def test_histogram_percentiles_are_within_two_percent() -> None:
    rng = random.Random(3)
    values = [rng.lognormvariate(8, 1.5) for _ in range(20_000)]
    hist = Histogram()
    for v in values:
        hist.record(v)
    exact = sorted(round(v) for v in values)
    for q in (50, 90, 99, 99.9):
        true = exact[max(0, math.ceil(q * len(exact) / 100 - 1e-9) - 1)]
        got = hist.percentile(q)
        assert got is not None
        assert abs(got - true) <= max(1.0, 0.02 * true), (q, got, true)
    assert hist.max == exact[-1]
    assert hist.min == exact[0]
    assert hist.count == len(values)


def test_histogram_small_values_are_exact() -> None:
    hist = Histogram()
    for v in (1, 2, 3, 4, 100):
        hist.record(v)
    assert hist.percentile(50) == 3
    assert hist.percentile(100) == 100
    assert Histogram().percentile(50) is None


def test_merged_histograms_equal_one_histogram() -> None:
    rng = random.Random(5)
    values = [rng.expovariate(1 / 5000) for _ in range(5000)]
    whole, a, b = Histogram(), Histogram(), Histogram()
    for i, v in enumerate(values):
        whole.record(v)
        (a if i % 2 else b).record(v)
    a.merge(b)
    assert a.to_json() == whole.to_json()
    again = Histogram.from_json(json.loads(json.dumps(a.to_json())))
    assert again.to_json() == whole.to_json()
    assert again.percentile(99) == whole.percentile(99)


def test_histogram_summary_in_milliseconds() -> None:
    hist = Histogram()
    hist.record(1500)
    assert hist.summary_ms() == {"p50_ms": 1.5, "p99_ms": 1.5, "max_ms": 1.5, "mean_ms": 1.5}


# --------------------------------------------------------------------------- memory outbox


def test_memory_outbox_keeps_order_until_acked() -> None:
    totals = OutboxTotals()
    box = MemoryOutbox(totals)
    seqs = [box.append("t", f"m{i}".encode(), f"id{i}").seq for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    assert [r.payload for r in box.read_batch(0, 3)] == [b"m0", b"m1", b"m2"]
    box.ack(2)
    assert [r.seq for r in box.read_batch(0, 10)] == [1, 3, 4, 5]
    assert [r.seq for r in box.read_batch(3, 10)] == [4, 5]
    box.ack(2)  # a second PUBACK of the same message changes nothing
    assert box.depth == 4
    assert totals.depth == 4
    assert totals.acked == 1
    box.ack_many([1, 3, 4, 5])
    assert box.depth == 0
    assert totals.depth == 0
    assert box.stats().acked == 5
    assert box.last_seq == 5
    box.close()
    assert box.closed


def test_memory_outbox_refuses_appends_in_groups_and_reads_bare_tuples() -> None:
    totals = OutboxTotals()
    box = MemoryOutbox(totals)
    results = box.append_each([OutboxEntry("t", b"a"), OutboxEntry("t", b"b", "id-b")])
    assert [r.seq for r in results if isinstance(r, AppendResult)] == [1, 2]
    assert box.read_pending(0, 10) == [(1, "t", b"a"), (2, "t", b"b")]
    assert box.refuse(1, "too large") is True
    assert box.refuse(1, "too large") is False  # no longer queued
    assert box.read_pending(0, 10) == [(2, "t", b"b")]
    assert (totals.depth, totals.appended, totals.acked) == (1, 2, 0)
    stats = box.stats()
    assert (stats.depth, stats.accepted, stats.refused, stats.acked) == (1, 2, 1, 0)
    assert box.pending_acks == 0 and box.flush_acks() == 0


PUBLISHER_CALLS = (
    "append",
    "append_many",
    "append_each",
    "read_pending",
    "mark_attempted",
    "ack",
    "flush_acks",
    "refuse",
    "stats",
    "close",
)


@pytest.mark.parametrize("name", PUBLISHER_CALLS)
def test_memory_outbox_has_what_the_publisher_calls_on_an_outbox(name: str) -> None:
    """It is no :class:`Outbox` (no SQLite parent left half made), but has every method of
    the publisher's :class:`MessageStore`, with the same parameters (its behaviour under
    the contract: tests/unit/test_telemetry_seams.py)."""
    assert not issubclass(MemoryOutbox, Outbox)
    ours = inspect.signature(getattr(MemoryOutbox, name))
    theirs = inspect.signature(getattr(MessageStore, name))
    assert list(ours.parameters) == list(theirs.parameters)
    assert ours.return_annotation == theirs.return_annotation


def test_memory_outbox_has_the_properties_the_publisher_reads() -> None:
    box = MemoryOutbox()
    box.append("t", b"x")
    assert (box.closed, box.depth, box.pending_acks, box.durability) == (False, 1, 0, "process")


# --------------------------------------------------------------------------- status generator


def test_status_generator_makes_valid_messages() -> None:
    validator = default_validator()
    gen = StatusGenerator(7)
    sender = Sender(SenderType.PRESS, device_name(7), "1.0")
    asset = Asset("fleet-000007", "serial-7", AssetType.SHEETFED_PRESS)
    statuses = set()
    last_total = -1.0
    for _ in range(16):
        status = gen.next()
        statuses.add(str(status.status))
        assert status.totalproductioncounter >= last_total
        last_total = status.totalproductioncounter
        validator.validate_or_raise(build_message(sender, asset, status))
    assert {"Production", "Idle", "NonPoductive"} <= statuses


def test_status_generators_differ_by_seed_and_repeat_per_seed() -> None:
    a = [StatusGenerator(1).next().speed for _ in range(1)]
    b = [StatusGenerator(1).next().speed for _ in range(1)]
    assert a == b
    nominal = {StatusGenerator(s).nominal for s in range(50)}
    assert len(nominal) > 1


# --------------------------------------------------------------------------- limits


def test_limits_raise_the_soft_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard != resource.RLIM_INFINITY and soft > 256:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        limits = check_limits(10, 10, None)
        assert limits.nofile_soft == limits.nofile_hard
        assert limits.needed_fds == 10 + 256
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_limits_refuse_more_devices_than_files() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard file limit here")
    with pytest.raises(FleetLimitError, match=r"may open \d+ files"):
        check_limits(hard + 1, hard + 1, None)


def test_limits_refuse_more_devices_than_the_broker_takes(tmp_path: Path) -> None:
    broker = tmp_path / "broker"
    broker.mkdir()
    (broker / "mosquitto.conf").write_text(
        "listener 8883 127.0.0.1\nmax_connections 100\n\nlistener 9999 127.0.0.1\n"
        "max_connections 256\n"
    )
    sandbox = SandboxInfo(
        data_dir=tmp_path,
        http_url="http://127.0.0.1:1",
        admin_token="x",
        mqtt_host="localhost",
        mqtt_port=8883,
        platform_mqtt_port=9999,
        ca_file=tmp_path / "ca.pem",
        operator_cert=tmp_path / "op.pem",
        operator_key=tmp_path / "op.key",
    )
    assert check_limits(50, 50, sandbox).broker_max_connections == 100
    with pytest.raises(FleetLimitError, match="at most 100 device connections"):
        check_limits(50, 200, sandbox)


# --------------------------------------------------------------------------- reports


def _report(shard: Shard, devices: int, latencies: list[float], **extra: Any) -> FleetReport:
    lat = Histogram()
    for v in latencies:
        lat.record(v)
    conn = Histogram()
    for v in latencies:
        conn.record(v * 100)
    generated = devices * 3
    doc: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "environment": "local",
        "target": "sandbox",
        "fleet_devices": 10,
        "shards": [{"index": shard.index, "count": shard.count}],
        "devices": devices,
        "rate_per_device": 1.0,
        "duration_s": 3.0,
        "messages_per_device": 3,
        "started_at": 100.0 + shard.index,
        "finished_at": 200.0 + shard.index,
        "provisioning": {"path": "bulk", "reused": 0, "provisioned": devices, "seconds": 1.0},
        "connect": {
            "connected": devices,
            "failed": 0,
            "concurrency": 10,
            "connect_rate": 100.0,
            "all_connected_s": 1.0 + shard.index,
            "histogram_us": conn.to_json(),
            "synced": devices,
            "sync_histogram_us": conn.to_json(),
        },
        "telemetry": {
            "expected": generated,
            "generated": generated,
            "acknowledged": generated,
            "unacknowledged": 0,
            "drained": True,
            "send_window_s": 3.0,
            "throughput_msgs_per_s": generated / 3.0,
        },
        "latency": {"source": "watcher", "histogram_us": lat.to_json()},
        "lost": {
            "watcher": {"received": generated, "unique": generated, "duplicates": 0, "lost": 0},
            "monitor": None,
        },
        "memory": {"peak_rss_mb": 50.0 + shard.index},
        "cpu_s": {"connecting": 1.0},
        "errors": {"disconnected": 1},
        "limits": None,
    }
    doc.update(extra)
    return FleetReport(doc)


def test_merged_shards_sum_counts_and_recompute_percentiles() -> None:
    rng = random.Random(11)
    lat_a = [rng.uniform(1000, 9000) for _ in range(15)]
    lat_b = [rng.uniform(1000, 90000) for _ in range(15)]
    a = _report(Shard(0, 2), 5, lat_a)
    b = _report(Shard(1, 2), 5, lat_b)
    merged = merge_reports([a, b]).to_json()
    assert merged["devices"] == 10
    assert merged["telemetry"]["generated"] == 30
    assert merged["lost"]["watcher"]["lost"] == 0
    assert merged["lost"]["monitor"] is None
    assert merged["errors"] == {"disconnected": 2}
    assert merged["cpu_s"] == {"connecting": 2.0}
    assert merged["connect"]["all_connected_s"] == 2.0
    # Two shards at 100 connects/s each, at the same time: 200 a second in all.
    assert merged["connect"]["connect_rate"] == 200
    assert merged["memory"] == {"peak_rss_mb": 51.0, "peak_rss_mb_sum": 101.0}
    whole = Histogram()
    for v in lat_a + lat_b:
        whole.record(v)
    assert merged["latency"]["p99_ms"] == round((whole.percentile(99) or 0) / 1000, 3)
    assert merged["latency"]["max_ms"] == round(max(round(v) for v in lat_a + lat_b) / 1000, 3)
    assert [s["index"] for s in merged["shards"]] == [0, 1]
    assert "shard 0/2, 1/2" in merge_reports([b, a]).text()


def test_merge_refuses_mismatched_or_repeated_shards() -> None:
    a = _report(Shard(0, 2), 5, [1000])
    with pytest.raises(ValueError, match="twice"):
        merge_reports([a, a])
    other = _report(Shard(1, 2), 5, [1000], rate_per_device=2.0)
    with pytest.raises(ValueError, match="rate_per_device"):
        merge_reports([a, other])
    with pytest.raises(ValueError):
        FleetReport({"format": "something else"})


def test_report_text_mentions_the_figures() -> None:
    text = _report(Shard(), 5, [1000, 2000]).text()
    assert "5 devices" in text
    assert "0 by the independent subscriber" in text
    assert "p99" in text
    assert "(concurrency 10, at most 100 connects/s)" in text


# --------------------------------------------------------------------------- TLS contexts


def _settings(tmp_path: Path, **overrides: Any) -> ConnectionSettings:
    cert, key = self_signed(tmp_path, "device")
    ca, _ = self_signed(tmp_path, "ca")
    values: dict[str, Any] = {
        "endpoint": "127.0.0.1",
        "port": 1,
        "client_id": "fleet-test",
        "cert_path": cert,
        "key_path": key,
        "ca_path": ca,
    }
    values.update(overrides)
    return ConnectionSettings(**values)


@pytest.mark.parametrize("before", [None, "/somewhere/cert.pem"])
def test_system_trust_store_is_skipped_only_within(
    monkeypatch: pytest.MonkeyPatch, before: str | None
) -> None:
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
        if before is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, before)
    seen: dict[str, str | None] = {}

    def inside() -> None:
        with without_system_trust_store():
            seen.update((name, os.environ.get(name)) for name in ("SSL_CERT_FILE", "SSL_CERT_DIR"))
            raise RuntimeError("restored anyway")

    with pytest.raises(RuntimeError):
        inside()
    assert seen == {"SSL_CERT_FILE": os.devnull, "SSL_CERT_DIR": os.devnull}
    assert os.environ.get("SSL_CERT_FILE") == before
    assert os.environ.get("SSL_CERT_DIR") == before


class _Device:
    """What build_tls_contexts needs of a FleetDevice."""

    def __init__(self, settings: ConnectionSettings) -> None:
        self._settings = settings
        self.tls_context: io.ClientTlsContext | None = None

    def settings(self) -> ConnectionSettings:
        return self._settings


def test_tls_contexts_are_built_ahead_and_bad_files_left_to_start(tmp_path: Path) -> None:
    good = _settings(tmp_path)
    missing = _settings(tmp_path, key_path=tmp_path / "missing.key")
    devices = [_Device(good), _Device(missing), _Device(good)]
    assert build_tls_contexts(devices) == 2  # type: ignore[arg-type]
    assert isinstance(devices[0].tls_context, io.ClientTlsContext)
    assert devices[1].tls_context is None  # Connection.start() will say what is wrong
    assert isinstance(devices[2].tls_context, io.ClientTlsContext)

    stop = threading.Event()
    stop.set()
    late = [_Device(good)]
    assert build_tls_contexts(late, stop) == 0  # type: ignore[arg-type]
    assert late[0].tls_context is None


def test_connection_uses_a_prebuilt_tls_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(tmp_path, connect_timeout_s=0.5, fail_fast=False)
    context = build_tls_context(settings)

    def refuse(_: ConnectionSettings) -> io.ClientTlsContext:
        raise AssertionError("the prebuilt context should have been used")

    monkeypatch.setattr(connection_module, "build_tls_context", refuse)
    connection = Connection(settings, tls_context=context)

    async def start() -> None:
        with pytest.raises(ConnectionFailed) as failed:  # nothing listens on port 1
            await connection.start()
        assert failed.value.kind != "config"

    asyncio.run(start())


_MMAP_PROBE = """
import ctypes, json, re, sys
from iotref.fleet.memory import tune_malloc

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]


def mmapped_blocks(path):
    out = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, out)
    libc.fclose(out)
    text = open(path).read()
    return int(re.search(r'<total type="mmap" count="(\\d+)"', text).group(1))


path = sys.argv[1]
tuned = tune_malloc() if sys.argv[2] == "tuned" else None
before = mmapped_blocks(path)
blocks = [libc.malloc(6224) for _ in range(2000)]  # one MQTT 5 operation table each
print(json.dumps({"tuning": tuned, "new_mmapped": mmapped_blocks(path) - before}))
"""


@pytest.mark.skipif(
    not os.path.exists("/proc/self/maps") or not hasattr(os, "confstr"), reason="Linux only"
)
@pytest.mark.parametrize("mode", ["tuned", "default"])
def test_malloc_tuning_gives_large_blocks_pages_of_their_own(tmp_path: Path, mode: str) -> None:
    # In a process of its own: the setting is process-wide.
    import subprocess
    import sys

    libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    if not libc.startswith("glibc"):
        pytest.skip("glibc only")
    out = subprocess.run(
        [sys.executable, "-c", _MMAP_PROBE, str(tmp_path / "info.xml"), mode],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result = json.loads(out)
    if mode == "tuned":
        assert result["tuning"]["applied"] is True
        assert result["tuning"]["mmap_threshold"] == 6 * 1024
        # The first ones fill what the heap has free already (a few MB after start-up);
        # the rest get pages of their own.
        assert result["new_mmapped"] >= 1000
    else:
        assert result["new_mmapped"] == 0  # glibc's default threshold is 128 kB


def test_peak_rss_is_the_simulators_own_not_its_parents() -> None:
    """A simulator started by a large process reports its own peak (Linux carries
    ``ru_maxrss`` over through fork and exec)."""
    import subprocess
    import sys
    import textwrap

    parent = textwrap.dedent(
        """
        import subprocess, sys
        big = bytearray(300 * 1024 * 1024)
        for i in range(0, len(big), 4096):
            big[i] = 1
        child = "from iotref.fleet.memory import peak_rss_mb; print(peak_rss_mb())"
        print(subprocess.run([sys.executable, "-c", child], capture_output=True,
                             text=True, check=True).stdout.strip())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", parent], capture_output=True, text=True, check=True, timeout=60
    )
    assert 0 < float(out.stdout.strip()) < 200
