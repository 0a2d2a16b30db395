"""When the device's MQTT connection tries again: the reconnect schedule.

Owns the timing of connection attempts of one client id. After a connection that was up,
the next attempt comes after a full-jitter delay drawn below the minimum backoff (0.5 s by
default); every attempt that fails doubles the bound of the next delay, up to the maximum
backoff; a successful connection starts over from the minimum, however short it lasted
(:mod:`iotref.device.backoff` draws the delays). Whatever the draw, two attempts of one
client id start at least :data:`MIN_ATTEMPT_INTERVAL_S` apart: AWS IoT Core accepts one
CONNECT per second per client id and throttles the rest.

The connection (:class:`iotref.device.connection.connection.Connection`) asks this
schedule when to start its next attempt and drives awscrt's client accordingly (awscrt's
own reconnect timing cannot be configured to this policy; see docs/operations.md). Pure
policy: no I/O, times come from ``clock`` (monotonic seconds).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Final

from iotref.device.backoff import full_jitter

MIN_ATTEMPT_INTERVAL_S: Final = 1.0
"""Least time between the starts of two connection attempts of one client id (AWS IoT
Core: "Connect requests per second per client ID: 1", AWS IoT Core endpoints and
quotas)."""


class ReconnectSchedule:
    """The delays before the connection attempts of one client id (see the module
    docstring). Not thread-safe: use it from one thread (the connection's event loop)."""

    # One per connection, and a fleet holds thousands: no instance dict.
    __slots__ = ("_clock", "_failures", "_last_attempt", "_rng", "max_s", "min_interval_s", "min_s")

    def __init__(
        self,
        min_s: float,
        max_s: float,
        *,
        min_interval_s: float = MIN_ATTEMPT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < min_s <= max_s:
            raise ValueError("a reconnect schedule needs 0 < min_s <= max_s")
        if min_interval_s < 0:
            raise ValueError("min_interval_s must be >= 0")
        self.min_s = min_s
        self.max_s = max_s
        self.min_interval_s = min_interval_s
        self._clock = clock
        self._rng = rng  # None: the random module's generator
        self._failures = 0
        self._last_attempt: float | None = None

    @property
    def failures(self) -> int:
        """Connection attempts (or connections lost) since the last successful connect."""
        return self._failures

    @property
    def cap_s(self) -> float:
        """The bound of the next jittered delay."""
        return min(self.max_s, self.min_s * float(2 ** min(self._failures, 64)))

    def attempt_started(self) -> None:
        """An attempt starts now."""
        self._last_attempt = self._clock()

    def connected(self) -> None:
        """The attempt succeeded: the next delay is drawn below the minimum again."""
        self._failures = 0

    def next_delay(self) -> float:
        """Seconds from now until the next attempt, after a failed attempt or a lost
        connection; each call counts one failure."""
        delay = full_jitter(self._failures, self.min_s, self.max_s, self._rng)
        self._failures += 1
        if self._last_attempt is not None:
            spacing = self._last_attempt + self.min_interval_s - self._clock()
            delay = max(delay, spacing)
        return max(0.0, delay)


__all__ = ["MIN_ATTEMPT_INTERVAL_S", "ReconnectSchedule"]
