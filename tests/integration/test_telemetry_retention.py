"""Telemetry retention through the real sandbox: with ``--telemetry-max-messages 3`` the
monitor keeps only the newest three messages while its counters go on counting all."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from bench.bench_ingestion import device_messages

from iotref.sandbox.broker.config import TELEMETRY_TOPIC
from tests.support.mqtt_probe import device_probe
from tests.support.sandbox_process import SandboxProcess
from tests.support.tokens import provision_device

pytestmark = pytest.mark.integration

LIMIT = 3


def admin(sandbox: SandboxProcess) -> httpx.Client:
    return sandbox.http(headers={"Authorization": f"Bearer {sandbox.admin_token}"})


def get(sandbox: SandboxProcess, path: str) -> dict[str, Any]:
    with admin(sandbox) as http:
        answer = http.get(path)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def wait_for(probe: Callable[[], dict[str, Any]], done: Callable[[dict[str, Any]], bool]) -> Any:
    """Poll until ``done`` (a generous deadline only guards against hanging)."""
    deadline = time.monotonic() + 30
    while True:
        state = probe()
        if done(state) or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def test_stored_messages_stay_at_the_limit_while_counters_go_on(
    sandbox_factory: Callable[..., SandboxProcess],
) -> None:
    sandbox = sandbox_factory("--auto-approve", "--telemetry-max-messages", str(LIMIT))
    device = provision_device(sandbox)
    topic = f"{TELEMETRY_TOPIC}/{device.org_id}/{device.client_id}"
    payloads = device_messages(12, "retention")
    uuids = [json.loads(p)["sendereventuuid"] for p in payloads]
    device_path = f"/monitor/api/devices/{device.client_id}"
    summary = get(sandbox, "/monitor/api/summary")
    assert summary["retention"] == {
        "max_messages": LIMIT,
        "max_age_seconds": 7 * 24 * 3600,
        "pruned": 0,
        "prune_passes": summary["retention"]["prune_passes"],
    }

    with device_probe(sandbox, device) as probe:
        for round_, (start, end) in enumerate(((0, 8), (8, 12)), start=1):
            for payload in payloads[start:end]:
                assert probe.publish(topic, payload) == 0

            def settled(state: dict[str, Any], end: int = end) -> bool:
                return bool(state["received"] >= end and len(state["messages"]) <= LIMIT)

            state = wait_for(lambda: get(sandbox, device_path), settled)
            assert (state["received"], state["valid"], state["duplicates"]) == (end, end, 0)
            kept = [m["sendereventuuid"] for m in state["messages"]]
            assert kept == list(reversed(uuids[end - LIMIT : end])), round_
            summary = get(sandbox, "/monitor/api/summary")
            assert summary["totals"]["received"] == end
            assert summary["totals"]["stored"] == end
            assert summary["retention"]["pruned"] == end - LIMIT

    log = (sandbox.data_dir / "logs" / "sandbox.log").read_text()
    assert "telemetry retention: pruned" in log
