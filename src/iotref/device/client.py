"""The library's front door: :class:`AsyncClient`, one sender's connection to the platform
(contract section 9), and :class:`AssetChannel`, one asset bound to it. The blocking twin
is :mod:`iotref.device.blocking`.

The client puts the device runtime together from a certificate store (contract section 5):
the durable outbox in the store's folder (opened first: a second process with the same store
is refused before it could take the MQTT session over), the mutual-TLS connection, the
classic shadow kept in sync (its ``sendTelemetryData`` is the permission to send) and the
permission-gated publisher draining the outbox. It starts without the platform ("waiting
for the platform" in :meth:`AsyncClient.stats`) unless ``fail_fast``, and closes within the
close timeout, draining what it can; what is not acknowledged stays in the outbox for the
next run.

Sending is one family: ``send(asset, payload)`` and ``send_many(asset, payloads)`` build
messages, ``send_message(message)`` and ``send_messages(messages)`` take complete ones; each
validates against the platform schemas and returns once the outbox committed (one
transaction for the ``*_many``/``*_messages`` forms); publishing happens in the background.

Logging (logger ``iotref.client``): start, stop and what was left in the outbox; never key
material or tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar

from iotref._version import __version__
from iotref.device.connection.connection import Connection
from iotref.device.connection.errors import ConnectionFailed, ConnectionTakenOver
from iotref.device.connection.settings import ConnectionSettings
from iotref.device.connection.state import ConnectionEvent, ConnectionState
from iotref.device.errors import (
    ClientClosed,
    ClientError,
    InvalidMessageError,
    MessageTooLargeError,
    OutboxBusy,
    OutboxFullError,
)
from iotref.device.onboarding.certificate_store import (
    CertificateStore,
    DeviceIdentity,
    DeviceProperties,
)
from iotref.device.options import (
    ClientOptions,
    ClientOptionsArgs,
    ClientStats,
    client_stats,
    merged_options,
)
from iotref.device.raw_payload import PayloadLike, as_payload
from iotref.device.shadow.sync import ShadowSync
from iotref.device.stdlib_compat import Unpack
from iotref.device.telemetry.messages import Asset, Sender, SenderType, build_message
from iotref.device.telemetry.outbox import OUTBOX_FILE_NAME, Outbox
from iotref.device.telemetry.outbox_errors import OutboxError, OutboxFull, OutboxLocked
from iotref.device.telemetry.outbox_salvage import OutboxRecovery
from iotref.device.telemetry.permission import ShadowPermission
from iotref.device.telemetry.publisher import Telemetry
from iotref.device.telemetry.results import MessageTooLarge, SendResult, TelemetryClosed
from iotref.protocol.message_schemas import InvalidMessage, MessageValidator
from iotref.protocol.topics import telemetry_topic

__all__ = ["CLOSE_GRACE_S", "DEFAULT_SENDER", "AssetChannel", "AsyncClient"]

log = logging.getLogger("iotref.client")

T = TypeVar("T")

DEFAULT_SENDER: Final = Sender(SenderType.SYSTEM, "iotref", __version__)
"""The sender used when none is given: an iotref gateway."""
_POLL_S: Final = 0.02
_STOP_SHADOW_MIN_S: Final = 0.25
_STOP_CONNECTION_MIN_S: Final = 1.0
CLOSE_GRACE_S: Final = 2.0
"""The most a close may take beyond its timeout: unsubscribing and disconnecting."""


async def _bounded(step: Coroutine[Any, Any, Any], max_wait_s: float, what: str) -> None:
    """Run ``step`` for at most ``max_wait_s`` seconds (then cancel it); log its error."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=max_wait_s)
    if not done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        log.warning("%s took more than %.1f s; left behind", what, max_wait_s)
        return
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed", what, exc_info=task.exception())


