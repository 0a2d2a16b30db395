"""When each fleet device sends: every device's messages at their due times, ``1 / rate``
seconds apart from a random phase after its first shadow sync, sent by one task for the
whole fleet."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import random
import time
from collections.abc import Callable
from typing import Final

from iotref.device import stdlib_compat
from iotref.fleet.device import FleetDevice

SCHEDULER_TICK_S: Final = 0.02
YIELD_EVERY: Final = 200
"""Messages sent in a row before the scheduler lets other tasks run."""


class SendScheduler:
    """Sends ``per_device`` messages of each device added, ``1 / rate`` seconds apart.
    :meth:`run` returns once :meth:`close` was called and every message is sent; a failed
    send is counted through ``on_error`` and the device's next messages follow as
    planned."""

    def __init__(
        self,
        rate: float,
        per_device: int,
        rng: random.Random,
        on_error: Callable[[str], None],
    ) -> None:
        self.interval = 1.0 / rate
        self.per_device = per_device
        self.sent = 0
        """Messages sent (queued by the device's telemetry) so far."""
        self._rng = rng
        self._on_error = on_error
        self._heap: list[tuple[float, int, int, FleetDevice]] = []
        self._wake = asyncio.Event()
        self._closed = False

    def add(self, device: FleetDevice) -> None:
        """Start ``device``'s messages, the first at a random phase within one interval."""
        first = time.monotonic() + self._rng.uniform(0, self.interval)
        heapq.heappush(self._heap, (first, device.identity.index, 0, device))
        self._wake.set()

    def close(self) -> None:
        """No more devices will be added: :meth:`run` ends once the last one is sent."""
        self._closed = True
        self._wake.set()

    async def run(self) -> None:
        """Send every due message until closed and done."""
        heap = self._heap
        while True:
            self._wake.clear()
            now = time.monotonic()
            sent = 0
            while heap and heap[0][0] <= now:
                due, index, k, device = heapq.heappop(heap)
                try:
                    await device.send_next()
                    self.sent += 1
                except Exception as exc:
                    self._on_error(f"send_{type(exc).__name__}")
                if k + 1 < self.per_device:
                    heapq.heappush(heap, (due + self.interval, index, k + 1, device))
                sent += 1
                if sent % YIELD_EVERY == 0:
                    await asyncio.sleep(0)
                    now = time.monotonic()
            if self._closed and not heap:
                return
            wait = (
                SCHEDULER_TICK_S if not heap else max(0.0, min(SCHEDULER_TICK_S, heap[0][0] - now))
            )
            with contextlib.suppress(TimeoutError):
                async with stdlib_compat.timeout(wait if heap else 1.0):
                    await self._wake.wait()
