"""The device stays inside AWS IoT Core's quotas with its shipped defaults, against the
real sandbox, counted from outside the device:

- A backlog queued while offline (600 messages) drains through ``iotref run`` with the
  defaults: an independent subscriber (the operator's identity) stamps every publish of
  the device, telemetry and shadow requests, as it arrives; no one-second window holds
  more than the quota (100), the sandbox's own quota meter counts nothing that AWS would
  have throttled, every message arrives (first deliveries in order) and the outbox is
  empty afterwards. Not timed: the drain rate is the benchmark's (``bench_drain``).
- The shadow service answers 429 to a thing that makes more than 20 shadow requests a
  second: a device that reports a new value and waits for it, 60 times in a row, meets
  those answers (seen by a subscriber of the service's ``update/rejected``), retries each
  report with backoff, and every value is accepted in the end, in order.

PUBACK 0x97 (quota exceeded): Mosquitto never sends it, and the sandbox measures the
publish quota instead of enforcing it, so the device's answer to it (slow down, publish the
message again) is tested in the unit tests only (``tests/unit/test_connection_quotas.py``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import time
from pathlib import Path

import pytest

from iotref.device.connection.connection import Connection
from iotref.device.shadow.sync import ShadowSync
from iotref.device.telemetry.messages import Asset, AssetType, Sender, SenderType
from iotref.device.telemetry.outbox import OUTBOX_FILE_NAME
from iotref.protocol import limits
from tests.support.arrivals import ArrivalRecorder, count_windows
from tests.support.cli_process import start_iotref
from tests.support.counted_messages import queue_offline, telemetry_topic_of
from tests.support.device_connection import device_settings
from tests.support.monitor_api import device_record
from tests.support.mqtt_probe import operator_probe
from tests.support.onboarding import client_id_of, outbox_depth
from tests.support.sandbox_process import SandboxProcess
from tests.support.shadow_rest import shadow_document
from tests.support.tokens import provision_device

pytestmark = pytest.mark.integration

QUOTA = limits.PUBLISH_REQUESTS_PER_SECOND_PER_CONNECTION
BACKLOG = 600
SENDER = Sender(SenderType.PRESS, "quota-test", "1.0")
CHANGES = 60


def test_a_backlog_drains_under_the_quota_and_nothing_is_lost(
    sandbox: SandboxProcess, store: Path
) -> None:
    client_id = client_id_of(store)
    outbox = store / OUTBOX_FILE_NAME
    asset = Asset("quota-press", "SN-QUOTA", AssetType.SHEETFED_PRESS)
    assert queue_offline(outbox, asset, BACKLOG, SENDER) == BACKLOG
    with ArrivalRecorder(sandbox.info, client_id, telemetry_topic_of(outbox)) as recorder:
        proc = start_iotref(
            "run", "--env-file", sandbox.info["env_file"], "--store", str(store),
            "--stdin", "--status-every", "1",
            stdin=subprocess.PIPE,
        )  # fmt: skip
        try:
            got = recorder.wait_for(set(range(BACKLOG)), timeout=120)
            out, err = proc.communicate("", timeout=60)  # end of input: the run stops
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        arrivals = recorder.snapshot()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    # Fed 600 while offline; all 600 arrived, first deliveries in order; none left.
    firsts = list(dict.fromkeys(got))
    assert sorted(firsts) == list(range(BACKLOG))
    assert all(b > a for a, b in itertools.pairwise(firsts)), "first deliveries out of order"
    assert outbox_depth(store) == 0
    # As the platform received them: no one-second window over the quota.
    windows = count_windows([a.at for a in arrivals], QUOTA)
    assert windows.publishes >= BACKLOG
    assert windows.seconds_over == 0 and windows.busiest_second <= QUOTA, windows
    # The sandbox's quota meter (fed by its ingestion and shadow service) agrees.
    quota = device_record(sandbox, client_id)["quota"]
    assert quota["messages"] >= BACKLOG
    assert quota["throttled"] == 0 and quota["seconds_over"] == 0, quota
    assert quota["peak_rate"] <= QUOTA, quota
    # iotref run said how it paces, and showed the drain while it lasted.
    assert "publishes paced at 96.9/s (quota 100/s)" in out, out
    assert any("| draining " in line and " left" in line for line in out.splitlines()), out
    print(
        f"{windows.publishes} publishes over {windows.span_s:.1f} s "
        f"({windows.rate:.1f}/s), busiest second {windows.busiest_second}, "
        f"busiest sliding second {windows.busiest_sliding_second}; meter {quota}"
    )


def test_throttled_shadow_reports_are_retried_until_every_value_is_taken(
    sandbox: SandboxProcess,
) -> None:
    dev = provision_device(sandbox)
    thing = dev.client_id
    settings = device_settings(sandbox.info, dev)
    with operator_probe(sandbox) as service:
        accepted_topic = f"$aws/things/{thing}/shadow/update/accepted"
        rejected_topic = f"$aws/things/{thing}/shadow/update/rejected"
        assert service.subscribe(accepted_topic, rejected_topic) == [1, 1]

        async def report_one_by_one() -> None:
            async with Connection(settings) as conn, ShadowSync(conn, thing) as sync:
                for i in range(CHANGES):
                    sync.set_reported("counter", i)
                    await sync.flush(60)  # taken by the service (after any retries)

        asyncio.run(report_one_by_one())
        time.sleep(1.0)  # the last answers on their way to the subscriber
        answers = service.drain()
    accepted = [json.loads(m.payload) for m in answers if m.topic == accepted_topic]
    rejected = [json.loads(m.payload) for m in answers if m.topic == rejected_topic]
    throttled = [r for r in rejected if r.get("code") == 429]
    assert throttled, "the device never met the shadow's request quota"
    assert len(throttled) == len(rejected), rejected  # nothing else was refused
    counters = [
        doc["state"]["reported"]["counter"]
        for doc in accepted
        if "counter" in doc.get("state", {}).get("reported", {})
    ]
    assert counters == list(range(CHANGES)), counters
    shadow = shadow_document(sandbox, thing)
    assert shadow["state"]["reported"]["counter"] == CHANGES - 1
    print(f"{CHANGES} reports, {len(throttled)} answered 429 and retried")