async def _first_outcome(connection: Connection, max_wait_s: float) -> None:
    """Until the first attempt of a starting connection succeeded or failed (at most
    ``max_wait_s`` seconds)."""
    if connection.connected or connection.stats.failures or connection.state.terminal:
        return
    stream = connection.events()

    async def first() -> None:
        async for event in stream:
            if event.state is not ConnectionState.CONNECTING:
                return

    waiting = asyncio.ensure_future(first())
    try:
        await asyncio.wait({waiting}, timeout=max_wait_s)
    finally:
        if not waiting.done():
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    """The publisher's refusals of a message, as the client's errors."""
    try:
        yield
    except InvalidMessage as exc:
        raise InvalidMessageError(exc.issues) from None
    except MessageTooLarge as exc:
        raise MessageTooLargeError(exc.size, exc.limit) from None
    except OutboxFull as exc:
        raise OutboxFullError(f"the outbox is full: {exc}", depth=exc.depth) from None
    except TelemetryClosed:
        raise ClientClosed("the client is closed") from None


class AssetChannel:
    """One asset bound to a client: ``await press.send(StatusV2(...))``; the client's
    sending methods without the asset."""

    def __init__(self, client: AsyncClient, asset: Asset) -> None:
        self.client = client
        self.asset = asset

    async def send(
        self,
        payload: PayloadLike,
        *,
        payloadversion: int | None = None,
        asset_time: datetime | None = None,
    ) -> SendResult:
        """See :meth:`AsyncClient.send`."""
        return await self.client.send(
            self.asset, payload, payloadversion=payloadversion, asset_time=asset_time
        )

    async def send_many(
        self, payloads: Iterable[PayloadLike], *, payloadversion: int | None = None
    ) -> list[SendResult]:
        """See :meth:`AsyncClient.send_many`."""
        return await self.client.send_many(self.asset, payloads, payloadversion=payloadversion)


