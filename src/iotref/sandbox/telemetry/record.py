"""A received telemetry message, parsed and checked
(:mod:`~iotref.sandbox.telemetry.record_builder`): what the ingestion stores, counts and
shows on the live stream."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Record:
    """One received message, parsed and checked, ready to be stored."""

    received_at: float
    topic: str
    client_id: str
    org_id: str | None
    topic_problem: str | None
    sendereventuuid: str | None
    valid: bool
    errors: list[dict[str, str]] | None
    eventtype: str | None
    eventsubtype: str | None
    payloadversion: int | None
    assetid: str | None
    assettimestamp: str | None
    status: str | None
    speed: float | None
    productioncounter: float | None
    totalproductioncounter: float | None
    body: bytes

    def row(self) -> tuple[Any, ...]:
        return (
            self.received_at,
            self.topic,
            self.client_id,
            self.org_id,
            self.topic_problem,
            self.sendereventuuid,
            1 if self.valid else 0,
            json.dumps(self.errors) if self.errors else None,
            self.eventtype,
            self.eventsubtype,
            self.payloadversion,
            self.assetid,
            self.assettimestamp,
            self.status,
            self.speed,
            self.productioncounter,
            self.totalproductioncounter,
            self.body,
        )
