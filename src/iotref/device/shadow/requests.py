"""Requests to one device shadow over MQTT: ``get`` / ``update`` / ``delete`` of a classic or
named shadow, each correlated with its answer by a fresh ``clientToken``. An answer on
``/rejected`` raises :class:`~iotref.device.shadow.errors.ShadowRejected` with the service's
code and message; no answer in time raises :class:`~iotref.device.shadow.errors.ShadowTimeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from iotref.device import stdlib_compat
from iotref.device.connection.connection import Connection
from iotref.device.connection.errors import MqttError
from iotref.device.connection.state import IncomingMessage
from iotref.device.shadow.errors import ShadowRejected, ShadowTimeout
from iotref.protocol.topics import shadow_topic

log = logging.getLogger("iotref.shadow")

JsonObject = dict[str, Any]
DEFAULT_TIMEOUT_S = 10.0
SHADOW_QOS = 0
"""QoS of shadow requests and of the answer and delta subscriptions. 0 on purpose: the
answer is the acknowledgement (a lost request or answer times out and is retried, a retried
update merges the same fields again; every reconnect does a fresh get, so a delta lost with
a connection is recovered). QoS 1 costs latency for nothing: each QoS 1 message makes its
receiver write a PUBACK right before its answer, and Nagle's algorithm (awscrt, like paho,
does not set TCP_NODELAY) holds the answer back until the peer's delayed ACK, about 40 ms
per hop."""
RESPONSE_SUFFIXES = (
    "get/accepted",
    "get/rejected",
    "update/accepted",
    "update/rejected",
    "update/delta",
    "delete/accepted",
    "delete/rejected",
)


def new_client_token() -> str:
    """A fresh clientToken: 32 hex digits (the service allows up to 64 bytes)."""
    return uuid.uuid4().hex


def _decode(payload: bytes) -> JsonObject | None:
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


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
        reconnects). Raises :class:`~iotref.device.connection.SubscribeFailed`."""
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


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "RESPONSE_SUFFIXES",
    "SHADOW_QOS",
    "ShadowClient",
    "ShadowListener",
    "new_client_token",
]
