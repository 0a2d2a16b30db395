"""What one fleet run is asked to do (:class:`FleetOptions`) and its defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from iotref.fleet.names import Shard, messages_per_device
from iotref.protocol import limits

DEFAULT_CONNECT_CONCURRENCY: Final = 100
DEFAULT_CONNECT_RATE: Final = 100.0
"""Connection attempts a second of the whole run (first connects and reconnects), under
the account-level quota of AWS IoT Core ("Connect requests per second per account": 500,
adjustable, lower in some regions), leaving the rest of it to the account's other devices
and to other shards run at the same time; docs/fleet.md."""
DEFAULT_CONNECT_TIMEOUT_S: Final = 60.0
DEFAULT_SYNC_TIMEOUT_S: Final = 60.0
DEFAULT_DRAIN_TIMEOUT_S: Final = 60.0
SETTLED_AFTER_S: Final = 5.0
"""At the end of a run, a count of what arrived that has not changed for this long is
final (watchers, monitor)."""


@dataclass(frozen=True)
class FleetOptions:
    """One run: how many devices (in the whole fleet), which shard, how fast, how long."""

    devices: int
    rate: float
    """Messages per device per second."""
    duration_s: float
    shard: Shard = field(default_factory=Shard)
    store_root: Path = Path("certificate_store") / "fleet"
    connect_concurrency: int = DEFAULT_CONNECT_CONCURRENCY
    connect_rate: float = DEFAULT_CONNECT_RATE
    """Connection attempts a second of all devices together (0: not limited)."""
    publish_rate_limit: float | None = float(limits.PUBLISH_REQUESTS_PER_SECOND_PER_CONNECTION)
    """Each device's publish quota, paced as a single device's (``None``: not paced)."""
    throughput_limit: int | None = limits.THROUGHPUT_BYTES_PER_SECOND_PER_CONNECTION
    """Each device's throughput quota in bytes a second (``None``: not paced)."""
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    sync_timeout_s: float = DEFAULT_SYNC_TIMEOUT_S
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    shadow_timeout_s: float = 15.0
    keepalive_s: int = 60
    watchers: int = 1
    site: str | None = None
    bulk: bool = True
    seed: int | None = None
    tune_malloc: bool = False
    """Apply :func:`~iotref.fleet.memory.tune_malloc` (process-wide) before connecting;
    ``iotref fleet`` does, since the simulator is the whole process there."""

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ValueError("devices must be at least 1")
        if not self.rate > 0 or not self.duration_s > 0:
            raise ValueError("rate and duration must be positive")
        if self.connect_concurrency < 1:
            raise ValueError("connect concurrency must be at least 1")
        if not self.connect_rate >= 0:
            raise ValueError("connect rate must be 0 (not limited) or more")

    @property
    def messages_per_device(self) -> int:
        return messages_per_device(self.rate, self.duration_s)
