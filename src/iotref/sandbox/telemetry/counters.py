"""What the monitor counts per device as messages are stored (kept in memory, saved in
``telemetry_devices``): received, valid, invalid and duplicate messages, the latest values
and a per-second series of the last minutes."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

RATE_WINDOW_SECONDS = 600
"""How far back the per-second message-rate series reach (kept in memory)."""

DEVICE_COLUMNS = (
    "client_id",
    "org_id",
    "topic_problem",
    "received",
    "valid",
    "invalid",
    "duplicates",
    "first_seen",
    "last_seen",
    "last_status",
    "last_speed",
    "last_productioncounter",
    "last_totalproductioncounter",
    "last_assettimestamp",
)


@dataclass(slots=True)
class DeviceCounters:
    """What the monitor knows about one device (by the client id in the topic)."""

    client_id: str
    org_id: str | None = None
    topic_problem: str | None = None
    received: int = 0
    valid: int = 0
    invalid: int = 0
    duplicates: int = 0
    first_seen: float | None = None
    last_seen: float | None = None
    last_status: str | None = None
    last_speed: float | None = None
    last_productioncounter: float | None = None
    last_totalproductioncounter: float | None = None
    last_assettimestamp: str | None = None
    rate: deque[list[int]] = field(default_factory=deque)  # [second, count] pairs

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in DEVICE_COLUMNS}

    def row(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in DEVICE_COLUMNS)


def bump_rate(rate: deque[list[int]], second: int, count: int = 1) -> None:
    """Add ``count`` to the per-second series ``rate`` and forget what is too old."""
    if rate and rate[-1][0] == second:
        rate[-1][1] += count
    else:
        rate.append([second, count])
    while rate and rate[0][0] <= second - RATE_WINDOW_SECONDS:
        rate.popleft()


def rate_series(rate: Iterable[list[int]], now: float, seconds: int) -> list[list[int]]:
    """The last ``seconds`` whole seconds before ``now`` as ``[second, count]``, gaps as 0."""
    end = int(now)
    start = end - seconds + 1
    counts = {sec: n for sec, n in rate if start <= sec <= end}
    return [[sec, counts.get(sec, 0)] for sec in range(start, end + 1)]
