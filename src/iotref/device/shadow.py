"""Device shadow on the device side (contract section 7): requests and state sync.

Owns:

- :class:`ShadowClient`: ``get`` / ``update`` / ``delete`` of a classic or named shadow over
  MQTT, each request correlated with its answer by a fresh ``clientToken``; an answer on
  ``/rejected`` raises :class:`ShadowRejected` with the service's code and message, no
  answer in time raises :class:`ShadowTimeout`.
- :class:`ShadowSync`: keeps the device's local state in step with its shadow, following
  the reference sequence (subscribe, ``get``, take ``state.desired`` into the local state,
  report it back as ``state.reported``) on start and after EVERY reconnect, plus: deltas
  applied as they come (any older than the version already applied is ignored), the
  reported state published after every applied change, application callbacks that accept,
  adjust or refuse a desired change, local changes reported, a way to await a value, and
  the ``sendTelemetryData`` permission with a change callback.
- :class:`BlockingShadowSync`: a small blocking facade for scripts.

The document rules themselves (delta, JSON equality) come from
:mod:`iotref.protocol.shadow_document`, shared with the sandbox's shadow service.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import inspect
import json
import logging
import threading
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar, overload

from iotref.device import stdlib_compat
from iotref.device.backoff import Backoff
from iotref.device.connection.connection import Connection
from iotref.device.connection.errors import MqttError, PublishFailed
from iotref.device.connection.settings import ConnectionSettings
from iotref.device.connection.state import IncomingMessage
from iotref.device.errors import IotrefError
from iotref.protocol.shadow_document import compute_delta, json_equal
from iotref.protocol.topics import shadow_topic

log = logging.getLogger("iotref.shadow")

JsonObject = dict[str, Any]
SEND_TELEMETRY_KEY = "sendTelemetryData"
DEFAULT_TIMEOUT_S = 10.0
RETRYABLE_CODES = frozenset({429, 500, 503})
"""Rejections worth retrying after a pause (throttled, internal error)."""
SHADOW_QOS = 0
"""QoS of shadow requests and of the answer and delta subscriptions. 0 on purpose: the
answer is the acknowledgement (a lost request or answer times out and is retried, a retried
update merges the same fields again; every reconnect does a fresh get, so a delta lost with
a connection is recovered). QoS 1 costs latency for nothing: each QoS 1 message makes its
receiver write a PUBACK right before its answer, and Nagle's algorithm (awscrt, like paho,
does not set TCP_NODELAY) holds the answer back until the peer's delayed ACK, about 40 ms
per hop."""
SUBSCRIBE_QOS = SHADOW_QOS
RESPONSE_SUFFIXES = (
    "get/accepted",
    "get/rejected",
    "update/accepted",
    "update/rejected",
    "update/delta",
    "delete/accepted",
    "delete/rejected",
)

T = TypeVar("T")


# --------------------------------------------------------------------------- errors


class ShadowError(IotrefError):
    """Base class of shadow failures."""


class ShadowRejected(ShadowError):
    """The shadow service answered on ``/rejected``: ``code`` (HTTP-style) and ``message``
    as documented in "Device Shadow error messages"."""

    def __init__(self, code: int, message: str, client_token: str | None = None) -> None:
        super().__init__(f"shadow request rejected: {code} {message}")
        self.code = code
        self.message = message
        self.client_token = client_token


class ShadowTimeout(ShadowError):
    """No answer to a shadow request in time (not connected, or the service is slow)."""


class DesiredChangeRefused(ShadowError):
    """Raise from a desired-change handler to refuse the change (or return :class:`Refuse`)."""


@dataclass(frozen=True)
class Refuse:
    """Return from a desired-change handler to refuse the change."""

    reason: str = "refused by the application"


@dataclass(frozen=True)
class DesiredChange:
    """What a desired-change handler is asked about.

    For a key handler: ``key``, its full desired ``value``, the ``delta`` part that differs
    from reported, and the currently ``reported`` value (``None`` if absent). For a
    whole-delta handler (``key`` is ``None``): ``value`` maps every undecided key to its
    desired value, ``delta`` is the delta of those keys, ``reported`` the reported section.
    """

    key: str | None
    value: Any
    delta: Any
    reported: Any
    version: int


DesiredHandler = Callable[[DesiredChange], Any]
"""Returns ``None`` to accept, another value to adjust (that value is applied and
reported), or :class:`Refuse` / raises to refuse. May be ``async``."""
TelemetryCallback = Callable[[bool], Awaitable[None] | None]


# --------------------------------------------------------------------------- helpers


def new_client_token() -> str:
    """A fresh clientToken: 32 hex digits (the service allows up to 64 bytes)."""
    return uuid.uuid4().hex


def merge_into(target: JsonObject, patch: Mapping[str, Any]) -> None:
    """Merge ``patch`` into ``target`` the way the shadow service merges an update: objects
    recursively, ``None`` removes, everything else replaces; emptied objects disappear."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict):
            child = target.get(key)
            if not isinstance(child, dict):
                child = {}
            merge_into(child, value)
            if child:
                target[key] = child
            else:
                target.pop(key, None)
        else:
            target[key] = copy.deepcopy(value)


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> JsonObject:
    """The smallest update that turns ``old`` into ``new`` under :func:`merge_into`:
    changed fields, objects recursively, ``None`` for fields that are gone."""
    patch: JsonObject = {}
    for key, value in new.items():
        if key not in old:
            patch[key] = copy.deepcopy(value)
            continue
        before = old[key]
        if isinstance(value, dict) and isinstance(before, dict):
            sub = merge_patch(before, value)
            if sub:
                patch[key] = sub
            elif not value and before:
                patch[key] = None
        elif not json_equal(value, before):
            patch[key] = copy.deepcopy(value)
    for key in old:
        if key not in new:
            patch[key] = None
    return patch


