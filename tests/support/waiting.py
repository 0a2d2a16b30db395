"""Wait for a condition a test cannot be told about: poll it until it holds, and fail
with what was awaited when it does not within the time given."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

INTERVAL_S = 0.05


def wait_until(
    condition: Callable[[], object], timeout: float, what: str, *, interval: float = INTERVAL_S
) -> None:
    """Poll ``condition`` every ``interval`` seconds; ``AssertionError`` naming ``what``
    when it is still false after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


async def wait_until_async(
    condition: Callable[[], object], timeout: float, what: str, *, interval: float = INTERVAL_S
) -> None:
    """:func:`wait_until` on a running event loop (sleeps with ``asyncio.sleep``)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)
