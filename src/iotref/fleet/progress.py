"""A snapshot of a running fleet for the live display."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FleetProgress:
    """A snapshot for the live display."""

    phase: str
    devices: int
    provisioned: int
    connected: int
    synced: int
    failed: int
    generated: int
    acked: int
    outbox_depth: int
    platform_received: int | None
    msgs_per_s: float
    errors: int
    elapsed_s: float
    rss_mb: float
