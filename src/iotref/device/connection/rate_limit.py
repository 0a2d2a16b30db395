"""Pacing of a device's publishes and connection attempts within the platform's quotas.

Owns two things:

- :class:`PublishLimiter`: one per MQTT connection, covering every publish on it
  (telemetry and shadow requests). Two token buckets
  (:class:`iotref.protocol.token_bucket.TokenBucket`), one counting publishes and one
  counting bytes (topic plus payload), paced a little below the connection's quotas
  (:func:`pacing`) so that no one-second window seen by the platform holds more than the
  quota. The connection charges every publish to it (:meth:`PublishLimiter.spend`, a few
  arithmetic operations); the publishers that hold a queue ask it first how many may go
  now (:meth:`PublishLimiter.ready`) or wait for room (:meth:`PublishLimiter.wait`). A
  "quota exceeded" answer of the platform (:meth:`PublishLimiter.throttled`) halves the
  pace, which then comes back linearly to the full pace.
- :class:`ConnectGate`: start times for the connection attempts of many connections
  (a fleet), at most ``rate`` a second, for the account-level connect quota.

Pure arithmetic on an injectable clock (monotonic seconds), apart from the two ``async``
waits. Not thread-safe: use each object from one event loop.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Final

from iotref.protocol.token_bucket import EPSILON, TokenBucket

HEADROOM: Final = 0.02
"""Share of a quota left unused for the timing differences between the device and the
platform: a publish handed to the network at the end of one second may be counted by the
platform in the next."""
BURST: Final = 0.02
"""Share of a quota a bucket holds (at least one publish): enough to make up for the event
loop waking a little late, small enough that a second's window stays under the quota."""
THROTTLE_FACTOR: Final = 0.5
"""What a "quota exceeded" answer multiplies the pace by."""
MIN_PACE_SHARE: Final = 1 / 16
"""The pace never falls below this share of the full pace."""
RECOVERY_PER_S: Final = 0.1
"""After a "quota exceeded" answer the pace grows back by this share of the full pace per
second (from half the pace to the full pace in 5 s)."""
THROTTLE_EVERY_S: Final = 1.0
"""Answers within this long of the one that lowered the pace do not lower it again: the
publishes they answer were sent before the pace changed."""


WHOLE_SLACK: Final = 0.1
"""How far below the next whole publish the pace of whole publishes stays (float rounding)."""


def pacing(limit: float, *, whole: bool = True) -> tuple[float, float]:
    """The ``(rate, burst)`` of a token bucket that keeps every one-second window at most
    ``(1 - HEADROOM) * limit``: a bucket of rate *r* and burst *b* lets at most *r* + *b*
    through in any one second (a closed interval), so *b* is ``BURST`` of the limit (at
    least 1) and *r* the rest below the headroom, at least half the limit (for limits of one
    or two a second, where one publish a second is all a window can hold).

    ``whole``: the limit counts whole publishes, so a window holds at most ``floor(r + b)``
    of them, and *r* + *b* may come up to just below the next whole number: the same
    bound, at a pace up to one publish a second higher. Bytes (``whole=False``) are not."""
    if not limit > 0:
        raise ValueError("a limit must be positive")
    burst = max(1.0, BURST * limit)
    most = limit * (1.0 - HEADROOM)
    if whole:
        most = math.floor(most) + 1.0 - WHOLE_SLACK
    rate = max(most - burst, limit / 2)
    return rate, burst


