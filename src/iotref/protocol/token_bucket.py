"""The token bucket: the rule by which a per-second quota admits or refuses requests.

A bucket holds up to ``capacity`` tokens and gains ``rate`` tokens a second; a request
that finds a token takes it, one that finds none is over the quota. With ``capacity``
equal to ``rate`` (one second's worth) this is how AWS's own device SDK (aws-c-mqtt)
paces publishes for AWS IoT Core's per-connection quotas, so the sandbox counts a request
as throttled exactly when such a client would have held it back. Pure arithmetic on a
caller-supplied clock, so the same rule serves the sandbox's meters and limits (and any
device-side pacing) and is tested with a fake clock.
"""

from __future__ import annotations

EPSILON = 1e-6
"""A token this close to whole counts as whole (the clock's floating-point rounding)."""


class TokenBucket:
    """``rate`` tokens a second, at most ``capacity``, full at ``now`` when created."""

    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, rate: float, capacity: float | None = None, now: float = 0.0) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.capacity = float(rate if capacity is None else capacity)
        if self.capacity <= 0:
            raise ValueError("capacity must be positive")
        self.tokens = self.capacity
        self.updated = now

    def refill(self, now: float) -> float:
        """Add what ``rate`` earned since the last call (a clock that went back earns
        nothing); returns the tokens now available."""
        elapsed = now - self.updated
        if elapsed > 0:
            self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
            self.updated = now
        return self.tokens

    def take(self, count: int, now: float) -> int:
        """Admit up to ``count`` requests of one token each arriving at ``now``; returns
        how many were admitted (their tokens are taken), the rest are over the quota."""
        admitted = min(count, int(self.refill(now) + EPSILON))
        if admitted <= 0:
            return 0
        self.tokens -= admitted
        return admitted
