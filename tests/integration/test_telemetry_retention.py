"""Telemetry retention through the real sandbox: with ``--telemetry-max-messages 3`` the
monitor keeps only the newest three messages while its counters go on counting all."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from bench.bench_ingestion import device_messages

from tests.support.monitor_api import device_record, monitor_get
from tests.support.mqtt_probe import device_probe, device_topic
from tests.support.sandbox_process import SandboxProcess
from tests.support.tokens import provision_device
from tests.support.waiting import poll

pytestmark = pytest.mark.integration

LIMIT = 3


def test_stored_messages_stay_at_the_limit_while_counters_go_on(
    sandbox_factory: Callable[..., SandboxProcess],
) -> None:
    sandbox = sandbox_factory("--auto-approve", "--telemetry-max-messages", str(LIMIT))
    device = provision_device(sandbox)
    topic = device_topic(device)
    payloads = device_messages(12, "retention")
    uuids = [json.loads(p)["sendereventuuid"] for p in payloads]
    summary = monitor_get(sandbox, "summary")
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

            state = poll(
                lambda: device_record(sandbox, device.client_id), settled, 30, interval=0.2
            )
            assert (state["received"], state["valid"], state["duplicates"]) == (end, end, 0)
            kept = [m["sendereventuuid"] for m in state["messages"]]
            assert kept == list(reversed(uuids[end - LIMIT : end])), round_
            summary = monitor_get(sandbox, "summary")
            assert summary["totals"]["received"] == end
            assert summary["totals"]["stored"] == end
            assert summary["retention"]["pruned"] == end - LIMIT

    log = (sandbox.data_dir / "logs" / "sandbox.log").read_text()
    assert "telemetry retention: pruned" in log