def _decode(payload: bytes) -> JsonObject | None:
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _section(doc: Mapping[str, Any], name: str) -> JsonObject:
    state = doc.get("state")
    if not isinstance(state, dict):
        return {}
    value = state.get(name)
    return copy.deepcopy(value) if isinstance(value, dict) else {}


def _without_refused(patch: JsonObject, refused: Mapping[str, Any]) -> JsonObject:
    """``patch`` less the leaves that were refused with the very same value (a leaf that
    changed since is reported again)."""
    out: JsonObject = {}
    for key, value in patch.items():
        if key not in refused:
            out[key] = value
        elif isinstance(value, dict) and isinstance(refused[key], dict):
            rest = _without_refused(value, refused[key])
            if rest:
                out[key] = rest
        elif not json_equal(value, refused[key]):
            out[key] = value
    return out


def _version(doc: Mapping[str, Any]) -> int | None:
    value = doc.get("version")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --------------------------------------------------------------------------- requests


ShadowListener = Callable[[str, JsonObject, bool], None]
"""``listener(suffix, document, own)``: every answer or delta; ``own`` if it answers one of
this client's requests."""


class ShadowClient:
    """Requests to one classic (``shadow_name=None``) or named shadow of ``thing_name``."""

    def __init__(
        self,
        connection: Connection,
        thing_name: str,
        shadow_name: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        qos: int = SHADOW_QOS,
    ) -> None:
        self.connection = connection
        self.thing_name = thing_name
        self.shadow_name = shadow_name
        self.timeout_s = timeout_s
        self.qos = qos
        self._pending: dict[str, tuple[str, asyncio.Future[JsonObject]]] = {}
        self._listeners: list[ShadowListener] = []
        self._subscribed = False
        self._subscribe_lock = asyncio.Lock()
        self._handlers: dict[str, Callable[[IncomingMessage], None]] = {}

    def topic(self, suffix: str) -> str:
        return shadow_topic(self.thing_name, suffix, self.shadow_name)

    @property
    def label(self) -> str:
        name = "classic" if self.shadow_name is None else f"named {self.shadow_name!r}"
        return f"{name} shadow of {self.thing_name}"

    def add_listener(self, listener: ShadowListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: ShadowListener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    async def subscribe(self) -> None:
        """Subscribe to the answer topics (once; the connection keeps them across
        reconnects). Raises :class:`~iotref.device.connection.errors.SubscribeFailed`."""
        async with self._subscribe_lock:
            if self._subscribed:
                return
            handlers = {suffix: self._handler_for(suffix) for suffix in RESPONSE_SUFFIXES}
            # One SUBSCRIBE for all seven (within the platform's 8 filters per SUBSCRIBE).
            await self.connection.subscribe_many(
                [(self.topic(suffix), handler) for suffix, handler in handlers.items()],
                qos=self.qos,
            )
            self._handlers.update(handlers)
            self._subscribed = True

    async def close(self) -> None:
        """Unsubscribe this client's handlers and fail its outstanding requests."""
        for suffix, handler in self._handlers.items():
            with contextlib.suppress(MqttError):
                await self.connection.unsubscribe(self.topic(suffix), handler)
        self._handlers.clear()
        self._subscribed = False
        for _, fut in self._pending.values():
            if not fut.done():
                fut.cancel()
        self._pending.clear()

    def _handler_for(self, suffix: str) -> Callable[[IncomingMessage], None]:
        def handle(message: IncomingMessage) -> None:
            self._on_message(suffix, message)

        return handle

    def _on_message(self, suffix: str, message: IncomingMessage) -> None:
        doc = _decode(message.payload)
        if doc is None:
            log.warning("%s: ignoring a non-JSON message on %s", self.label, suffix)
            return
        token = doc.get("clientToken")
        own = False
        if isinstance(token, str) and token in self._pending:
            operation, fut = self._pending[token]
            if suffix.startswith(operation + "/") and suffix != "update/delta":
                own = True
                del self._pending[token]
                if not fut.done():
                    if suffix.endswith("/rejected"):
                        code = doc.get("code")
                        fut.set_exception(
                            ShadowRejected(
                                int(code) if isinstance(code, int) else 0,
                                str(doc.get("message", "")),
                                token,
                            )
                        )
                    else:
                        fut.set_result(doc)
        for listener in list(self._listeners):
            try:
                listener(suffix, doc, own)
            except Exception:
                log.exception("%s: listener failed", self.label)

    async def get(self, *, timeout_s: float | None = None) -> JsonObject:
        """The shadow document (``state`` with ``desired``/``reported``/``delta``,
        ``metadata``, ``version``...). 404 (no shadow) raises :class:`ShadowRejected`."""
        return await self.request("get", {}, timeout_s=timeout_s)

    async def update(
        self,
        state: Mapping[str, Any],
        *,
        version: int | None = None,
        timeout_s: float | None = None,
    ) -> JsonObject:
        """Update ``state`` (``{"desired": {...}, "reported": {...}}``); ``version`` makes
        it conditional. Returns the ``update/accepted`` document."""
        body: JsonObject = {"state": dict(state)}
        if version is not None:
            body["version"] = version
        return await self.request("update", body, timeout_s=timeout_s)

    async def delete(self, *, timeout_s: float | None = None) -> JsonObject:
        """Delete the shadow; returns the ``delete/accepted`` document."""
        return await self.request("delete", {}, timeout_s=timeout_s)

    async def request(
        self, operation: str, body: Mapping[str, Any], *, timeout_s: float | None = None
    ) -> JsonObject:
        """Publish ``body`` (plus a fresh clientToken) to ``operation`` and await the
        correlated answer."""
        if operation not in ("get", "update", "delete"):
            raise ValueError(f"unknown shadow operation {operation!r}")
        await self.subscribe()
        token = new_client_token()
        payload = dict(body)
        payload["clientToken"] = token
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[JsonObject] = loop.create_future()
        self._pending[token] = (operation, fut)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            # The connection's pace covers shadow requests too (a telemetry backlog draining
            # at the quota leaves them their share).
            await self.connection.pace()
            published = self.connection.publish_nowait(
                self.topic(operation),
                json.dumps(payload, separators=(",", ":")).encode(),
                self.qos,
            )
            published.add_done_callback(lambda f: self._on_published(f, token))
            try:
                async with stdlib_compat.timeout(timeout):
                    return await fut
            except TimeoutError:
                raise ShadowTimeout(
                    f"no answer to {operation} on the {self.label} within {timeout:g} s",
                    "check the connection; the request is retried on the next sync",
                ) from None
        finally:
            self._pending.pop(token, None)

    def _on_published(self, published: asyncio.Future[None], token: str) -> None:
        if published.cancelled():
            return
        exc = published.exception()
        if exc is None:
            return
        entry = self._pending.pop(token, None)
        if entry is not None and not entry[1].done():
            entry[1].set_exception(exc)


# --------------------------------------------------------------------------- sync


@dataclass
class _Waiter:
    section: str
    key: str
    predicate: Callable[[Any], bool]
    future: asyncio.Future[Any]


_ANY = object()


class ShadowSync:
    """Keeps local state and one shadow in step. ``async with ShadowSync(conn, thing)``.

    ``desired`` mirrors the shadow's desired section as last seen; ``reported`` is the
    device's local state (what it reports); ``version`` is the shadow version whose desired
    state was applied last. A desired value is decided (accepted, adjusted or refused) once;
    it is offered to the handlers again only when it changes, after a restart, or on
    :meth:`reconcile`.
    """

    def __init__(
        self,
        connection: Connection,
        thing_name: str,
        shadow_name: str | None = None,
        *,
        initial_reported: Mapping[str, Any] | None = None,
        accept_unhandled: bool = True,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        first_sync_timeout_s: float | None = None,
        client: ShadowClient | None = None,
    ) -> None:
        self.connection = connection
        self.client = client or ShadowClient(
            connection, thing_name, shadow_name, timeout_s=timeout_s
        )
        self.accept_unhandled = accept_unhandled
        self.first_sync_timeout_s = (
            timeout_s if first_sync_timeout_s is None else first_sync_timeout_s
        )
        self._desired: JsonObject = {}
        self._reported: JsonObject = copy.deepcopy(dict(initial_reported or {}))
        self._cloud_reported: JsonObject | None = None  # None: not synced yet
        self._version = -1
        self._decided: JsonObject = {}
        self._key_handlers: dict[str, DesiredHandler] = {}
        self._delta_handler: DesiredHandler | None = None
        self._telemetry_callbacks: list[TelemetryCallback] = []
        self._telemetry_allowed = False
        self._waiters: list[_Waiter] = []
        self._flush_waiters: list[asyncio.Future[None]] = []
        self._lock = asyncio.Lock()
        self._report_needed = asyncio.Event()
        self._sync_task: asyncio.Task[None] | None = None
        self._reporter_task: asyncio.Task[None] | None = None
        self._refused_patch: JsonObject = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._synced = asyncio.Event()
        self._sync_error: ShadowError | None = None
        self._started = False
        self.syncs = 0
        """Completed get-and-apply rounds (one per start and reconnect)."""
        self.reports = 0
        """Accepted reported updates."""
        self.last_error: str | None = None

    # ------------------------------------------------------------------ views

    @property
    def thing_name(self) -> str:
        return self.client.thing_name

    @property
    def shadow_name(self) -> str | None:
        return self.client.shadow_name

    @property
    def desired(self) -> JsonObject:
        return copy.deepcopy(self._desired)

    @property
    def reported(self) -> JsonObject:
        return copy.deepcopy(self._reported)

    @property
    def version(self) -> int:
        """The shadow version whose desired state was applied last (-1: none yet)."""
        return self._version

    @property
    def synced(self) -> bool:
        """Whether a get-and-apply round completed since the last (re)connect."""
        return self._synced.is_set()

    @property
    def send_telemetry_allowed(self) -> bool:
        """The ``sendTelemetryData`` permission: the desired value when the shadow has one,
        else the reported one; ``False`` while unknown."""
        return self._telemetry_allowed

    # ------------------------------------------------------------------ registration

    @overload
    def on_desired(self, key: str, handler: DesiredHandler) -> None: ...

    @overload
    def on_desired(self, key: DesiredHandler, handler: None = None) -> None: ...

    def on_desired(self, key: str | DesiredHandler, handler: DesiredHandler | None = None) -> None:
        """``on_desired("speed", h)`` decides changes of one top-level key;
        ``on_desired(h)`` decides every key that has no key handler (whole delta: return
        ``None`` to accept all, a dict of the changes to apply instead, or refuse)."""
        if isinstance(key, str):
            if handler is None:
                raise TypeError("on_desired(key, handler) needs a handler")
            self._key_handlers[key] = handler
        else:
            self._delta_handler = key

    def on_send_telemetry_changed(self, callback: TelemetryCallback) -> None:
        """``callback(allowed)`` whenever :attr:`send_telemetry_allowed` changes."""
        self._telemetry_callbacks.append(callback)

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> ShadowSync:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self, *, wait: bool = True) -> None:
        """Subscribe, sync now if connected and after every reconnect. With ``wait``, wait
        for the first sync up to ``first_sync_timeout_s``: a rejection that retrying cannot
        fix (e.g. 403) raises :class:`ShadowRejected`; a timeout only logs (the sync goes on
        in the background)."""
        if self._started:
            return
        self._started = True
        self.client.add_listener(self._on_shadow_message)
        self.connection.add_connected_callback(self._on_connected)
        self._reporter_task = asyncio.get_running_loop().create_task(self._reporter())
        if self.connection.connected:
            self._start_sync()
        if wait:
            try:
                await self.wait_synced(self.first_sync_timeout_s)
            except TimeoutError:
                log.warning(
                    "%s: first sync not done within %g s; continuing in the background",
                    self.client.label,
                    self.first_sync_timeout_s,
                )

    async def stop(self) -> None:
        """Stop syncing (subscriptions are removed; the connection stays up)."""
        if not self._started:
            return
        self._started = False
        self.connection.remove_connected_callback(self._on_connected)
        self.client.remove_listener(self._on_shadow_message)
        for task in [self._sync_task, self._reporter_task, *self._tasks]:
            if task is not None:
                task.cancel()
        for task in [self._sync_task, self._reporter_task, *self._tasks]:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._tasks.clear()
        await self.client.close()
        for waiter in self._waiters:
            waiter.future.cancel()
        for fut in self._flush_waiters:
            fut.cancel()

    async def wait_synced(self, timeout: float | None = None) -> None:
        """Wait for a completed sync since the last (re)connect; raises the sync's error
        if it failed for good, :class:`TimeoutError` after ``timeout``."""
        if self._sync_error is not None:
            raise self._sync_error
        async with stdlib_compat.timeout(timeout):
            await self._synced.wait()
        if self._sync_error is not None:
            raise self._sync_error

    # ------------------------------------------------------------------ local state

    def set_reported(self, key: str, value: Any) -> None:
        """Set one local value (``None`` removes it) and report it."""
        self.update_local({key: value})

    def update_local(self, changes: Mapping[str, Any]) -> None:
        """Merge ``changes`` into the local state (``None`` removes) and report them."""
        merge_into(self._reported, changes)
        self._after_local_change()

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until the shadow's reported section has every local change."""
        if self._report_pending() is False:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flush_waiters.append(fut)
        self._report_needed.set()
        try:
            async with stdlib_compat.timeout(timeout):
                await fut
        finally:
            if fut in self._flush_waiters:
                self._flush_waiters.remove(fut)

    async def wait_for(
        self,
        key: str,
        value: Any = _ANY,
        *,
        section: str = "reported",
        predicate: Callable[[Any], bool] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Wait until ``section`` (``"reported"``: applied locally, or ``"desired"``) has
        ``key`` equal to ``value`` (any value if omitted, or matching ``predicate``);
        return the value."""
        if section not in ("reported", "desired"):
            raise ValueError("section is 'reported' or 'desired'")
        if predicate is None:
            if value is _ANY:

                def predicate(_: Any) -> bool:
                    return True

            else:

                def predicate(v: Any) -> bool:
                    return json_equal(v, value)

        current = self._reported if section == "reported" else self._desired
        if key in current and predicate(current[key]):
            return copy.deepcopy(current[key])
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(section, key, predicate, fut)
        self._waiters.append(waiter)
        try:
            async with stdlib_compat.timeout(timeout):
                return await fut
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    async def reconcile(self, keys: list[str] | None = None) -> None:
        """Offer the outstanding desired changes (of ``keys``, or all) to the handlers
        again, e.g. after a refusal whose cause went away."""
        async with self._lock:
            for key in keys if keys is not None else list(self._decided):
                self._decided.pop(key, None)
            delta = compute_delta(self._desired, self._reported)
            if keys is not None:
                delta = {k: v for k, v in delta.items() if k in keys}
            await self._apply_delta(delta, self._version)

    # ------------------------------------------------------------------ sync internals

    def _on_connected(self, session_present: bool) -> None:
        self._start_sync()

    def _start_sync(self) -> None:
        if not self._started:
            return
        self._synced.clear()
        self._sync_error = None
        if self._sync_task is not None and not self._sync_task.done():
            self._sync_task.cancel()
        self._sync_task = asyncio.get_running_loop().create_task(self._sync())

    async def _sync(self) -> None:
        backoff = Backoff(0.5, 30.0)
        while self._started:
            try:
                await self.client.subscribe()
                try:
                    doc: JsonObject | None = await self.client.get()
                except ShadowRejected as exc:
                    if exc.code != 404:
                        raise
                    doc = None
                async with self._lock:
                    await self._apply_document(doc)
                self.syncs += 1
                self._synced.set()
                self._report_needed.set()
                log.info(
                    "%s: synced at version %d%s",
                    self.client.label,
                    self._version,
                    "" if doc is not None else " (no shadow yet)",
                )
                return
            except ShadowRejected as exc:
                self.last_error = str(exc)
                if exc.code not in RETRYABLE_CODES:
                    log.error("%s: sync failed: %s", self.client.label, exc)
                    self._sync_error = exc
                    self._synced.set()  # wake waiters; wait_synced raises
                    return
                log.warning("%s: sync: %s; retrying", self.client.label, exc)
            except (ShadowTimeout, PublishFailed, MqttError) as exc:
                self.last_error = str(exc)
                if not self.connection.connected:
                    log.info(
                        "%s: sync interrupted (%s); again on reconnect", self.client.label, exc
                    )
                    return
                log.warning("%s: sync: %s; retrying", self.client.label, exc)
            await asyncio.sleep(backoff.next_delay())

    async def _apply_document(self, doc: JsonObject | None) -> None:
        """A fresh get: take desired, reconcile reported, apply the delta."""
        if doc is None:
            self._desired = {}
            self._cloud_reported = {}
            self._after_desired_change()
            return
        version = _version(doc)
        cloud_reported = _section(doc, "reported")
        if self._cloud_reported is None:
            # First sync of this process: the shadow's reported state is the starting
            # point; local values set before it win.
            local = self._reported
            self._reported = copy.deepcopy(cloud_reported)
            merge_into(self._reported, local)
        self._cloud_reported = cloud_reported
        if version is not None and version < self._version:
            # The get answer is the shadow as it is now, and versions only grow (a delete
            # resets them through delete/accepted): the version applied before cannot have
            # come from this shadow (a forged or corrupted message). Take the shadow's.
            log.warning(
                "%s: the shadow is at version %d, but version %d was applied; taking the "
                "shadow's document",
                self.client.label,
                version,
                self._version,
            )
            self._decided.clear()
        self._desired = _section(doc, "desired")
        applied_version = version if version is not None else self._version
        self._after_desired_change()
        await self._apply_delta(compute_delta(self._desired, self._reported), applied_version)
        self._version = applied_version

    def _on_shadow_message(self, suffix: str, doc: JsonObject, own: bool) -> None:
        if suffix == "update/delta":
            self._spawn(self._on_delta(doc))
        elif suffix == "update/accepted":
            version = _version(doc)
            if version is not None and version < self._version and self._synced.is_set():
                # The service numbers its updates in order; an accepted update older than
                # the version applied means that version was not the service's: resync.
                log.warning(
                    "%s: update accepted at version %d below the applied %d; syncing again",
                    self.client.label,
                    version,
                    self._version,
                )
                self._start_sync()
            elif not own:
                self._on_foreign_update(doc)
        elif suffix == "delete/accepted":
            self._on_deleted(doc)

    async def _on_delta(self, doc: JsonObject) -> None:
        version = _version(doc)
        async with self._lock:
            if self._cloud_reported is None:
                return  # not synced yet; the sync's get covers it
            if version is not None and version <= self._version:
                log.debug(
                    "%s: ignoring delta version %d (applied %d)",
                    self.client.label,
                    version,
                    self._version,
                )
                return
            raw = doc.get("state")
            state: JsonObject = copy.deepcopy(raw) if isinstance(raw, dict) else {}
            merge_into(self._desired, state)
            self._after_desired_change()
            relevant = {
                k: v for k, v in compute_delta(self._desired, self._reported).items() if k in state
            }
            await self._apply_delta(relevant, version if version is not None else self._version)
            if version is not None:
                self._version = version

    def _on_foreign_update(self, doc: JsonObject) -> None:
        """Someone else's accepted update: track removals from desired (deltas only carry
        values, not removals)."""
        version = _version(doc)
        if version is not None and version < self._version:
            return
        state = doc.get("state")
        if not isinstance(state, dict) or "desired" not in state:
            return
        desired = state["desired"]
        if desired is None:
            self._desired = {}
        elif isinstance(desired, dict):
            removals = _removals(desired)
            if not removals:
                return
            merge_into(self._desired, removals)
        else:
            return
        self._after_desired_change()

    def _on_deleted(self, doc: JsonObject) -> None:
        log.info("%s: the shadow was deleted", self.client.label)
        self._desired = {}
        self._cloud_reported = {} if self._cloud_reported is not None else None
        self._version = -1
        self._decided.clear()
        self._after_desired_change()

    async def _apply_delta(self, delta: JsonObject, version: int) -> None:
        """Offer ``delta`` (desired keys that differ from local) to the handlers and apply
        what they accept. Called with the lock held."""
        undecided: JsonObject = {}
        for key in delta:
            want = self._desired.get(key)
            if key in self._decided and json_equal(self._decided[key], want):
                continue
            undecided[key] = want
        if not undecided:
            return
        applied: JsonObject = {}
        rest: JsonObject = {}
        for key, want in undecided.items():
            handler = self._key_handlers.get(key)
            if handler is None:
                rest[key] = want
                continue
            change = DesiredChange(
                key,
                copy.deepcopy(want),
                copy.deepcopy(delta[key]),
                copy.deepcopy(self._reported.get(key)),
                version,
            )
            outcome = await self._decide(handler, change)
            self._decided[key] = copy.deepcopy(want)
            if isinstance(outcome, Refuse):
                log.warning("%s: desired %s refused: %s", self.client.label, key, outcome.reason)
                continue
            applied[key] = want if outcome is None else outcome
        if rest:
            if self._delta_handler is not None:
                change = DesiredChange(
                    None,
                    copy.deepcopy(rest),
                    {k: copy.deepcopy(delta[k]) for k in rest},
                    copy.deepcopy(self._reported),
                    version,
                )
                outcome = await self._decide(self._delta_handler, change)
                for key, want in rest.items():
                    self._decided[key] = copy.deepcopy(want)
                if isinstance(outcome, Refuse):
                    log.warning(
                        "%s: desired %s refused: %s",
                        self.client.label,
                        ", ".join(rest),
                        outcome.reason,
                    )
                elif outcome is None:
                    applied.update(rest)
                elif isinstance(outcome, Mapping):
                    applied.update(outcome)
                    refused = [k for k in rest if k not in outcome]
                    if refused:
                        log.warning(
                            "%s: desired %s not applied (left out by the handler)",
                            self.client.label,
                            ", ".join(refused),
                        )
                else:
                    log.error(
                        "%s: whole-delta handler returned %s; nothing applied",
                        self.client.label,
                        type(outcome).__name__,
                    )
            elif self.accept_unhandled:
                applied.update(rest)
                for key, want in rest.items():
                    self._decided[key] = copy.deepcopy(want)
        if not applied:
            return
        for key, value in applied.items():
            if isinstance(value, dict) and isinstance(self._reported.get(key), dict):
                merge_into(self._reported[key], value)
            elif value is None:
                self._reported.pop(key, None)
            else:
                self._reported[key] = copy.deepcopy(value)
        log.info(
            "%s: applied desired %s (version %d)",
            self.client.label,
            ", ".join(sorted(applied)),
            version,
        )
        self._after_local_change()

    async def _decide(self, handler: DesiredHandler, change: DesiredChange) -> Any:
        try:
            outcome = handler(change)
            if inspect.isawaitable(outcome):
                outcome = await outcome
        except DesiredChangeRefused as exc:
            return Refuse(exc.reason)
        except Exception as exc:
            log.exception("%s: desired-change handler failed", self.client.label)
            return Refuse(f"handler failed: {type(exc).__name__}: {exc}")
        return outcome

    # ------------------------------------------------------------------ reporting

    def _report_pending(self) -> bool | None:
        """Whether local state differs from the shadow's reported (``None``: unknown)."""
        if self._cloud_reported is None:
            return None
        return bool(merge_patch(self._cloud_reported, self._reported))

    def _after_local_change(self) -> None:
        self._report_needed.set()
        self._check_waiters()
        self._check_telemetry()

    def _after_desired_change(self) -> None:
        self._check_waiters()
        self._check_telemetry()

    async def _reporter(self) -> None:
        """Publishes ``state.reported`` whenever local state differs from the shadow's:
        one update in flight at a time, changes made meanwhile coalesced."""
        backoff = Backoff(0.2, 10.0)
        while True:
            await self._report_needed.wait()
            self._report_needed.clear()
            if self._cloud_reported is None or not self.connection.connected:
                continue  # the next sync sets _report_needed again
            patch = merge_patch(self._cloud_reported, self._reported)
            if self._refused_patch:
                patch = _without_refused(patch, self._refused_patch)
            if not patch:
                self._resolve_flush()
                continue
            try:
                await self.client.update({"reported": patch})
            except ShadowRejected as exc:
                self.last_error = str(exc)
                if exc.code in RETRYABLE_CODES:
                    log.warning("%s: report: %s; retrying", self.client.label, exc)
                    await asyncio.sleep(backoff.next_delay())
                    self._report_needed.set()
                else:
                    log.error("%s: reported state refused: %s", self.client.label, exc)
                    self._fail_flush(exc)
                    # Retrying the same patch would be refused again, and every later
                    # report would carry it. Report the refused keys no more (they stay in
                    # local state) until they change again.
                    self._refused_patch = patch
                continue
            except (ShadowTimeout, MqttError) as exc:
                self.last_error = str(exc)
                log.warning("%s: report not confirmed: %s", self.client.label, exc)
                if self.connection.connected:
                    await asyncio.sleep(backoff.next_delay())
                    self._report_needed.set()
                continue
            backoff.reset()
            self.reports += 1
            if self._cloud_reported is not None:
                merge_into(self._cloud_reported, patch)
            if merge_patch(self._cloud_reported or {}, self._reported):
                self._report_needed.set()
            else:
                self._resolve_flush()

    def _resolve_flush(self) -> None:
        for fut in self._flush_waiters:
            if not fut.done():
                fut.set_result(None)
        self._flush_waiters.clear()

    def _fail_flush(self, exc: BaseException) -> None:
        for fut in self._flush_waiters:
            if not fut.done():
                fut.set_exception(exc)
        self._flush_waiters.clear()

    # ------------------------------------------------------------------ notifications

    def _check_waiters(self) -> None:
        for waiter in list(self._waiters):
            current = self._reported if waiter.section == "reported" else self._desired
            if waiter.future.done() or waiter.key not in current:
                continue
            value = current[waiter.key]
            try:
                matched = waiter.predicate(value)
            except Exception as exc:
                waiter.future.set_exception(exc)
                continue
            if matched:
                waiter.future.set_result(copy.deepcopy(value))

    def _check_telemetry(self) -> None:
        source = self._desired if SEND_TELEMETRY_KEY in self._desired else self._reported
        allowed = source.get(SEND_TELEMETRY_KEY) is True
        if allowed == self._telemetry_allowed:
            return
        self._telemetry_allowed = allowed
        log.info("%s: %s is now %s", self.client.label, SEND_TELEMETRY_KEY, str(allowed).lower())
        for callback in list(self._telemetry_callbacks):
            try:
                result = callback(allowed)
            except Exception:
                log.exception("sendTelemetryData callback failed")
                continue
            if inspect.isawaitable(result):
                self._spawn(result)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)


