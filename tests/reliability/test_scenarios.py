"""Reliability scenarios against the real sandbox (see :mod:`tests.reliability.scenarios`):
under every fault, no accepted message is lost, first deliveries keep their order per
asset, duplicates stay what QoS 1 allows and the platform stores each message once, the
reported state ends equal to the desired state, and the device reconnects within its
backoff bound. ``IOTREF_SOAK=1`` runs them at soak size (``make reliability``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.reliability.harness import SIZE, Platform
from tests.reliability.scenarios import SCENARIOS, run_scenario
from tests.support.device_keys import DeviceFiles
from tests.support.figures import record

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

RUNS = int(os.environ.get("IOTREF_SOAK_RUNS", "1"))


@pytest.mark.parametrize("run", range(RUNS))
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(
    name: str, run: int, platform: Platform, device: DeviceFiles, tmp_path: Path
) -> None:
    result = run_scenario(name, platform, device, tmp_path, SIZE)
    record("scenario", result.to_json() | {"run": run})
    figures = result.to_json()
    assert result.sent > 0
    assert result.lost == 0, figures
    assert result.order_violations == 0, figures
    # QoS 1: duplicates come only from re-sending what was unacknowledged when a
    # connection was lost (the outbox rewinds, and awscrt re-sends its in-flight publishes
    # on a resumed session): none without a disconnect, and at most two more copies per
    # disconnect.
    disconnects = result.sender["disconnects"]
    if disconnects == 0:
        assert result.duplicates_delivered == 0, figures
    assert result.max_copies <= 1 + 2 * disconnects, figures
    if result.stored_available:
        assert result.stored_lost == 0, figures
        assert result.duplicates_stored == 0, figures
    assert result.final_reported_equals_desired, figures
    for fault in result.faults:
        if fault.reconnect_s is not None:
            assert fault.reconnect_s <= fault.bound_s, (fault, figures)
    # The sandbox-side faults all drop the connection; so must the cuts and stalls.
    dropping = {"cut", "stall", "broker-kill"} | {k for k in SCENARIOS[name] if "restart" in k}
    assert all(f.disconnected for f in result.faults if f.kind in dropping), figures
