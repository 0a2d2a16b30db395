"""``iotref fleet`` against the real sandbox: a small fleet connects, syncs its shadows and
sends telemetry that the platform receives completely (counted by the independent
subscriber and, where the sandbox has one, the monitor); a run split into two shards, run
at the same time as separate processes, and its merged report agree with one run."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from iotref.device.connection.awscrt_options import build_tls_context
from iotref.device.connection.connection import Connection
from iotref.device.connection.errors import ConnectionFailed
from iotref.device.connection.settings import ConnectionSettings
from iotref.device.onboarding.certificate_store import (
    CERTIFICATE_FILE,
    PRIVATE_KEY_FILE,
    ROOT_CA_FILE,
)
from iotref.device.onboarding.environment import load_environment_file
from iotref.fleet.histogram import Histogram
from iotref.fleet.names import device_name
from iotref.fleet.options import FleetOptions
from iotref.fleet.run import FleetRun
from iotref.fleet.target import SandboxInfo, find_sandbox
from iotref.fleet.tls_contexts import without_system_trust_store
from tests.support.cli_process import run_iotref, start_iotref
from tests.support.device_keys import self_signed
from tests.support.sandbox_process import SandboxProcess

pytestmark = pytest.mark.integration

DEVICES = 50
RATE = 2.0
DURATION = 2.0
PER_DEVICE = 4


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fleet-stores")


@pytest.fixture(scope="module")
def single_run(sandbox: SandboxProcess, store_root: Path) -> dict[str, Any]:
    """One run of the whole fleet, in this process."""
    env_file = Path(sandbox.info["env_file"])
    env = load_environment_file(env_file)
    info = find_sandbox(env, env_file)
    assert info is not None, "the env file's sandbox.json was not recognised"
    options = FleetOptions(
        devices=DEVICES, rate=RATE, duration_s=DURATION, store_root=store_root, seed=1
    )
    report = asyncio.run(FleetRun(env, options, sandbox=info).run())
    return report.to_json()


def test_every_device_connects_syncs_and_is_counted(
    single_run: dict[str, Any], sandbox: SandboxProcess, store_root: Path
) -> None:
    report = single_run
    assert report["devices"] == DEVICES
    assert report["provisioning"]["provisioned"] == DEVICES
    assert report["provisioning"]["path"] == "bulk"
    assert report["connect"]["connected"] == DEVICES
    assert report["connect"]["failed"] == 0
    assert report["connect"]["synced"] == DEVICES
    expected = DEVICES * PER_DEVICE
    telemetry = report["telemetry"]
    assert telemetry["expected"] == telemetry["generated"] == expected
    assert telemetry["acknowledged"] >= expected
    assert telemetry["unacknowledged"] == 0
    watcher = report["lost"]["watcher"]
    assert watcher["unique"] == expected
    assert watcher["lost"] == 0
    assert report["latency"]["histogram_us"]["count"] == expected
    assert report["latency"]["p50_ms"] is not None
    assert report["latency"]["p99_ms"] <= report["latency"]["max_ms"]
    monitor = report["lost"]["monitor"]
    if monitor is not None:  # the sandbox's monitor counts what it stored, deduplicated
        assert monitor["stored"] == expected
        assert monitor["lost"] == 0
    assert report["memory"]["peak_rss_mb"] > 0
    assert "building TLS contexts" in report["cpu_s"]  # ahead of the connect ramp
    assert report["limits"]["nofile_soft"] >= DEVICES

    # Each device is an ordinary certificate store, and a thing of its own in the sandbox.
    props = json.loads((store_root / "local" / device_name(7) / "properties.json").read_text())
    answer = httpx.get(
        f"{sandbox.http_url}/admin/things/{props['client_id']}",
        headers=sandbox.admin_headers,
    )
    assert answer.status_code == 200
    assert answer.json()["machineId"] == device_name(7)
    clients = {
        json.loads((store_root / "local" / device_name(i) / "properties.json").read_text())[
            "client_id"
        ]
        for i in range(DEVICES)
    }
    assert len(clients) == DEVICES


def _fleet_args(sandbox: SandboxProcess, store_root: Path, *args: str) -> list[str]:
    return [
        "fleet",
        "--devices",
        str(DEVICES),
        "--rate",
        str(RATE),
        "--duration",
        str(DURATION),
        "--env-file",
        str(sandbox.info["env_file"]),
        "--store-root",
        str(store_root),
        "--no-progress",
        *args,
    ]


def test_shards_and_their_merged_report_agree_with_one_run(
    single_run: dict[str, Any], sandbox: SandboxProcess, store_root: Path, tmp_path: Path
) -> None:
    paths = [tmp_path / f"shard{i}.json" for i in range(2)]
    procs = [
        start_iotref(
            *_fleet_args(sandbox, store_root, "--shard", f"{i}/2", "--report", str(path)),
            stderr=subprocess.STDOUT,
        )
        for i, path in enumerate(paths)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out
    shards = [json.loads(p.read_text()) for p in paths]
    for shard in shards:
        assert shard["devices"] == DEVICES // 2
        assert shard["provisioning"]["reused"] == DEVICES // 2  # the single run's stores
        # `iotref fleet` owns its process: it tunes glibc's malloc (where it is glibc), and
        # asks the monitor for its counts only once the devices are stopped.
        memory = shard["memory"]
        if (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            assert memory["malloc"]["applied"] is True
            assert memory["malloc"]["mmap_threshold"] == 6 * 1024
            assert set(memory["trimmed_mb"]) == {"after provisioning", "after connecting"}
        assert memory["memory_maps_before_stop"] > 0
        if shard["lost"]["monitor"] is not None:
            phases = list(shard["cpu_s"])
            assert phases.index("stopping") < phases.index("counting")

    merged_out = run_iotref("fleet", "merge", "--json", *map(str, paths))
    assert merged_out.returncode == 0, merged_out.stderr
    merged = json.loads(merged_out.stdout)
    single = single_run
    for section, key in (
        (None, "devices"),
        ("connect", "connected"),
        ("connect", "synced"),
        ("telemetry", "expected"),
        ("telemetry", "generated"),
    ):
        got = merged[key] if section is None else merged[section][key]
        want = single[key] if section is None else single[section][key]
        assert got == want, (section, key)
    assert merged["lost"]["watcher"]["unique"] == single["lost"]["watcher"]["unique"]
    assert merged["lost"]["watcher"]["lost"] == 0
    assert merged["latency"]["histogram_us"]["count"] == DEVICES * PER_DEVICE
    assert [s["index"] for s in merged["shards"]] == [0, 1]

    # The merged percentiles are those of the union of the shards' histograms...
    union = Histogram()
    for shard in shards:
        union.merge(Histogram.from_json(shard["latency"]["histogram_us"]))
    assert merged["latency"]["p99_ms"] == union.summary_ms()["p99_ms"]
    assert merged["latency"]["max_ms"] == max(s["latency"]["max_ms"] for s in shards)
    # ...and close to one run's (same machine, same load; generous for a shared machine).
    for key in ("p50_ms", "p99_ms"):
        assert abs(merged["latency"][key] - single["latency"][key]) < max(
            250.0, single["latency"][key]
        ), key
    assert abs(merged["connect"]["p50_ms"] - single["connect"]["p50_ms"]) < max(
        1000.0, 2 * single["connect"]["p50_ms"]
    )


def test_merge_refuses_reports_of_different_runs(tmp_path: Path) -> None:
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"format": "nope"}))
    result = run_iotref("fleet", "merge", str(a))
    assert result.returncode == 1
    assert "iotref-fleet-report/1" in result.stderr


def test_sandbox_info_is_read_from_the_data_dir(sandbox: SandboxProcess) -> None:
    info = SandboxInfo.load(sandbox.data_dir / "sandbox.json")
    assert info.http_url == sandbox.http_url
    assert info.platform_mqtt_port > 0
    assert info.operator_cert.exists()


def test_bulk_route_needs_the_admin_token_and_good_csrs(sandbox: SandboxProcess) -> None:
    with sandbox.http() as http:
        assert http.post("/admin/things/bulk", json={"devices": []}).status_code == 401
        admin = sandbox.admin_headers
        empty = http.post("/admin/things/bulk", json={"devices": []}, headers=admin)
        assert empty.status_code == 400
        bad = http.post(
            "/admin/things/bulk",
            json={"devices": [{"certificateSigningRequest": "not a csr"}]},
            headers=admin,
        )
        assert bad.status_code == 400
        assert "devices[0]" in bad.json()["error_description"]
        site = http.post(
            "/admin/things/bulk",
            json={"siteId": "nope", "devices": [{"certificateSigningRequest": "x"}]},
            headers=admin,
        )
        assert site.status_code == 422


def test_contexts_built_without_the_system_store_still_verify_the_broker(
    single_run: dict[str, Any], store_root: Path, tmp_path: Path
) -> None:
    """Skipping the system CA bundle must not mean trusting anything: with the device's
    own CA file the broker is trusted, with another CA it is refused."""
    store = store_root / "local" / device_name(3)
    props = json.loads((store / "properties.json").read_text())

    def settings(ca: Path, suffix: str) -> ConnectionSettings:
        return ConnectionSettings(
            endpoint=props["mqtt_endpoint"],
            port=props["mqtt_port"],
            client_id=f"{props['client_id']}-{suffix}",
            cert_path=store / CERTIFICATE_FILE,
            key_path=store / PRIVATE_KEY_FILE,
            ca_path=ca,
            connect_timeout_s=5.0,
            fail_fast=False,
        )

    async def connect(s: ConnectionSettings) -> None:
        with without_system_trust_store():
            context = build_tls_context(s)
        connection = Connection(s, tls_context=context)
        await connection.start()
        assert connection.connected
        await connection.stop()

    asyncio.run(connect(settings(store / ROOT_CA_FILE, "own-ca")))
    with pytest.raises(ConnectionFailed) as failed:
        asyncio.run(
            connect(settings(self_signed(tmp_path, "not the sandbox's CA", ca=True)[0], "other-ca"))
        )
    assert failed.value.kind == "tls"