def _removals(desired: Mapping[str, Any]) -> JsonObject:
    """Only the ``None`` leaves of an update's desired section (with their parents)."""
    out: JsonObject = {}
    for key, value in desired.items():
        if value is None:
            out[key] = None
        elif isinstance(value, dict):
            sub = _removals(value)
            if sub:
                out[key] = sub
    return out


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("shadow task failed", exc_info=task.exception())


# --------------------------------------------------------------------------- blocking


class BlockingShadowSync:
    """A blocking facade for scripts: a connection and a :class:`ShadowSync` on a private
    event loop in a background thread.

    ``with BlockingShadowSync(ConnectionSettings.from_store(d)) as shadow:
    shadow.set_reported("speed", 5); shadow.wait_for("mode", "run", timeout=30)``
    """

    def __init__(
        self,
        settings: ConnectionSettings,
        thing_name: str | None = None,
        shadow_name: str | None = None,
        **sync_options: Any,
    ) -> None:
        self.settings = settings
        self._thing = thing_name or settings.client_id
        self._shadow_name = shadow_name
        self._options = sync_options
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._connection: Connection | None = None
        self._sync: ShadowSync | None = None

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        fut: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(timeout)

    def __enter__(self) -> BlockingShadowSync:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()

        async def go() -> None:
            self._connection = Connection(self.settings)
            await self._connection.start()
            self._sync = ShadowSync(
                self._connection, self._thing, self._shadow_name, **self._options
            )
            await self._sync.start()

        try:
            self._call(go())
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def down() -> None:
            if self._sync is not None:
                await self._sync.stop()
            if self._connection is not None:
                await self._connection.stop()

        try:
            self._call(down(), 30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    @property
    def sync(self) -> ShadowSync:
        assert self._sync is not None, "not started"
        return self._sync

    @property
    def desired(self) -> JsonObject:
        return self._call(_value(lambda: self.sync.desired))

    @property
    def reported(self) -> JsonObject:
        return self._call(_value(lambda: self.sync.reported))

    @property
    def send_telemetry_allowed(self) -> bool:
        return self.sync.send_telemetry_allowed

    def set_reported(self, key: str, value: Any) -> None:
        self._call(_value(lambda: self.sync.set_reported(key, value)))

    def update_local(self, changes: Mapping[str, Any]) -> None:
        self._call(_value(lambda: self.sync.update_local(changes)))

    def flush(self, timeout: float | None = None) -> None:
        self._call(self.sync.flush(timeout))

    def wait_for(
        self, key: str, value: Any = _ANY, *, timeout: float | None = None, **kw: Any
    ) -> Any:
        return self._call(self.sync.wait_for(key, value, timeout=timeout, **kw))

    def get(self) -> JsonObject:
        return self._call(self.sync.client.get())

    def update(self, state: Mapping[str, Any], version: int | None = None) -> JsonObject:
        return self._call(self.sync.client.update(state, version=version))


async def _value(fn: Callable[[], T]) -> T:
    return fn()


__all__ = [
    "SEND_TELEMETRY_KEY",
    "BlockingShadowSync",
    "DesiredChange",
    "DesiredChangeRefused",
    "DesiredHandler",
    "Refuse",
    "ShadowClient",
    "ShadowError",
    "ShadowRejected",
    "ShadowSync",
    "ShadowTimeout",
    "merge_into",
    "merge_patch",
    "new_client_token",
]
