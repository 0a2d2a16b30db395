"""Retry pacing for the device runtime: capped exponential backoff with full jitter.

Owns the one backoff policy the runtime uses everywhere it waits before trying again: the
MQTT reconnect (:mod:`iotref.device.connection.reconnect`, which draws its delays here)
and the shadow requests that are retried after a timeout or a throttling answer
(:mod:`iotref.device.shadow.sync`).

Full jitter (AWS architecture blog, "Exponential Backoff and Jitter"): the n-th delay is
drawn uniformly from ``[0, min(max_s, min_s * 2**n)]``, so that many machines that lost
their network together do not come back in lock step.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

# One generator for every Backoff that is not given its own: a random.Random is 2.5 kB
# (and reads the OS's entropy to seed itself), and a fleet simulator keeps one Backoff per
# device alive (the shadow reporter's). Jitter needs no per-instance stream.
_SHARED_RNG = random.Random()
# A forked child reseeds it, so that processes forked from one parent do not jitter alike.
os.register_at_fork(after_in_child=_SHARED_RNG.seed)


def _shared_rng() -> random.Random:
    return _SHARED_RNG


def backoff_cap(attempt: int, min_s: float, max_s: float) -> float:
    """The upper bound of the ``attempt``-th delay (0-based): ``min(max_s, min_s * 2**n)``."""
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    # 2**64 * anything already exceeds every sensible cap; avoid huge integers.
    return min(max_s, min_s * float(2 ** min(attempt, 64)))


def full_jitter(
    attempt: int, min_s: float, max_s: float, rng: random.Random | None = None
) -> float:
    """One full-jitter delay for the ``attempt``-th retry."""
    return (rng or random).uniform(0.0, backoff_cap(attempt, min_s, max_s))


@dataclass
class Backoff:
    """A stateful backoff: :meth:`next_delay` grows the cap, :meth:`reset` after a success."""

    min_s: float = 0.5
    max_s: float = 30.0
    rng: random.Random = field(default_factory=_shared_rng)
    attempt: int = 0

    def __post_init__(self) -> None:
        if self.min_s <= 0 or self.max_s < self.min_s:
            raise ValueError("backoff needs 0 < min_s <= max_s")

    @property
    def cap(self) -> float:
        """The bound of the next delay."""
        return backoff_cap(self.attempt, self.min_s, self.max_s)

    def next_delay(self) -> float:
        delay = full_jitter(self.attempt, self.min_s, self.max_s, self.rng)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0
