"""Wait for a condition a test cannot be told about: poll it until it holds, and fail
with what was awaited when it does not within the time given (or hand back the last value
read, for the test to assert on); and wait for a state among the events a callback
records."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

INTERVAL_S = 0.05


class _Event(Protocol):
    @property
    def state(self) -> object: ...


E = TypeVar("E", bound=_Event)
T = TypeVar("T")


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


def poll(
    read: Callable[[], T],
    done: Callable[[T], bool],
    timeout: float,
    *,
    interval: float = INTERVAL_S,
) -> T:
    """``read()`` every ``interval`` seconds until ``done`` says its value will do, or
    ``timeout`` has passed; returns the last value read (the test asserts on it, so that a
    failure shows what there was)."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value) or time.monotonic() > deadline:
            return value
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


async def wait_state(events: Sequence[E], state: object, after: int = 0, timeout: float = 30) -> E:
    """The first of ``events[after:]`` (a list an ``on_event`` callback appends to) whose
    ``state`` is ``state``, once it has come."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in events[after:]:
            if event.state is state:
                return event
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {state} within {timeout}s: {list(events[after:])}")
