"""Draining a backlog at the platform's publish quota, as shipped.

A machine that was offline has 20,000 messages in its outbox (committed while offline, by
the library, into the real SQLite outbox of a certificate store made by the onboarding
library). Then ``iotref run --stdin`` starts on that store with every default (the
sandbox's environment file, whose ``PUBLISH_RATE_LIMIT`` is the quota it measures: 100),
in a process of its own, and drains the backlog.

Counted on the platform side, never by the device:

- an independent subscriber (paho, the sandbox operator's identity, in this process)
  stamps every publish of the device as it arrives, its telemetry and its shadow requests
  (both count against the per-connection quota): publishes a second over the whole drain
  against the quota (goal >= 95 %), and the one-second windows (wall-clock seconds, as the
  platform's meter counts them) above the quota (goal 0); beside them the busiest such
  second and the busiest one-second interval wherever it starts;
- the sandbox's own quota meter (``GET /monitor/api/devices/{clientId}``): what AWS IoT
  Core would have throttled (goal 0) and its seconds over the quota.

Messages lost (fed minus arrived, goal 0) and what is left in the outbox come with them.
"""

from __future__ import annotations

import subprocess
import time

from tests.support.arrivals import ArrivalRecorder, count_windows
from tests.support.cli_process import start_iotref
from tests.support.counted_messages import queue_offline, telemetry_topic_of
from tests.support.monitor_api import device_record
from tests.support.onboarding import client_id_of, logged_in, provision_store

from bench.harness import BenchContext, Figure
from iotref.device.connection.rate_limit import pacing
from iotref.device.telemetry.messages import Asset, AssetType, Sender, SenderType
from iotref.device.telemetry.outbox import OUTBOX_FILE_NAME, Outbox
from iotref.protocol import limits

BACKLOG = 20_000
QUOTA = limits.PUBLISH_REQUESTS_PER_SECOND_PER_CONNECTION
SENDER = Sender(SenderType.PRESS, "bench-drain", "1.0")
TIMEOUT_S = 600.0


def run(ctx: BenchContext) -> list[Figure]:
    sandbox = ctx.sandbox()
    info = dict(sandbox.info)
    env, tokens = logged_in(sandbox, ctx.workdir / "drain-tokens")
    store = provision_store(env, tokens, ctx.workdir / "drain-store")
    client_id = client_id_of(store)
    outbox = store / OUTBOX_FILE_NAME
    asset = Asset("drain-press", "SN-DRAIN", AssetType.SHEETFED_PRESS)
    assert queue_offline(outbox, asset, BACKLOG, SENDER) == BACKLOG

    with ArrivalRecorder(info, client_id, telemetry_topic_of(outbox)) as recorder:
        proc = start_iotref(
            "run", "--env-file", info["env_file"], "--store", str(store), "--stdin",
            "--status-every", "10",
            stdin=subprocess.PIPE,
        )  # fmt: skip
        try:
            got = recorder.wait_for(set(range(BACKLOG)), timeout=TIMEOUT_S)
            out, err = proc.communicate("", timeout=60)  # end of input: the run stops
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        arrivals = recorder.snapshot()
    if proc.returncode != 0:
        raise RuntimeError(f"iotref run exited {proc.returncode}: {err[-2000:]}")
    time.sleep(1.5)  # the meter's last second closes
    meter = device_record(sandbox, client_id)["quota"]
    with Outbox(outbox) as box:
        left = box.depth

    windows = count_windows([a.at for a in arrivals], QUOTA)
    telemetry = count_windows(
        [a.at for a in arrivals if a.topic == recorder.telemetry_topic], QUOTA
    )
    lost = BACKLOG - len(set(got))
    duplicates = len(got) - len(set(got))
    drained = [
        part.strip()
        for line in out.splitlines()
        for part in line.split("|")
        if part.strip().startswith("draining ")
    ]
    pace, burst = pacing(QUOTA)
    note = (
        f"{BACKLOG} msgs queued offline, then iotref run with the defaults (pace "
        f"{pace:g}/s, burst {burst:g}); counted by an independent subscriber over "
        f"{windows.span_s:.0f} s"
    )
    return [
        Figure("drain.rate", windows.rate, "publishes/s", note),
        Figure(
            "drain.rate_of_quota",
            windows.rate / QUOTA,
            "ratio",
            f"publishes a second / the quota ({QUOTA}); goal >= 0.95",
        ),
        Figure(
            "drain.telemetry_rate",
            telemetry.rate,
            "msg/s",
            f"telemetry alone ({telemetry.publishes} arrivals, {duplicates} duplicates)",
        ),
        Figure(
            "drain.seconds_over_quota",
            windows.seconds_over,
            "windows",
            f"wall-clock seconds with more than {QUOTA} publishes, by the subscriber; goal 0",
        ),
        Figure(
            "drain.busiest_second",
            windows.busiest_second,
            "publishes",
            "the most publishes in one wall-clock second, by the subscriber",
        ),
        Figure(
            "drain.busiest_sliding_second",
            windows.busiest_sliding_second,
            "publishes",
            "the most publishes in any one-second interval, by the subscriber "
            "(arrival times: the subscriber's own delays included)",
        ),
        Figure(
            "drain.meter_throttled",
            meter["throttled"],
            "publishes",
            "the sandbox's quota meter: what AWS IoT Core would have throttled; goal 0",
        ),
        Figure(
            "drain.meter_seconds_over",
            meter["seconds_over"],
            "windows",
            f"the sandbox's quota meter; peak {meter['peak_rate']}/s",
        ),
        Figure(
            "drain.lost",
            lost,
            "messages",
            f"fed {BACKLOG}, arrived {len(set(got))}, left in the outbox {left}",
        ),
        Figure(
            "drain.status_lines",
            len(drained),
            "lines",
            "iotref run status lines (every 10 s) showing the drain; the first: "
            + (drained[0] if drained else "none"),
        ),
    ]
