"""AWS IoT Core's per-connection quotas against the real sandbox (Mosquitto, ingestion,
shadow service): a device publishing through the library's Connection as fast as it can
(the library has no pacing yet) is counted as AWS IoT Core would have throttled it, in the
device's record (``GET /monitor/api/devices/{clientId}``); a device under the quota shows
nothing throttled. Counted from outside the device: the platform's store and meter.

The shadow service's per-thing limits over MQTT (a burst of requests gets AWS's 429 on
``/rejected``); limits set through ``sandbox up`` options.
"""

from __future__ import annotations

import asyncio
import json
import queue
import time
from typing import Any

import httpx
import pytest
from bench.bench_ingestion import device_messages

from iotref.protocol import limits
from iotref.sandbox.quota_meter import ARRIVAL_SLACK_SECONDS
from tests.support import mqtt_probe
from tests.support.device_connection import publish_acknowledged
from tests.support.monitor_api import device_record, wait_received
from tests.support.sandbox_process import SandboxProcess
from tests.support.tokens import provision_device

pytestmark = pytest.mark.integration

BURST = 1000
QUOTA = limits.PUBLISH_REQUESTS_PER_SECOND_PER_CONNECTION


def test_a_device_over_the_publish_quota_is_counted_one_under_it_is_not(
    sandbox: SandboxProcess,
) -> None:
    fast, slow = provision_device(sandbox), provision_device(sandbox)
    started = time.monotonic()
    burst_s = asyncio.run(publish_acknowledged(sandbox, fast, device_messages(BURST, "fast")))
    fast_record = wait_received(sandbox, fast.client_id, BURST)
    arrival_bound_s = time.monotonic() - started  # every arrival fell within this
    asyncio.run(publish_acknowledged(sandbox, slow, device_messages(40, "slow"), pace_s=1 / 40))
    slow_record = wait_received(sandbox, slow.client_id, 40)

    quota = fast_record["quota"]
    assert fast_record["received"] == BURST  # the platform's store has them all
    assert quota["messages"] == BURST
    assert quota["publish_limit"] == QUOTA
    # The token bucket admits at most its capacity plus what the elapsed time refilled.
    capacity = QUOTA * (1 + ARRIVAL_SLACK_SECONDS)
    admitted_at_most = capacity + QUOTA * arrival_bound_s
    assert BURST - admitted_at_most <= quota["throttled"] <= BURST - int(capacity), (
        quota,
        burst_s,
        arrival_bound_s,
    )
    assert quota["throttled_bytes"] > 0
    assert quota["peak_rate"] > QUOTA
    assert quota["seconds_over"] >= 1
    summary = httpx.get(
        f"{sandbox.http_url}/monitor/api/summary",
        headers=sandbox.admin_headers,
        timeout=10,
    ).json()
    listed = {d["client_id"]: d for d in summary["devices"]}
    assert listed[fast.client_id]["quota"]["throttled"] == quota["throttled"]
    assert summary["limits"]["publish_rate"] == QUOTA

    under = slow_record["quota"]
    assert slow_record["received"] == 40
    assert under["messages"] == 40
    assert under["throttled"] == 0
    assert under["seconds_over"] == 0
    assert under["peak_rate"] <= QUOTA


def test_shadow_requests_count_against_the_connection_and_the_thing(
    sandbox: SandboxProcess,
) -> None:
    """A burst of 60 shadow gets: every one answered exactly once, the ones over the
    thing's limits with AWS's 429 (clientToken kept); the meter counts all 60."""
    device = provision_device(sandbox)
    base = f"$aws/things/{device.client_id}/shadow"
    with mqtt_probe.device_probe(sandbox, device) as probe:
        codes = probe.subscribe(f"{base}/get/accepted", f"{base}/get/rejected")
        assert all(code <= 1 for code in codes), codes
        for i in range(60):
            probe.publish(f"{base}/get", json.dumps({"clientToken": f"g{i}"}), qos=0)
        answers: dict[str, tuple[str, dict[str, Any]]] = {}
        deadline = time.monotonic() + 20
        while len(answers) < 60 and (left := deadline - time.monotonic()) > 0:
            try:
                message = probe.messages.get(timeout=left)
            except queue.Empty:
                break
            body = json.loads(message.payload)
            token = body["clientToken"]
            assert token not in answers, f"{token} answered twice"
            answers[token] = (message.topic.rsplit("/", 1)[1], body)
        assert not probe.received_on(f"{base}/get/accepted", within=0.5)  # nothing more
    assert len(answers) == 60
    throttled = [b for kind, b in answers.values() if kind == "rejected" and b["code"] == 429]
    accepted = [b for kind, b in answers.values() if kind == "accepted"]
    assert len(accepted) + len(throttled) == 60
    assert {b["message"] for b in throttled} == {"Too Many Requests"}
    # At most the bucket (20) plus what a few seconds refilled; at least the first ones.
    assert 1 <= len(accepted) <= limits.SHADOW_REQUESTS_PER_SECOND_PER_THING + 20 * 5
    assert len(throttled) >= 60 - limits.SHADOW_REQUESTS_PER_SECOND_PER_THING - 20 * 5
    record = device_record(sandbox, device.client_id)
    assert record["quota"]["messages"] == 60  # on the device's connection
    assert record["quota"]["throttled"] == 0  # 60 requests are within 100 a second


def test_limits_come_from_sandbox_up_options(sandbox_factory: Any) -> None:
    sandbox = sandbox_factory(
        "--auto-approve",
        "--publish-rate-limit",
        "10",
        "--shadow-rate-limit",
        "2",
        "--shadow-max-depth",
        "3",
    )
    summary = httpx.get(
        f"{sandbox.http_url}/monitor/api/summary",
        headers=sandbox.admin_headers,
        timeout=10,
    ).json()
    assert summary["limits"] == {
        "publish_rate": 10,
        "throughput": limits.THROUGHPUT_BYTES_PER_SECOND_PER_CONNECTION,
        "shadow_rate": 2,
        "shadow_in_flight": limits.SHADOW_IN_FLIGHT_REQUESTS_PER_THING,
        "shadow_state_bytes": limits.SHADOW_STATE_MAX_BYTES,
        "shadow_depth": 3,
    }
    device = provision_device(sandbox)
    asyncio.run(publish_acknowledged(sandbox, device, device_messages(50, "ten")))
    record = wait_received(sandbox, device.client_id, 50)
    assert record["quota"]["publish_limit"] == 10
    assert record["quota"]["throttled"] >= 50 - 10 * (1 + ARRIVAL_SLACK_SECONDS) - 10 * 5
    headers = sandbox.admin_headers
    url = f"{sandbox.http_url}/things/{device.client_id}/shadow"
    with httpx.Client(timeout=10, headers=headers) as http:
        deep = http.post(url, json={"state": {"reported": {"a": {"b": {"c": {"d": 1}}}}}})
        assert deep.status_code == 400
        assert deep.json()["message"] == "JSON contains too many levels of nesting; maximum is 3"
        time.sleep(1.2)  # the thing's bucket (2 requests) full again
        answers = [http.get(url) for _ in range(6)]
    statuses = [a.status_code for a in answers]
    assert statuses[:2] == [200, 200], statuses
    throttled = [a for a in answers if a.status_code == 429]
    assert len(throttled) >= 3, statuses  # 6 requests within far less than 2 s
    for answer in throttled:
        assert answer.headers["x-amzn-ErrorType"] == "ThrottlingException:"
        assert (answer.json()["code"], answer.json()["message"]) == (429, "Too Many Requests")
