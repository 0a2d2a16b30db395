"""What the sandbox's ingestion receives in unit tests of it and of the monitor: one known
device (its organization, client id and telemetry topic) and a valid message of it."""

from __future__ import annotations

from iotref.device.telemetry.messages import (
    Asset,
    AssetType,
    DeviceStatusV2,
    Sender,
    SenderType,
    StatusV2,
    build_message,
    to_json,
)

ORG = "org-1"
CLIENT = "iotref-0123456789abcdef0123"
TOPIC = f"connectprint/telemetry/{ORG}/{CLIENT}"


def message(speed: float = 100.0, counter: float = 1.0) -> bytes:
    """A valid Status v2 message (JSON) of a press running at ``speed``, ``counter`` as its
    production counter."""
    sender = Sender(SenderType.PRESS, "unit", "1.0")
    asset = Asset("press-1", "SN-1", AssetType.SHEETFED_PRESS)
    payload = StatusV2(
        status=DeviceStatusV2.PRODUCTION,
        speed=speed,
        totalproductioncounter=1000 + counter,
        productioncounter=counter,
    )
    return to_json(build_message(sender, asset, payload))
