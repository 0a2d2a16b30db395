"""A mergeable log-linear histogram, for connect times and latencies that shard reports
can merge without losing their percentiles."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final


class Histogram:
    """A mergeable log-linear histogram of non-negative integers (microseconds here).

    Values below 128 are counted exactly; above, each power of two is split into 64
    buckets, so a reported percentile is within 1.6 % of the true value. ``min``, ``max``,
    ``count`` and ``sum`` are exact. Shard reports store the buckets, so merged percentiles
    are as good as those of one big run.
    """

    SUB_BITS: Final = 7
    _HALF: Final = 1 << (SUB_BITS - 1)
    _FULL: Final = 1 << SUB_BITS

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.total = 0
        self.min: int | None = None
        self.max: int | None = None

    @classmethod
    def bucket_of(cls, value: int) -> int:
        """The bucket index of ``value`` (>= 0)."""
        if value < cls._FULL:
            return value
        shift = value.bit_length() - cls.SUB_BITS
        return shift * cls._HALF + (value >> shift)

    @classmethod
    def bucket_range(cls, index: int) -> tuple[int, int]:
        """The smallest and largest value of bucket ``index``."""
        if index < cls._FULL:
            return index, index
        shift = index // cls._HALF - 1
        mantissa = index - shift * cls._HALF
        return mantissa << shift, ((mantissa + 1) << shift) - 1

    def record(self, value: float, times: int = 1) -> None:
        """Count ``value`` (rounded; negative values count as 0) ``times`` times."""
        v = max(0, round(value))
        index = self.bucket_of(v)
        self.buckets[index] = self.buckets.get(index, 0) + times
        self.count += times
        self.total += v * times
        if self.min is None or v < self.min:
            self.min = v
        if self.max is None or v > self.max:
            self.max = v

    def merge(self, other: Histogram) -> None:
        """Add ``other``'s counts to this one."""
        for index, n in other.buckets.items():
            self.buckets[index] = self.buckets.get(index, 0) + n
        self.count += other.count
        self.total += other.total
        if other.min is not None and (self.min is None or other.min < self.min):
            self.min = other.min
        if other.max is not None and (self.max is None or other.max > self.max):
            self.max = other.max

    def percentile(self, q: float) -> float | None:
        """The ``q``-th percentile (0..100): the middle of the bucket holding the value of
        rank ``ceil(q/100 * count)``, clamped to the exact min and max. ``None`` if empty."""
        if self.count == 0 or self.min is None or self.max is None:
            return None
        rank = max(1, math.ceil(q * self.count / 100.0 - 1e-9))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                low, high = self.bucket_range(index)
                return float(min(max((low + high) / 2, self.min), self.max))
        return float(self.max)

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def to_json(self) -> dict[str, Any]:
        return {
            "sub_bucket_bits": self.SUB_BITS,
            "count": self.count,
            "sum": self.total,
            "min": self.min,
            "max": self.max,
            "buckets": [[i, n] for i, n in sorted(self.buckets.items())],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Histogram:
        hist = cls()
        if not data:
            return hist
        if data.get("sub_bucket_bits", cls.SUB_BITS) != cls.SUB_BITS:
            raise ValueError("histogram with another bucket layout")
        for index, n in data.get("buckets", []):
            hist.buckets[int(index)] = hist.buckets.get(int(index), 0) + int(n)
        hist.count = int(data.get("count", sum(hist.buckets.values())))
        hist.total = int(data.get("sum", 0))
        hist.min = None if data.get("min") is None else int(data["min"])
        hist.max = None if data.get("max") is None else int(data["max"])
        return hist

    def summary_ms(self) -> dict[str, float | None]:
        """p50 / p99 / max / mean in milliseconds (from microsecond values)."""

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value / 1000.0, 3)

        return {
            "p50_ms": ms(self.percentile(50)),
            "p99_ms": ms(self.percentile(99)),
            "max_ms": ms(None if self.max is None else float(self.max)),
            "mean_ms": ms(self.mean),
        }