class AsyncClient:
    """One sender's connection to the platform. ``async with`` connects, syncs the shadow
    and starts publishing; leaving it closes cleanly (see the module docstring).

    Build it with :meth:`from_store`; options are :class:`ClientOptions` fields, given as
    keyword arguments or as ``options=``. Use it from one event loop (the one that entered
    it); :class:`Client` is the thread-safe blocking variant.
    """

    def __init__(
        self,
        identity: DeviceIdentity,
        *,
        sender: Sender | None = None,
        options: ClientOptions | None = None,
        **overrides: Unpack[ClientOptionsArgs],
    ) -> None:
        self.identity = identity
        self.options = merged_options(options, overrides)
        props = identity.properties
        sender = sender or DEFAULT_SENDER
        if sender.siteid is None and props.site_id:
            sender = dataclasses.replace(sender, siteid=props.site_id)
        self.sender = sender
        self.topic = telemetry_topic(props.telemetry_topic, props.org_id, props.client_id)
        self.outbox_path = self.options.outbox_path or identity.store_path / OUTBOX_FILE_NAME
        self.settings = ConnectionSettings.from_store(
            identity.store_path, **self.options.connection_overrides()
        )
        self._outbox: Outbox | None = None
        self._connection: Connection | None = None
        self._shadow: ShadowSync | None = None
        self._telemetry: Telemetry | None = None
        self._named: dict[str, ShadowSync] = {}
        self._channels: dict[int, AssetChannel] = {}
        self._started = False
        self._closed = False
        self._final: ClientStats | None = None
        self._carried_over = 0

    @classmethod
    def from_store(
        cls,
        path: Path | str,
        *,
        sender: Sender | None = None,
        options: ClientOptions | None = None,
        **overrides: Unpack[ClientOptionsArgs],
    ) -> AsyncClient:
        """A client for the certificate store at ``path`` (contract section 5). Raises
        :class:`~iotref.device.errors.StoreError` (with a next step) if it is missing or
        incomplete; options are checked here too (``ValueError``)."""
        identity = CertificateStore(Path(path)).load()
        return cls(identity, sender=sender, options=options, **overrides)

    # ------------------------------------------------------------------ views

    @property
    def properties(self) -> DeviceProperties:
        return self.identity.properties

    @property
    def client_id(self) -> str:
        return self.identity.properties.client_id

    @property
    def connection(self) -> Connection:
        """The MQTT connection (for advanced use: extra subscriptions)."""
        return self._running(self._connection)

    @property
    def telemetry(self) -> Telemetry:
        """The publisher (for advanced use)."""
        return self._running(self._telemetry)

    @property
    def shadow(self) -> ShadowSync:
        """The classic shadow, kept in sync: ``client.shadow.on_desired("speed", handler)``,
        ``client.shadow.set_reported("mode", "run")``, ``await client.shadow.wait_for(...)``."""
        return self._running(self._shadow)

    @property
    def connected(self) -> bool:
        return self._connection is not None and self._connection.connected

    @property
    def permission(self) -> bool:
        """Whether ``sendTelemetryData`` is true (as last seen)."""
        return self._shadow is not None and self._shadow.send_telemetry_allowed

    @property
    def outbox_recovery(self) -> OutboxRecovery | None:
        """What was found and done when the outbox was damaged at start (see
        :mod:`iotref.device.telemetry.outbox_integrity`); None when it was sound."""
        return None if self._outbox is None else self._outbox.recovery

    @property
    def started(self) -> bool:
        return self._started and not self._closed

    def _running(self, part: T | None) -> T:
        if part is None or self._closed:
            raise ClientClosed(
                "the client is not started" if not self._closed else "the client is closed",
                "use 'async with AsyncClient.from_store(...) as client'",
            )
        return part

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> AsyncClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self, *, wait: bool = True) -> None:
        """Open the outbox, start connecting, syncing the shadow and publishing.

        With ``wait`` (and a reachable platform) it returns connected and synced: it
        waits up to ``connect_timeout_s`` for the first connection (less when the first
        attempt fails) and up to ``shadow_timeout_s`` for the first sync. Without the
        platform it starts offline (see ``fail_fast``). ``wait=False`` returns as soon as
        the outbox is open and the first attempt is under way.

        Raises :class:`OutboxBusy`, :class:`ClientError` (outbox unusable),
        :class:`~iotref.device.connection.errors.ConnectionFailed` (``kind="config"``: unusable
        certificate files; with ``fail_fast``, any failure to connect),
        :class:`~iotref.device.shadow.errors.ShadowRejected`; nothing is left running then."""
        if self._started:
            raise ClientClosed("a client can be started only once", "make a new client")
        self._started = True
        o = self.options
        try:
            self._outbox = Outbox(
                self.outbox_path,
                max_messages=o.max_messages,
                max_bytes=o.max_bytes,
                overflow=o.overflow,
                durability=o.durability,
            )
        except OutboxLocked:
            self._closed = True
            raise OutboxBusy(
                f"the outbox {self.outbox_path} is in use by another sender",
                "make sure only one process runs with this machine's identity",
            ) from None
        except OSError as exc:
            self._closed = True
            raise ClientError(
                f"cannot open the outbox {self.outbox_path}: {exc.strerror or exc}",
                f"check that {self.outbox_path.parent} is writable by this user",
            ) from None
        except (OutboxError, sqlite3.Error) as exc:
            self._closed = True
            raise ClientError(
                f"cannot open the outbox {self.outbox_path}: {exc}",
                "move the outbox files aside (nothing is deleted automatically) and start "
                "again; see docs/operations.md, 'Outbox integrity'",
            ) from None
        self._carried_over = self._outbox.depth
        try:
            connection = Connection(self.settings)
            self._connection = connection
            if o.fail_fast:
                await connection.start()
            else:
                await connection.start(wait=False)
                if wait:
                    await _first_outcome(connection, o.connect_timeout_s)
            shadow = ShadowSync(
                connection,
                self.client_id,
                initial_reported=o.initial_reported,
                first_sync_timeout_s=o.shadow_timeout_s,
            )
            self._shadow = shadow
            # Offline, the first sync happens on connect; until then the permission is
            # unknown, i.e. not granted.
            await shadow.start(wait=wait and connection.connected)
            telemetry = Telemetry(
                connection,
                self._outbox,
                self.topic,
                validator=MessageValidator(strict=o.strict_validation),
                permission=ShadowPermission(shadow),
                policy=o.policy,
                window=o.window,
                close_timeout=o.close_timeout_s,
            )
            self._telemetry = telemetry
            await telemetry.start()
        except BaseException:
            with contextlib.suppress(Exception):
                self._final = await self._shutdown(0.0, drain=False)
            self._closed = True
            raise
        where, depth, reason = self.settings.where(), self._outbox.depth, None
        if connection.connected:
            permission = "granted" if self.permission else "not granted"
            state = f"started: {where}, permission {permission}"
        elif not wait:
            state = f"started, connecting to {where}"
        else:
            reason = connection.stats.last_error
            state = f"started offline, waiting for the platform at {where}"
            state += f" ({reason})" if reason else ""
        log.log(
            logging.WARNING if wait and not connection.connected else logging.INFO,
            "client %s %s; %d message(s) waiting in %s",
            self.client_id,
            state,
            depth,
            self.outbox_path,
        )

    async def close(self, timeout: float | None = None) -> ClientStats:
        """Stop within ``timeout`` seconds (default ``close_timeout_s``; the disconnect may
        take up to :data:`CLOSE_GRACE_S` more): wait for in-flight acks and, with
        ``drain_on_close``, keep publishing until the outbox is empty, reconnecting on the
        way if the connection is down; then disconnect. What is not acknowledged stays in
        the outbox for the next run. Returns the final stats. Idempotent."""
        if self._final is not None:
            return self._final
        if not self._started or self._closed:
            self._closed = True
            self._final = self._snapshot(final=True)
            return self._final
        wait = self.options.close_timeout_s if timeout is None else max(0.0, timeout)
        final = await self._shutdown(wait, drain=self.options.drain_on_close)
        self._closed = True
        self._final = final
        if final.queued:
            log.info(
                "client %s closed; %d message(s) left in %s: the next run sends them",
                self.client_id,
                final.queued,
                self.outbox_path,
            )
        else:
            log.info("client %s closed; the outbox is empty", self.client_id)
        return final

    def _can_still_send(self) -> bool:
        """Whether draining on close may still get somewhere: not when the connection
        ended for good, nor when connected and synced without the permission to send."""
        connection = self._connection
        if connection is None or connection.state.terminal:
            return False
        shadow = self._shadow
        known_refusal = shadow is not None and shadow.synced and not self.permission
        return not (connection.connected and known_refusal)

    async def _shutdown(self, wait: float, *, drain: bool) -> ClientStats:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        if self._telemetry is not None:
            try:
                await self._telemetry.close(wait, drain=self._can_still_send if drain else False)
            except Exception:
                log.exception("closing the publisher failed")
        # Unsubscribing and disconnecting get what is left of the time, and at least a
        # moment each (CLOSE_GRACE_S in all) to say goodbye to a broker that answers.
        for sync in [*self._named.values(), self._shadow]:
            if sync is not None:
                left = max(_STOP_SHADOW_MIN_S, deadline - loop.time())
                await _bounded(sync.stop(), left, "stopping a shadow sync")
        self._named.clear()
        if self._connection is not None:
            left = max(_STOP_CONNECTION_MIN_S, deadline - loop.time())
            await _bounded(self._connection.stop(left), left + 0.5, "stopping the connection")
        # Taken once the connection is stopped (a PUBACK that came meanwhile is counted)
        # and before the outbox closes (its counts are read from it).
        final = self._snapshot(final=True)
        if self._outbox is not None:
            try:
                self._outbox.close()
            except Exception:
                log.exception("closing the outbox failed")
        return final

    # ------------------------------------------------------------------ sending

    def asset(self, asset: Asset) -> AssetChannel:
        """``asset`` bound to this client; ``await channel.send(payload)``."""
        channel = self._channels.get(id(asset))
        if channel is None or channel.asset is not asset:
            channel = AssetChannel(self, asset)
            self._channels[id(asset)] = channel
        return channel

    async def send(
        self,
        asset: Asset,
        payload: PayloadLike,
        *,
        payloadversion: int | None = None,
        asset_time: datetime | None = None,
    ) -> SendResult:
        """Build a message for ``asset`` (header from the sender and the asset, fresh
        ``sendereventuuid``, monotonic ``assettimestamp``), validate it and queue it.

        Returns when the message is committed to the outbox (``status == "queued"``), or
        discarded by ``policy="drop"`` (``"dropped_no_permission"``); the platform need not
        be reachable. Raises :class:`~iotref.device.errors.InvalidMessageError`,
        :class:`~iotref.device.errors.MessageTooLargeError` (over the platform's 128 KB per
        message), :class:`~iotref.device.errors.OutboxFullError`,
        :class:`~iotref.device.errors.ClientClosed`,
        :class:`~iotref.device.connection.ConnectionTakenOver` once another process took
        this identity's session over, and
        :class:`~iotref.device.connection.errors.ConnectionFailed` (``revoked``) once the broker
        refused the certificate as revoked (nothing is queued then).
        ``payload`` may be a plain dict (a Status payload of ``payloadversion``, default 2).
        """
        message = build_message(
            self.sender, asset, as_payload(payload, payloadversion), asset_time=asset_time
        )
        return await self.send_message(message)

    async def send_many(
        self, asset: Asset, payloads: Iterable[PayloadLike], *, payloadversion: int | None = None
    ) -> list[SendResult]:
        """:meth:`send` for several payloads of ``asset``, in order, committed in one
        transaction (the high-rate way to send); one invalid message refuses them all and
        nothing is queued."""
        messages = [
            build_message(self.sender, asset, as_payload(payload, payloadversion))
            for payload in payloads
        ]
        return await self.send_messages(messages)

    async def send_message(self, message: Mapping[str, Any]) -> SendResult:
        """Validate and queue a complete message (header and payload) as it is; refused
        as by :meth:`send`."""
        telemetry = self._running(self._telemetry)
        self._raise_if_taken_over()
        with _refusals():
            return await telemetry.send(dict(message))

    async def send_messages(self, messages: Iterable[Mapping[str, Any]]) -> list[SendResult]:
        """:meth:`send_message` for several complete messages, committed in one
        transaction; one invalid message refuses them all and nothing is queued."""
        telemetry = self._running(self._telemetry)
        self._raise_if_taken_over()
        with _refusals():
            return await telemetry.send_many([dict(m) for m in messages])

    def _raise_if_taken_over(self) -> None:
        connection = self._connection
        refused = connection.refused if connection is not None else None
        if refused is not None:
            raise ConnectionFailed(
                refused.reason,
                refused.hint or refused.next_step,
                kind=refused.kind,
                revoked=refused.revoked,
            )
        if connection is not None and connection.taken_over:
            raise ConnectionTakenOver(
                f"client id {self.client_id!r} is in use by another connection: "
                f"{connection.stats.last_error or 'taken over'}",
                "make sure only one process runs with this machine's identity "
                "(a copied certificate store is the usual cause)",
            )

    # ------------------------------------------------------------------ waiting

    async def wait_drained(self, timeout: float | None = None) -> bool:
        """Wait until every queued message was acknowledged; False after ``timeout``."""
        outbox = self._running(self._outbox)
        deadline = None if timeout is None else time.monotonic() + timeout
        while outbox.depth > 0:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_POLL_S)
        return True

    async def wait_permission(
        self,
        allowed: bool = True,
        timeout: float | None = None,
    ) -> bool:
        """Wait until ``sendTelemetryData`` is ``allowed``; False after ``timeout``."""
        self._running(self._shadow)
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.permission is not allowed:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_POLL_S)
        return True

    # ------------------------------------------------------------------ shadows, events

    async def named_shadow(self, name: str, **sync_options: Any) -> ShadowSync:
        """A named shadow of this thing, synced like the classic one (started on first use,
        stopped with the client). ``sync_options`` go to :class:`ShadowSync` the first time."""
        sync = self._named.get(name)
        if sync is None:
            connection = self._running(self._connection)
            sync = ShadowSync(connection, self.client_id, name, **sync_options)
            self._named[name] = sync
            try:
                await sync.start()
            except BaseException:
                self._named.pop(name, None)
                with contextlib.suppress(Exception):
                    await sync.stop()
                raise
        return sync

    def events(self) -> AsyncIterator[ConnectionEvent]:
        """The connection's state changes from now on (ends when the client closes)."""
        return self._running(self._connection).events()

    def stats(self) -> ClientStats:
        """A snapshot (see :class:`ClientStats`); after close, the final one."""
        if self._final is not None:
            return self._final
        return self._snapshot()

    def _snapshot(self, *, final: bool = False) -> ClientStats:
        """The stats now; ``final``: of a client that is stopping for good."""
        return client_stats(
            self._connection,
            self._shadow,
            self._telemetry,
            self._outbox,
            policy=self.options.policy,
            carried_over=self._carried_over,
            running=self._started and not self._closed,
            final=final,
        )
