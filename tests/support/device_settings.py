"""The device library's connection settings for a device of a running sandbox: its
endpoint, certificate, key and CA, everything else as shipped unless a test says."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from iotref.device.connection import ConnectionSettings
from tests.support.device_keys import DeviceFiles

QUICK_RETRY: dict[str, float] = {
    "connect_timeout_s": 5.0,
    "min_backoff_s": 0.1,
    "max_backoff_s": 1.0,
}
"""Shorter connect timeout and backoff, for tests of something other than reconnecting
(the shipped ones are tested in tests/reliability/test_shipped_defaults.py)."""


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
