"""Events per second over a sliding window (the outbox's acknowledgement rate)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Final

DEFAULT_WINDOW_S: Final = 10.0


class RateMeter:
    """Events per second over a sliding window, in one-second buckets."""

    __slots__ = ("_buckets", "_clock", "_window")

    def __init__(self, clock: Callable[[], float], window: float = DEFAULT_WINDOW_S) -> None:
        self._clock = clock
        self._window = window
        self._buckets: deque[list[float]] = deque()

    def add(self, n: int) -> None:
        """Count ``n`` events now."""
        if n <= 0:
            return
        second = float(int(self._clock()))
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += n
        else:
            self._buckets.append([second, float(n)])
        self._trim(second)

    def _trim(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] <= now - self._window:
            self._buckets.popleft()

    def rate(self) -> float:
        """Events per second over the window (over the time since the first event, if
        shorter, but at least one second)."""
        now = self._clock()
        self._trim(float(int(now)))
        if not self._buckets:
            return 0.0
        span = min(self._window, max(1.0, now - self._buckets[0][0]))
        return sum(b[1] for b in self._buckets) / span
