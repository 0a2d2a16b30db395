"""The blocking facade: :class:`Client` (an :class:`~iotref.device.client.AsyncClient` on
an event loop in a private daemon thread, the same methods, synchronous and thread-safe),
its :class:`BlockingAssetChannel` and :class:`BlockingShadow`, and the one loop thread
(``LoopThread``) every blocking wrapper runs its coroutines on."""

from __future__ import annotations

import asyncio
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
from iotref.device.loop_thread import LoopThread
from iotref.device.onboarding.certificate_store import (
    CertificateStore,
    DeviceIdentity,
    DeviceProperties,
)
from iotref.device.onboarding.device_flow import DeviceAuthorization, PollEvent
from iotref.device.onboarding.environment import Environment
from iotref.device.onboarding.provisioning import ProvisionOptions, ProvisionResult
from iotref.device.onboarding.service import LoginResult, LoginStatus, Onboarding
from iotref.device.onboarding.store_checks import DEFAULT_EXPIRY_THRESHOLD_DAYS, StoreReport
from iotref.device.options import ClientOptions, ClientOptionsArgs, ClientStats
from iotref.device.raw_payload import PayloadLike
from iotref.device.shadow.desired import DesiredHandler
from iotref.device.shadow.sync import ShadowSync
from iotref.device.stdlib_compat import Unpack
from iotref.device.telemetry.messages import Asset, Sender
from iotref.device.telemetry.outbox_salvage import OutboxRecovery
from iotref.device.telemetry.results import SendResult

__all__ = ["BlockingAssetChannel", "BlockingOnboarding", "BlockingShadow", "Client"]

T = TypeVar("T")


async def _value(fn: Callable[[], T]) -> T:
    return fn()


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

    def __init__(self, runner: LoopThread, sync: ShadowSync) -> None:
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
        self._runner: LoopThread | None = None
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
            runner = LoopThread(f"iotref-client-{self.async_client.client_id}")
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


class BlockingOnboarding:
    """:class:`Onboarding` for code without an event loop: the same methods, blocking.

    ``with BlockingOnboarding(env) as onboarding: onboarding.provision(...)``. Its
    coroutines run on its own :class:`~iotref.device.loop_thread.LoopThread` (callbacks
    such as ``on_authorization`` are called there). Must not be used from inside a running
    event loop."""

    def __init__(self, env: Environment, **kwargs: Any) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("BlockingOnboarding cannot run inside an event loop; use Onboarding")
        self._runner = LoopThread(f"iotref-onboarding-{env.name}", owner="onboarding")
        try:
            self._onboarding: Onboarding = self._runner.call(_make_onboarding(env, kwargs))
        except BaseException:
            self._runner.stop()
            raise

    @property
    def onboarding(self) -> Onboarding:
        return self._onboarding

    @property
    def store(self) -> CertificateStore:
        return self._onboarding.store

    def __enter__(self) -> BlockingOnboarding:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._runner.call(self._onboarding.aclose())
        finally:
            self._runner.stop()

    def login(
        self,
        on_authorization: Callable[[DeviceAuthorization], None] | None = None,
        on_poll: Callable[[PollEvent], None] | None = None,
    ) -> LoginResult:
        return self._runner.call(self._onboarding.login(on_authorization, on_poll))

    def logout(self) -> bool:
        return self._onboarding.logout()

    def login_status(self) -> LoginStatus:
        return self._onboarding.login_status()

    def access_token(self) -> str:
        return self._runner.call(self._onboarding.access_token())

    def provision(self, options: ProvisionOptions | None = None) -> ProvisionResult:
        return self._runner.call(self._onboarding.provision(options))

    def check(self, threshold_days: float = DEFAULT_EXPIRY_THRESHOLD_DAYS) -> StoreReport:
        return self._onboarding.check(threshold_days)


async def _make_onboarding(env: Environment, kwargs: dict[str, Any]) -> Onboarding:
    return Onboarding(env, **kwargs)
