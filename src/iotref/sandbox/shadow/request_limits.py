"""The Device Shadow service's per-thing request limits: requests a second and requests
in flight; over either, AWS IoT answers 429 "Too Many Requests".

* Requests a second: a token bucket per thing
  (:class:`iotref.protocol.token_bucket.TokenBucket`) of one second's worth, refilled at
  the limit's rate; a request that finds no token is refused. Every shadow request of the
  thing counts (MQTT and REST, classic and named shadows).
* In flight: MQTT requests of the thing whose answers the service has started and the
  broker has not yet acknowledged (the messages of one operation are published QoS 1 and
  count until every one of them has its PUBACK). A request that arrives while the limit is
  reached is refused; its rejection is not counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from iotref.protocol import shadow_document as sd
from iotref.protocol.token_bucket import TokenBucket

PRUNE_EVERY = 4096  # admitted requests between prunings of full buckets, and their count


class ShadowRequestLimits:
    """Per thing name; a limit of 0 is off. Used on the event loop's thread only."""

    def __init__(
        self, rate: int, in_flight: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.in_flight_limit = in_flight
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._in_flight: dict[str, int] = {}
        self.refused_rate = 0
        self.refused_in_flight = 0
        self._admitted = 0

    def admit(self, thing: str, *, mqtt: bool, client_token: str | None = None) -> None:
        """Count a request of ``thing``; raise :class:`ShadowError` 429 if it is over a
        limit (then it takes nothing from either)."""
        if mqtt and self.in_flight_limit and self.in_flight(thing) >= self.in_flight_limit:
            self.refused_in_flight += 1
            raise sd.ShadowError(429, sd.MSG_TOO_MANY_REQUESTS, client_token)
        if self.rate:
            now = self._clock()
            bucket = self._buckets.get(thing)
            if bucket is None:
                bucket = self._buckets[thing] = TokenBucket(self.rate, now=now)
            if bucket.take(1, now) == 0:
                self.refused_rate += 1
                raise sd.ShadowError(429, sd.MSG_TOO_MANY_REQUESTS, client_token)
            self._admitted += 1
            if self._admitted % PRUNE_EVERY == 0 and len(self._buckets) > PRUNE_EVERY:
                self._forget_full(now)

    def in_flight(self, thing: str) -> int:
        return self._in_flight.get(thing, 0)

    def started(self, thing: str) -> None:
        self._in_flight[thing] = self._in_flight.get(thing, 0) + 1

    def finished(self, thing: str) -> None:
        left = self._in_flight.get(thing, 0) - 1
        if left > 0:
            self._in_flight[thing] = left
        else:
            self._in_flight.pop(thing, None)

    def _forget_full(self, now: float) -> None:
        """Drop the buckets that are full again (they behave like new ones), so that the
        table does not grow with every thing ever seen."""
        for thing in [t for t, b in self._buckets.items() if b.refill(now) >= b.capacity]:
            del self._buckets[thing]
