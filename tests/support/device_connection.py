"""The device library's connection for a device of a running sandbox: its settings (the
endpoint, certificate, key and CA, everything else as shipped unless a test says), and
publishes through it that the broker acknowledges."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from iotref.device.connection.connection import Connection
from iotref.device.connection.settings import ConnectionSettings
from tests.support.device_keys import DeviceFiles
from tests.support.mqtt_probe import device_topic
from tests.support.sandbox_process import SandboxProcess

QUICK_RETRY: dict[str, float] = {
    "connect_timeout_s": 5.0,
    "min_backoff_s": 0.1,
    "max_backoff_s": 1.0,
}
"""Shorter connect timeout and backoff, for tests of something other than reconnecting
(the shipped ones are tested in tests/reliability/test_shipped_defaults.py)."""

UNPACED: dict[str, Any] = {"publish_rate_limit": None, "throughput_limit": None}
"""Publishes not paced to the platform's per-connection quota (100 a second), for what
measures raw cost or stands for a platform without that quota (the pace as shipped is
tested in tests/integration/test_device_quotas.py)."""


def device_settings(
    info: Mapping[str, Any],
    device: DeviceFiles,
    retry: Mapping[str, float] | None = None,
    **overrides: Any,
) -> ConnectionSettings:
    """Settings for ``device`` on the sandbox described by ``info`` (its ``sandbox.json``):
    the device listener, then ``retry`` (such as :data:`QUICK_RETRY`), then ``overrides``."""
    values: dict[str, Any] = {
        "endpoint": info["mqtt_host"],
        "port": int(info["mqtt_port"]),
        "client_id": device.client_id,
        "cert_path": device.cert_path,
        "key_path": device.key_path,
        "ca_path": Path(info["ca_file"]),
        **(retry or {}),
        **overrides,
    }
    return ConnectionSettings(**values)


async def publish_acknowledged(
    sandbox: SandboxProcess,
    device: DeviceFiles,
    payloads: Sequence[bytes],
    pace_s: float = 0.0,
    retry: Mapping[str, float] | None = QUICK_RETRY,
) -> float:
    """Publish ``payloads`` on the device's telemetry topic through the library's
    Connection (QoS 1, ``pace_s`` apart), each acknowledged; returns the seconds from the
    first publish to the last acknowledgement."""
    async with Connection(device_settings(sandbox.info, device, retry)) as conn:
        topic = device_topic(device)
        started = time.monotonic()
        pending = []
        for payload in payloads:
            pending.append(conn.publish_nowait(topic, payload))
            if pace_s:
                await asyncio.sleep(pace_s)
        await asyncio.gather(*pending)
        return time.monotonic() - started
