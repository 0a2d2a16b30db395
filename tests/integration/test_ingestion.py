"""Telemetry ingestion against the real sandbox: duplicates are stored once and counted,
invalid messages are kept with their reasons, a message on another organization's topic
never gets in, and 100,000 messages from several devices are all counted."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from bench.bench_ingestion import Job, device_messages, publish_all

from iotref.sandbox.broker.config import TELEMETRY_TOPIC
from tests.support.monitor_api import device_record, monitor_get
from tests.support.mqtt_probe import device_probe, device_topic, operator_probe
from tests.support.sandbox_process import SandboxProcess
from tests.support.tokens import provision_device
from tests.support.waiting import poll

pytestmark = pytest.mark.integration


def totals(sandbox: SandboxProcess) -> dict[str, int]:
    result: dict[str, int] = monitor_get(sandbox, "summary")["totals"]
    return result


def wait_device(
    sandbox: SandboxProcess, client_id: str, received: int, timeout: float = 20
) -> dict[str, Any]:
    """The device's record once ``received`` messages are counted (or the last one read;
    a device the monitor does not know yet has received none)."""

    def state() -> dict[str, Any]:
        try:
            return device_record(sandbox, client_id)
        except AssertionError:
            return {"received": 0}

    return poll(state, lambda s: s.get("received", 0) >= received, timeout, interval=0.1)


def test_duplicates_are_stored_once_and_counted(sandbox: SandboxProcess) -> None:
    device = provision_device(sandbox)
    topic = device_topic(device)
    first, second = device_messages(2, "dup")
    with device_probe(sandbox, device) as probe:
        for payload in (first, first, second, first, second):
            assert probe.publish(topic, payload) == 0
    state = wait_device(sandbox, device.client_id, 5)
    assert (state["received"], state["valid"], state["invalid"], state["duplicates"]) == (
        5,
        2,
        0,
        3,
    )
    uuids = [m["sendereventuuid"] for m in state["messages"]]
    assert sorted(uuids) == sorted(json.loads(p)["sendereventuuid"] for p in (first, second))


def test_invalid_messages_are_kept_with_path_and_reason(sandbox: SandboxProcess) -> None:
    device = provision_device(sandbox)
    topic = device_topic(device)
    doc = json.loads(device_messages(1, "bad")[0])
    doc["payload"]["signalstatus"]["deviceinfo"]["status"] = "Dancing"
    with device_probe(sandbox, device) as probe:
        assert probe.publish(topic, json.dumps(doc)) == 0
        assert probe.publish(topic, b"{oops") == 0
    state = wait_device(sandbox, device.client_id, 2)
    assert (state["received"], state["valid"], state["invalid"]) == (2, 0, 2)
    invalid = [m for m in state["messages"] if not m["valid"]]
    paths = {e["path"] for m in invalid for e in m["errors"]}
    assert "$.payload.signalstatus.deviceinfo.status" in paths
    assert "$" in paths
    assert all(e["reason"] for m in invalid for e in m["errors"])
    with sandbox.admin_http() as http:
        body = http.get(f"/monitor/api/messages/{invalid[-1]['id']}").json()
    assert body["body"] in (json.dumps(doc), "{oops")


def test_a_message_to_another_organization_is_refused_and_not_stored(
    sandbox: SandboxProcess,
) -> None:
    device = provision_device(sandbox)
    own = device_topic(device)
    foreign = f"{TELEMETRY_TOPIC}/not-my-org/{device.client_id}"
    with (
        device_probe(sandbox, device) as probe,
        operator_probe(sandbox) as watcher,
    ):
        assert watcher.subscribe(f"{TELEMETRY_TOPIC}/not-my-org/#", own) == [1, 1]
        assert probe.publish(foreign, device_messages(1, "foreign")[0]) == 0x87  # not authorized
        marker = device_messages(1, "marker")[0]
        assert probe.publish(own, marker) == 0
        assert watcher.wait_for(own).payload == marker
        assert watcher.received_on(foreign, within=0.3) == []
    # the platform's store has the marker and nothing else of this device
    state = wait_device(sandbox, device.client_id, 1)
    time.sleep(0.5)  # anything that would follow the marker has had time to be stored
    state = device_record(sandbox, device.client_id)
    assert (state["received"], state["valid"], state["invalid"]) == (1, 1, 0)
    assert [m["topic"] for m in state["messages"]] == [own]


def test_100k_messages_from_several_senders_are_all_counted(sandbox: SandboxProcess) -> None:
    senders = 4
    per_sender = 25_000
    devices = [provision_device(sandbox) for _ in range(senders)]
    jobs = []
    for index, device in enumerate(devices):
        topic = device_topic(device)
        payloads = device_messages(per_sender, str(index))
        jobs.append(
            Job(
                sandbox.info["ca_file"],
                device.cert_path,
                device.key_path,
                device.client_id,
                topic,
                payloads,
            )
        )
    before = totals(sandbox)
    outcomes = publish_all(sandbox.mqtt_port, jobs, timeout=60).outcomes
    assert [o.error for o in outcomes] == [None] * senders
    assert [o.acked for o in outcomes] == [per_sender] * senders
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        now = totals(sandbox)
        if now["received"] - before["received"] >= senders * per_sender:
            break
        time.sleep(0.2)
    assert now["received"] - before["received"] == senders * per_sender
    assert now["stored"] - before["stored"] == senders * per_sender
    assert now["duplicates"] == before["duplicates"]
    for device in devices:
        state = device_record(sandbox, device.client_id)
        assert (state["received"], state["valid"], state["invalid"]) == (per_sender, per_sender, 0)
        assert state["last_productioncounter"] == per_sender - 1
