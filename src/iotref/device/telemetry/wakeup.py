"""A wake-up signal for one waiting task (the telemetry drainer)."""

from __future__ import annotations

import asyncio
import contextlib

from iotref.device import stdlib_compat


class Wakeup:
    """An :class:`asyncio.Event` for a single waiter: the same ``set``, ``clear``,
    ``is_set`` and ``wait``, without the deque of waiters an ``asyncio.Event`` allocates
    in each of a fleet's thousands of publishers."""

    __slots__ = ("_set", "_waiter")

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if not self._set:
            self._set = True
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        if self._set:
            return
        assert self._waiter is None, "one waiter only"
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    async def wait_at_most(self, seconds: float) -> None:
        """Wait until set or ``seconds`` passed."""
        with contextlib.suppress(TimeoutError):
            async with stdlib_compat.timeout(seconds):
                await self.wait()
