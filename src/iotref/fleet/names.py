"""Device names and shards: which devices a fleet has, which of them one process runs,
and how many messages each sends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

DEVICE_PREFIX: Final = "fleet"


def device_name(index: int) -> str:
    """The deterministic name of device ``index``: ``fleet-000042``. It names the
    device's store folder and its machine."""
    return f"{DEVICE_PREFIX}-{index:06d}"


@dataclass(frozen=True)
class Shard:
    """One slice of the fleet: the devices ``i`` with ``i % count == index``."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"invalid shard {self.index}/{self.count}: need 0 <= I < N")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` (e.g. ``"0/2"``)."""
        index, sep, count = text.partition("/")
        try:
            if not sep:
                raise ValueError
            return cls(int(index), int(count))
        except ValueError:
            raise ValueError(f"shard {text!r} is not I/N with 0 <= I < N") from None

    def indices(self, devices: int) -> list[int]:
        """The device indices of this shard in a fleet of ``devices``."""
        return list(range(self.index, devices, self.count))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def messages_per_device(rate: float, duration_s: float) -> int:
    """How many messages each device sends: ``round(rate * duration)``, at least one."""
    return max(1, round(rate * duration_s))
