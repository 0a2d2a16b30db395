"""How the connection's work reaches its asyncio loop: calls handed over from awscrt's
threads in order and batched (:class:`LoopBridge`), and the stream of connection events
that :meth:`~iotref.device.connection.connection.Connection.events` returns
(:class:`EventStream`).

awscrt calls back on its own event-loop threads; those callbacks only copy what they need
and post it here, one ``call_soon_threadsafe`` per batch: they never block and never run
application code.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Callable
from typing import Any

from iotref.device.connection.state import ConnectionEvent
from iotref.device.thread_state import keep_thread_state

log = logging.getLogger("iotref.connection")

EVENT_QUEUE_LIMIT = 1000
"""Events an :class:`EventStream` keeps for a reader that does not keep up (the oldest
go first)."""


class LoopBridge:
    """Hands calls from awscrt threads to the asyncio loop, in order, batched."""

    __slots__ = ("_items", "_lock", "_loop", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        # A list swapped for a new one by each drain (a deque would keep a 760-byte block
        # per connection even when empty).
        self._items: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self._scheduled = False

    def post(self, fn: Callable[..., None], *args: Any) -> None:
        # Called on awscrt's threads: keep their Python thread state instead of building
        # and destroying one per callback (see iotref.device.thread_state).
        keep_thread_state()
        with self._lock:
            self._items.append((fn, args))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            with self._lock:
                self._items = []
                self._scheduled = False

    def _drain(self) -> None:
        with self._lock:
            items = self._items
            self._items = []
            self._scheduled = False
        for fn, args in items:
            try:
                fn(*args)
            except Exception:
                log.exception("connection: internal callback failed")


def log_task_error(task: asyncio.Future[Any]) -> None:
    """Done callback of the connection's tasks: log what failed in them."""
    if not task.cancelled() and task.exception() is not None:
        log.error("message handler failed", exc_info=task.exception())


END = object()
"""Pushed into an :class:`EventStream` after the last event."""


class EventStream:
    """Every connection event from its creation on; ends after :data:`END`.
    ``on_close`` is called with the stream once it ended or was closed."""

    def __init__(self, on_close: Callable[[EventStream], None]) -> None:
        self._on_close = on_close
        self._queue: collections.deque[object] = collections.deque()
        self._wakeup: asyncio.Event = asyncio.Event()
        self._closed = False

    def push(self, item: object) -> None:
        if len(self._queue) >= EVENT_QUEUE_LIMIT:
            self._queue.popleft()
        self._queue.append(item)
        self._wakeup.set()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> ConnectionEvent:
        while True:
            if self._queue:
                item = self._queue.popleft()
                if item is END:
                    self._close()
                    raise StopAsyncIteration
                assert isinstance(item, ConnectionEvent)
                return item
            if self._closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        self._closed = True
        self._on_close(self)
