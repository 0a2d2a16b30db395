"""Valid Status v2 messages that carry a running index (as the production counter), so a
test can tell which message arrived, in which order and how often."""

from __future__ import annotations

from typing import Any

from iotref.device.messages import (
    Asset,
    DeviceStatusV2,
    Sender,
    SenderType,
    StatusV2,
    build_message,
)

SENDER = Sender(SenderType.PRESS, "counted-test", "1.0")


def status_message(asset: Asset, index: int, sender: Sender = SENDER) -> dict[str, Any]:
    """A valid Status v2 message carrying ``index`` as its total production counter."""
    return build_message(
        sender,
        asset,
        StatusV2(
            status=DeviceStatusV2.PRODUCTION,
            speed=1000,
            totalproductioncounter=index,
            statusdetails="running",
        ),
    )


def index_of(message: dict[str, Any]) -> int:
    return int(message["payload"]["signalstatus"]["deviceinfo"]["totalproductioncounter"])
