"""The one event loop thread behind every blocking wrapper (:mod:`iotref.device.blocking`):
an asyncio loop in a private daemon thread that runs the async API's coroutines for
callers without an event loop, and stops cleanly."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from iotref.device.errors import ClientClosed

T = TypeVar("T")


class LoopThread:
    """An event loop in a private daemon thread; :meth:`call` runs a coroutine on it and
    blocks for the result. ``owner`` names the wrapper in errors ("the client is closed")."""

    def __init__(self, name: str, owner: str = "client") -> None:
        self.owner = owner
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()
        self._ready.wait()

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        loop.call_soon(self._ready.set)
        try:
            loop.run_forever()
            tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError(
                f"a blocking {self.owner} method was called from the {self.owner}'s own "
                "thread (e.g. in a shadow handler or a callback); use the async API there"
            )
        if self.loop.is_closed() or not self.thread.is_alive():
            coro.close()
            raise ClientClosed(f"the {self.owner} is closed")
        fut: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"no result within {timeout} s") from None
        except BaseException:
            fut.cancel()
            raise

    def stop(self, join_s: float = 10.0) -> None:
        if self.loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self.thread:
            self.thread.join(join_s)
