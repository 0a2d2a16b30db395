"""The blocking facade: :class:`Client` (an :class:`~iotref.device.client.AsyncClient` on
an event loop in a private daemon thread, the same methods, synchronous and thread-safe),
its :class:`BlockingAssetChannel` and :class:`BlockingShadow`, and the one loop thread
(``_LoopThread``) every blocking wrapper runs its coroutines on."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from iotref.device.client import AsyncClient
from iotref.device.connection.state import ConnectionEvent
from iotref.device.errors import ClientClosed
from iotref.device.onboarding.certificate_store import (
    CertificateStore,
    DeviceIdentity,
    DeviceProperties,
)
from iotref.device.options import ClientOptions, ClientOptionsArgs, ClientStats
from iotref.device.raw_payload import PayloadLike
from iotref.device.shadow.desired import DesiredHandler
from iotref.device.shadow.sync import ShadowSync
from iotref.device.stdlib_compat import Unpack
from iotref.device.telemetry.messages import Asset, Sender
from iotref.device.telemetry.outbox_salvage import OutboxRecovery
from iotref.device.telemetry.results import SendResult

__all__ = ["BlockingAssetChannel", "BlockingShadow", "Client"]

T = TypeVar("T")


async def _value(fn: Callable[[], T]) -> T:
    return fn()


class _LoopThread:
    """An event loop in a private daemon thread; :meth:`call` runs a coroutine on it and
    blocks for the result."""

    def __init__(self, name: str) -> None:
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
                "a blocking Client method was called from the client's own thread (e.g. in "
                "a shadow handler); use client.async_client there"
            )
        if self.loop.is_closed() or not self.thread.is_alive():
            coro.close()
            raise ClientClosed("the client is closed")
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


class BlockingAssetChannel:
    """One asset bound to a blocking :class:`Client`; the client's sending methods without
    the asset."""

    def __init__(self, client: Client, asset: Asset) -> None:
        self.client = client
        self.asset = asset

    def send(
        self,
        payload: PayloadLike,
        *,
        payloadversion: int | None = None,
        asset_time: datetime | None = None,
    ) -> SendResult:
        """See :meth:`AsyncClient.send`."""
        return self.client.send(
            self.asset, payload, payloadversion=payloadversion, asset_time=asset_time
        )

    def send_many(
        self, payloads: Iterable[PayloadLike], *, payloadversion: int | None = None
    ) -> list[SendResult]:
        """See :meth:`AsyncClient.send_many`."""
        return self.client.send_many(self.asset, payloads, payloadversion=payloadversion)


class BlockingShadow:
    """A :class:`ShadowSync` used from other threads. Handlers registered here run on the
    client's own thread: keep them short, and use :attr:`sync` (async) inside them."""

    def __init__(self, runner: _LoopThread, sync: ShadowSync) -> None:
        self._runner = runner
        self.sync = sync

    @property
    def desired(self) -> dict[str, Any]:
        return self._runner.call(_value(lambda: self.sync.desired))

    @property
    def reported(self) -> dict[str, Any]:
        return self._runner.call(_value(lambda: self.sync.reported))

    @property
    def version(self) -> int:
        return self._runner.call(_value(lambda: self.sync.version))

    @property
    def synced(self) -> bool:
        return self._runner.call(_value(lambda: self.sync.synced))

    @property
    def send_telemetry_allowed(self) -> bool:
        return self._runner.call(_value(lambda: self.sync.send_telemetry_allowed))

    def on_desired(self, key: str, handler: DesiredHandler) -> None:
        """Decide changes of ``key`` (see :meth:`ShadowSync.on_desired`)."""
        self._runner.call(_value(lambda: self.sync.on_desired(key, handler)))

    def on_send_telemetry_changed(self, callback: Callable[[bool], Any]) -> None:
        self._runner.call(_value(lambda: self.sync.on_send_telemetry_changed(callback)))

    def set_reported(self, key: str, value: Any) -> None:
        self._runner.call(_value(lambda: self.sync.set_reported(key, value)))

    def update_local(self, changes: Mapping[str, Any]) -> None:
        self._runner.call(_value(lambda: self.sync.update_local(changes)))

    def flush(self, timeout: float | None = None) -> None:
        self._runner.call(self.sync.flush(timeout))

    def wait_for(
        self,
        key: str,
        *args: Any,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """See :meth:`ShadowSync.wait_for`; raises :class:`TimeoutError` after
        ``timeout``."""
        return self._runner.call(self.sync.wait_for(key, *args, timeout=timeout, **kwargs))

    def get(self) -> dict[str, Any]:
        return self._runner.call(self.sync.client.get())

    def update(self, state: Mapping[str, Any], version: int | None = None) -> dict[str, Any]:
        return self._runner.call(self.sync.client.update(state, version=version))


class Client:
    """The blocking facade: an :class:`AsyncClient` on an event loop in a private daemon
    thread, the same methods, synchronous and thread-safe::

        with Client.from_store("certificate_store/local") as client:
            client.send(asset, StatusV2(...))
    """

    def __init__(
        self,
        identity: DeviceIdentity,
        *,
        sender: Sender | None = None,
        options: ClientOptions | None = None,
        **overrides: Unpack[ClientOptionsArgs],
    ) -> None:
        self.async_client = AsyncClient(identity, sender=sender, options=options, **overrides)
        self._runner: _LoopThread | None = None
        self._lock = threading.Lock()
        self._shadow: BlockingShadow | None = None
        self._named: dict[str, BlockingShadow] = {}

    @classmethod
    def from_store(
        cls,
        path: Path | str,
        *,
        sender: Sender | None = None,
        options: ClientOptions | None = None,
        **overrides: Unpack[ClientOptionsArgs],
    ) -> Client:
        """See :meth:`AsyncClient.from_store`."""
        identity = CertificateStore(Path(path)).load()
        return cls(identity, sender=sender, options=options, **overrides)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Client:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self, *, wait: bool = True) -> None:
        """Start the thread, connect, sync the shadow, start publishing (see
        :meth:`AsyncClient.start`; without the platform it starts offline)."""
        with self._lock:
            if self._runner is not None:
                raise ClientClosed("a client can be started only once", "make a new client")
            runner = _LoopThread(f"iotref-client-{self.async_client.client_id}")
            self._runner = runner
        try:
            runner.call(self.async_client.start(wait=wait))
        except BaseException:
            runner.stop()
            raise

    def close(self, timeout: float | None = None) -> ClientStats:
        """See :meth:`AsyncClient.close`; also stops the thread. Idempotent."""
        with self._lock:
            runner = self._runner
        if runner is None or runner.loop.is_closed():
            return self.async_client.stats()
        try:
            return runner.call(self.async_client.close(timeout))
        finally:
            runner.stop()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        runner = self._runner
        if runner is None:
            coro.close()
            raise ClientClosed("the client is not started", "use 'with Client.from_store(...)'")
        return runner.call(coro, timeout)

    # ------------------------------------------------------------------ views

    @property
    def client_id(self) -> str:
        return self.async_client.client_id

    @property
    def properties(self) -> DeviceProperties:
        return self.async_client.properties

    @property
    def sender(self) -> Sender:
        return self.async_client.sender

    @property
    def topic(self) -> str:
        return self.async_client.topic

    @property
    def connected(self) -> bool:
        return self.async_client.connected

    @property
    def permission(self) -> bool:
        return self.async_client.permission

    @property
    def outbox_recovery(self) -> OutboxRecovery | None:
        """See :attr:`AsyncClient.outbox_recovery`."""
        return self.async_client.outbox_recovery

    @property
    def shadow(self) -> BlockingShadow:
        """The classic shadow (see :class:`BlockingShadow`)."""
        if self._shadow is None:
            sync = self._call(_value(lambda: self.async_client.shadow))
            assert self._runner is not None
            self._shadow = BlockingShadow(self._runner, sync)
        return self._shadow

    def named_shadow(self, name: str, **sync_options: Any) -> BlockingShadow:
        """See :meth:`AsyncClient.named_shadow`."""
        found = self._named.get(name)
        if found is None:
            sync = self._call(self.async_client.named_shadow(name, **sync_options))
            assert self._runner is not None
            found = BlockingShadow(self._runner, sync)
            self._named[name] = found
        return found

    # ------------------------------------------------------------------ sending

    def asset(self, asset: Asset) -> BlockingAssetChannel:
        """``asset`` bound to this client; ``channel.send(payload)``."""
        return BlockingAssetChannel(self, asset)

    def send(
        self,
        asset: Asset,
        payload: PayloadLike,
        *,
        payloadversion: int | None = None,
        asset_time: datetime | None = None,
    ) -> SendResult:
        """See :meth:`AsyncClient.send`."""
        return self._call(
            self.async_client.send(
                asset, payload, payloadversion=payloadversion, asset_time=asset_time
            )
        )

    def send_many(
        self, asset: Asset, payloads: Iterable[PayloadLike], *, payloadversion: int | None = None
    ) -> list[SendResult]:
        """See :meth:`AsyncClient.send_many`."""
        payloads = list(payloads)  # read in the caller's thread
        return self._call(
            self.async_client.send_many(asset, payloads, payloadversion=payloadversion)
        )

    def send_message(self, message: Mapping[str, Any]) -> SendResult:
        """See :meth:`AsyncClient.send_message`."""
        return self._call(self.async_client.send_message(message))

    def send_messages(self, messages: Iterable[Mapping[str, Any]]) -> list[SendResult]:
        """See :meth:`AsyncClient.send_messages`."""
        return self._call(self.async_client.send_messages(list(messages)))

    def wait_drained(self, timeout: float | None = None) -> bool:
        return self._call(self.async_client.wait_drained(timeout))

    def wait_permission(self, allowed: bool = True, timeout: float | None = None) -> bool:
        return self._call(self.async_client.wait_permission(allowed, timeout))

    def stats(self) -> ClientStats:
        runner = self._runner
        if runner is None or runner.loop.is_closed():
            return self.async_client.stats()
        return runner.call(_value(self.async_client.stats))

    def events(self) -> Iterator[ConnectionEvent]:
        """The connection's state changes from now on, blocking (ends when the client
        closes)."""
        items: queue.Queue[ConnectionEvent | None] = queue.Queue()

        async def pump() -> None:
            try:
                async for event in self.async_client.events():
                    items.put(event)
            finally:
                items.put(None)

        runner = self._runner
        if runner is None:
            raise ClientClosed("the client is not started")
        fut = asyncio.run_coroutine_threadsafe(pump(), runner.loop)
        try:
            while (event := items.get()) is not None:
                yield event
        finally:
            fut.cancel()
