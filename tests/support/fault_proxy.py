"""A TCP fault proxy for reliability tests (Toxiproxy's job, which has no Debian or PyPI
package): an asyncio relay between a client (the device) and a server (the broker) that
the test controls while it runs, from any thread.

Faults, each switchable at any time and applying to open and new connections alike:

- ``set_latency(seconds, jitter)``: every chunk is delivered that much later (order kept).
- ``set_bandwidth(bytes_per_second)``: each direction of each connection is throttled.
- ``cut()``: every open connection is aborted (RST on both sides).
- ``refuse()`` / ``admit()``: new connections are accepted and closed at once (a closed
  "door"), or let through again.
- ``stall()`` / ``resume()``: a half-open stall. Nothing is forwarded and nothing is closed:
  data is held back, and a side that closes meanwhile is not told to the other (the
  network is dead, not the peer). On ``resume()`` held data flows again and closes are
  propagated. New connections made during a stall are accepted and stalled too.
- ``retarget(host, port)``: new connections go to another server (e.g. a sandbox started
  again on other ports); open ones are left alone.

The proxy runs its own event loop in a daemon thread, so blocking tests and asyncio tests
use it the same way. ``stats()`` counts connections, bytes and faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

_CHUNK = 65536
_EOF = b""


@dataclass(frozen=True)
class ProxyStats:
    """Counters since the proxy started."""

    accepted: int
    refused: int
    upstream_failures: int
    open: int
    bytes_up: int
    """Client to server."""
    bytes_down: int
    """Server to client."""
    cuts: int
    connections_cut: int
    stalls: int


@dataclass(eq=False)
class _Pair:
    """One relayed connection: the client side and the server side."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    closed: bool = False

    def abort(self) -> None:
        """Reset both sides at once."""
        self.closed = True
        for writer in (self.client, self.server):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    """``with FaultProxy(port) as proxy:`` connect clients to ``proxy.port``."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target: tuple[str, int] = (target_host, target_port)
        self.host = "127.0.0.1"
        self.port = 0
        self._latency = 0.0
        self._jitter = 0.0
        self._bandwidth: float | None = None
        self._refusing = False
        self._flowing: asyncio.Event | None = None
        self._pairs: set[_Pair] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._random = random.Random(0x5EED)
        self._accepted = 0
        self._refused = 0
        self._upstream_failures = 0
        self._bytes_up = 0
        self._bytes_down = 0
        self._cuts = 0
        self._connections_cut = 0
        self._stalls = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FaultProxy:
        """Listen on a free port of 127.0.0.1 (``self.port``)."""
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fault proxy did not start")
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._flowing = asyncio.Event()
        self._flowing.set()

        async def listen() -> None:
            self._server = await asyncio.start_server(self._serve, self.host, 0)
            self.port = self._server.sockets[0].getsockname()[1]

        loop.run_until_complete(listen())
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def close(self) -> None:
        """Stop listening, abort every connection and stop the thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for pair in list(self._pairs):
                pair.abort()
            self._pairs.clear()
            await asyncio.sleep(0)

        with contextlib.suppress(RuntimeError):
            self._call(shutdown(), timeout=5)
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        assert self._loop is not None, "start the proxy first"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ------------------------------------------------------------------ controls

    def set_latency(self, seconds: float, jitter: float = 0.0) -> None:
        """Delay every chunk by ``seconds`` plus up to ``jitter`` (order is kept)."""
        if seconds < 0 or jitter < 0:
            raise ValueError("latency and jitter must be >= 0")
        self._latency, self._jitter = seconds, jitter

    def set_bandwidth(self, bytes_per_second: float | None) -> None:
        """Throttle each direction of each connection; ``None`` lifts the limit."""
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError("bandwidth must be > 0 bytes/s (or None)")
        self._bandwidth = bytes_per_second

    def clear(self) -> None:
        """No latency, no throttling, no stall, door open."""
        self.set_latency(0)
        self.set_bandwidth(None)
        self.admit()
        self.resume()

    def refuse(self) -> None:
        """Close every new connection right after accepting it."""
        self._refusing = True

    def admit(self) -> None:
        """Let new connections through again."""
        self._refusing = False

    def cut(self) -> int:
        """Abort every open connection; returns how many."""

        async def go() -> int:
            pairs = list(self._pairs)
            for pair in pairs:
                pair.abort()
            self._pairs.clear()
            return len(pairs)

        count = self._call(go())
        self._cuts += 1
        self._connections_cut += count
        return count

    def stall(self) -> None:
        """Stop forwarding without closing anything (see the module docstring)."""

        async def go() -> None:
            assert self._flowing is not None
            self._flowing.clear()

        self._call(go())
        self._stalls += 1

    def resume(self) -> None:
        """End a stall: held data flows, pending closes are propagated."""

        async def go() -> None:
            assert self._flowing is not None
            self._flowing.set()

        self._call(go())

    @property
    def stalled(self) -> bool:
        return self._flowing is not None and not self._flowing.is_set()

    def retarget(self, port: int, host: str = "127.0.0.1") -> None:
        """Send new connections to ``host:port``."""
        self.target = (host, port)

    def stats(self) -> ProxyStats:
        return ProxyStats(
            accepted=self._accepted,
            refused=self._refused,
            upstream_failures=self._upstream_failures,
            open=len(self._pairs),
            bytes_up=self._bytes_up,
            bytes_down=self._bytes_down,
            cuts=self._cuts,
            connections_cut=self._connections_cut,
            stalls=self._stalls,
        )

    # ------------------------------------------------------------------ relaying

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            self._refused += 1
            writer.transport.abort()
            return
        host, port = self.target
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            self._upstream_failures += 1
            writer.transport.abort()
            return
        self._accepted += 1
        pair = _Pair(writer, up_writer)
        self._pairs.add(pair)
        pair.tasks = [
            asyncio.create_task(self._pump(pair, reader, up_writer, up=True)),
            asyncio.create_task(self._pump(pair, up_reader, writer, up=False)),
        ]
        await asyncio.gather(*pair.tasks, return_exceptions=True)
        self._pairs.discard(pair)

    async def _pump(
        self,
        pair: _Pair,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        *,
        up: bool,
    ) -> None:
        """Read ``src`` into a queue of (due time, chunk); a deliverer writes them to
        ``dst`` honouring latency, stalls and bandwidth. EOF travels as an empty chunk."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        deliver = asyncio.create_task(self._deliver(pair, queue, dst, up=up))
        try:
            while True:
                try:
                    data = await src.read(_CHUNK)
                except (OSError, asyncio.IncompleteReadError):
                    data = _EOF
                delay = self._latency + (self._random.random() * self._jitter)
                queue.put_nowait((time.monotonic() + delay, data))
                if not data:
                    break
            await deliver
        finally:
            deliver.cancel()

    async def _deliver(
        self,
        pair: _Pair,
        queue: asyncio.Queue[tuple[float, bytes]],
        dst: asyncio.StreamWriter,
        *,
        up: bool,
    ) -> None:
        assert self._flowing is not None
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._flowing.wait()
            if pair.closed:
                return
            if not data:
                # The source closed: tell the other side (after a stall, now).
                with contextlib.suppress(Exception):
                    dst.transport.abort()
                pair.abort()
                return
            if up:  # counted before the write: a reader may see the data at once
                self._bytes_up += len(data)
            else:
                self._bytes_down += len(data)
            await self._throttled_write(dst, data)

    async def _throttled_write(self, dst: asyncio.StreamWriter, data: bytes) -> None:
        view = memoryview(data)
        while view:
            rate = self._bandwidth
            if rate is None:
                piece, view = view, view[len(view) :]
            else:
                size = max(1, min(len(view), int(rate / 20)))  # ~20 slices a second
                piece, view = view[:size], view[size:]
            try:
                dst.write(bytes(piece))
                await dst.drain()
            except (OSError, RuntimeError):
                return
            if rate is not None:
                await asyncio.sleep(len(piece) / rate)
            await self._flowing_wait()

    async def _flowing_wait(self) -> None:
        assert self._flowing is not None
        await self._flowing.wait()


__all__ = ["FaultProxy", "ProxyStats"]
