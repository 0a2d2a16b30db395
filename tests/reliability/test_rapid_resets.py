"""A shop-floor network that resets young connections several times a minute: the device
must keep reconnecting, not conclude that another process took its identity over."""

from __future__ import annotations

import asyncio
import time

import pytest

from iotref.device.connection.connection import Connection
from iotref.device.connection.state import ConnectionEvent, ConnectionState
from tests.reliability.harness import Platform
from tests.reliability.scenarios import connection_settings
from tests.support.device_keys import DeviceFiles
from tests.support.fault_proxy import FaultProxy
from tests.support.figures import record

pytestmark = pytest.mark.integration

RESETS = 4


def test_rapid_resets_are_not_mistaken_for_a_takeover(
    platform: Platform, device: DeviceFiles
) -> None:
    events: list[ConnectionEvent] = []

    async def main() -> None:
        with FaultProxy(platform.process.mqtt_port) as proxy:
            settings = connection_settings(platform, device, proxy.port)
            async with Connection(settings, on_event=events.append) as conn:
                for _ in range(RESETS):
                    await conn.wait_connected(30)
                    await asyncio.sleep(1.0)
                    proxy.cut()
                    deadline = time.monotonic() + 5
                    while conn.connected and time.monotonic() < deadline:  # noqa: ASYNC110
                        await asyncio.sleep(0.02)
                await conn.wait_connected(30)
                assert conn.state is ConnectionState.CONNECTED

    try:
        asyncio.run(main())
        outcome = "reconnected after every reset"
    except Exception as exc:
        outcome = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        states = [e.state.value for e in events]
        record(
            "finding",
            {
                "name": "rapid network resets",
                "injected": f"{RESETS} proxy resets, each about 1 s after connecting",
                "outcome": outcome,
                "states": states,
            },
        )
