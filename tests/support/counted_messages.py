"""Valid Status v2 messages that carry a running index (as the production counter), so a
test can tell which message arrived, in which order and how often; and a backlog of them
committed to a device's outbox while it is offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from iotref.device.telemetry.messages import (
    Asset,
    DeviceStatusV2,
    Sender,
    SenderType,
    StatusV2,
    build_message,
    to_json,
)
from iotref.device.telemetry.outbox import Outbox
from iotref.device.telemetry.outbox_records import OutboxEntry
from iotref.protocol.topics import telemetry_topic

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


def queue_offline(outbox_path: Path, asset: Asset, count: int, sender: Sender = SENDER) -> int:
    """Commit ``count`` counted messages (indices 0..count-1) to the outbox at
    ``outbox_path`` as a device that was offline would have (nothing is published); the
    outbox's depth afterwards."""
    topic = telemetry_topic_of(outbox_path)
    with Outbox(outbox_path, max_messages=max(count * 2, 100_000)) as outbox:
        for first in range(0, count, 1000):
            outbox.append_many(
                [
                    OutboxEntry(topic, to_json(message), message["sendereventuuid"])
                    for message in (
                        status_message(asset, i, sender)
                        for i in range(first, min(count, first + 1000))
                    )
                ]
            )
        return outbox.depth


def telemetry_topic_of(outbox_path: Path) -> str:
    """The telemetry topic of the device whose certificate store holds ``outbox_path``."""
    props = json.loads((outbox_path.parent / "properties.json").read_text())
    return telemetry_topic(props["telemetry_topic"], props["org_id"], props["client_id"])