class PublishLimiter:
    """The publish pace of one connection (see the module docstring). ``publish_limit``
    is the quota in publishes a second, ``byte_limit`` in bytes a second (topic plus
    payload); ``None`` (or 0) leaves that quota unpaced.

    A publish may go when the publish bucket holds a whole token and the byte bucket is not
    in debt; it takes one token and its size in bytes (the byte bucket may go into debt by
    one message: a message larger than the bucket could never go otherwise)."""

    __slots__ = (
        "_byte_rate",
        "_bytes",
        "_clock",
        "_lowered_at",
        "_publish_rate",
        "_publishes",
        "_recovered_to",
        "_waiting",
        "byte_limit",
        "publish_limit",
        "throttle_answers",
    )

    def __init__(
        self,
        publish_limit: float | None,
        byte_limit: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        now = clock()
        self.publish_limit = publish_limit or None
        self.byte_limit = byte_limit or None
        self._publishes: TokenBucket | None = None
        self._bytes: TokenBucket | None = None
        self._publish_rate = self._byte_rate = 0.0
        if self.publish_limit is not None:
            rate, burst = pacing(self.publish_limit)
            self._publishes = TokenBucket(rate, burst, now)
            self._publish_rate = rate
        if self.byte_limit is not None:
            rate, burst = pacing(self.byte_limit, whole=False)
            self._bytes = TokenBucket(rate, burst, now)
            self._byte_rate = rate
        # When a "quota exceeded" answer last lowered the pace, and up to when the pace's
        # recovery has been applied (None: at the full pace).
        self._lowered_at = -math.inf
        self._recovered_to: float | None = None
        self._waiting = 0  # tasks in wait(): ready() leaves them their publish
        self.throttle_answers = 0
        """"Quota exceeded" answers reported through :meth:`throttled`."""

    @classmethod
    def from_limits(
        cls, publish_limit: float | None, byte_limit: float | None
    ) -> PublishLimiter | None:
        """A limiter, or ``None`` when both limits are off (``None`` or 0)."""
        if not publish_limit and not byte_limit:
            return None
        return cls(publish_limit, byte_limit)

    # ------------------------------------------------------------------ reading

    @property
    def pace(self) -> float | None:
        """Publishes a second the limiter lets through now (``None``: not paced)."""
        bucket = self._publishes
        if bucket is None:
            return None
        self._refresh(self._clock())
        return bucket.rate

    @property
    def full_pace(self) -> float | None:
        """Publishes a second when not slowed down by "quota exceeded" answers."""
        return self._publish_rate if self._publishes is not None else None

    @property
    def slowed(self) -> bool:
        """Whether a "quota exceeded" answer still holds the pace below the full pace."""
        self._refresh(self._clock())
        return self._recovered_to is not None

    def ready(self) -> int:
        """How many publishes may go now (0: none; see :meth:`delay`), less one for each
        task waiting in :meth:`wait`: a publisher that sends whatever this allows leaves
        the occasional request (a shadow update) its turn."""
        now = self._clock()
        self._refresh(now)
        byte_bucket = self._bytes
        if byte_bucket is not None and byte_bucket.refill(now) < -EPSILON:
            return 0
        bucket = self._publishes
        if bucket is None:
            return 0 if self._waiting else 1 << 30
        return max(0, int(bucket.refill(now) + EPSILON) - self._waiting)

    def byte_room(self) -> float:
        """Bytes that may still go before the byte bucket is in debt (``inf``: not paced);
        a publish may go while this is not negative."""
        bucket = self._bytes
        if bucket is None:
            return math.inf
        return bucket.refill(self._clock())

    def delay(self) -> float:
        """Seconds until one more publish may go (0 if one may go now)."""
        now = self._clock()
        self._refresh(now)
        wait = 0.0
        bucket = self._publishes
        if bucket is not None:
            tokens = bucket.refill(now)
            if tokens < 1.0 - EPSILON:  # (ready() counts a token this close as whole)
                wait = (1.0 - tokens) / bucket.rate
        byte_bucket = self._bytes
        if byte_bucket is not None:
            tokens = byte_bucket.refill(now)
            if tokens < -EPSILON:
                wait = max(wait, -tokens / byte_bucket.rate)
        return wait

    # ------------------------------------------------------------------ changing

    def spend(self, size: int) -> None:
        """One publish of ``size`` bytes went out (topic plus payload)."""
        bucket = self._publishes
        if bucket is not None:
            bucket.tokens -= 1.0
        byte_bucket = self._bytes
        if byte_bucket is not None:
            byte_bucket.tokens -= size

    async def wait(self) -> None:
        """Return once one more publish may go; the caller publishes right away (before it
        awaits anything else)."""
        if self.delay() <= 0:
            return
        self._waiting += 1
        try:
            while (delay := self.delay()) > 0:  # noqa: ASYNC110 (waits for time, not an event)
                await asyncio.sleep(delay)
        finally:
            self._waiting -= 1

    def throttled(self) -> bool:
        """The platform answered a publish with "quota exceeded": halve the pace (at most
        once per :data:`THROTTLE_EVERY_S`, never below :data:`MIN_PACE_SHARE` of the full
        pace); it comes back at :data:`RECOVERY_PER_S` of the full pace per second.
        Returns whether the pace was lowered now."""
        self.throttle_answers += 1
        now = self._clock()
        self._refresh(now)
        if now - self._lowered_at < THROTTLE_EVERY_S:
            return False
        for bucket, full in ((self._publishes, self._publish_rate), (self._bytes, self._byte_rate)):
            if bucket is not None:
                bucket.refill(now)
                bucket.rate = max(full * MIN_PACE_SHARE, bucket.rate * THROTTLE_FACTOR)
                bucket.tokens = min(bucket.tokens, 0.0)  # no burst right after the answer
        self._lowered_at = self._recovered_to = now
        return True

    def _refresh(self, now: float) -> None:
        """Let the pace grow back after a "quota exceeded" answer."""
        since = self._recovered_to
        if since is None:
            return
        elapsed = now - since
        if elapsed <= 0:
            return
        recovered = True
        for bucket, full in ((self._publishes, self._publish_rate), (self._bytes, self._byte_rate)):
            if bucket is None or bucket.rate >= full:
                continue
            bucket.refill(now)  # what the slower pace earned until now
            bucket.rate = min(full, bucket.rate + full * RECOVERY_PER_S * elapsed)
            recovered = recovered and bucket.rate >= full
        self._recovered_to = None if recovered else now


class ConnectGate:
    """Start times for connection attempts shared by many connections: at most ``rate``
    attempts a second. Time is cut into slots of ``1 / rate`` seconds, one attempt each;
    an attempt takes the first free slot at or after the time it asks for, so a reconnect
    planned for later does not hold back one that may start now, and any one-second window
    holds at most ``rate`` starts (one more where a window's both ends fall on slots)."""

    __slots__ = ("_clock", "_next_free", "_prune_above", "rate")

    def __init__(self, rate: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not rate > 0:
            raise ValueError("a connect rate must be positive")
        self.rate = float(rate)
        self._clock = clock
        # Taken slots point towards the next one that may be free (path-compressed).
        self._next_free: dict[int, int] = {}
        self._prune_above = 1024

    def reserve(self, earliest: float | None = None) -> float:
        """The clock time at which one more attempt may start, not before ``earliest``
        (default: now); that start is taken."""
        now = self._clock()
        wanted = now if earliest is None else max(now, earliest)
        slot = self._free_slot(math.ceil(wanted * self.rate - EPSILON))
        self._next_free[slot] = slot + 1
        if len(self._next_free) > self._prune_above:
            self._prune(now)
        return slot / self.rate

    def delay(self, earliest_in_s: float = 0.0) -> float:
        """Seconds from now until the start :meth:`reserve` takes, at least
        ``earliest_in_s``."""
        now = self._clock()
        return max(0.0, self.reserve(now + max(0.0, earliest_in_s)) - now)

    async def wait(self) -> None:
        """Take the next start and sleep until it."""
        delay = self.delay()
        if delay > 0:
            await asyncio.sleep(delay)

    def _free_slot(self, slot: int) -> int:
        taken = self._next_free
        free = slot
        while free in taken:
            free = taken[free]
        while slot != free:  # point the walked chain at the free slot
            slot, taken[slot] = taken[slot], free
        return free

    def _prune(self, now: float) -> None:
        """Forget the slots in the past (nobody asks for them any more)."""
        past = math.floor(now * self.rate)
        self._next_free = {k: v for k, v in self._next_free.items() if k >= past}
        self._prune_above = max(1024, 2 * len(self._next_free))


__all__ = [
    "BURST",
    "HEADROOM",
    "ConnectGate",
    "PublishLimiter",
    "pacing",
]
