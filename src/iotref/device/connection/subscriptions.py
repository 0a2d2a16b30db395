"""The topic filters of one connection and their handlers: matching incoming messages
(:func:`topic_matches`), delivering them in order per filter, SUBSCRIBE in batches the
platform accepts, UNSUBSCRIBE, and subscribing again after a reconnect that lost the
session."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

from awscrt import mqtt5

from iotref.device.connection.diagnostics import crt_error_name
from iotref.device.connection.errors import SubscribeFailed
from iotref.device.connection.loop_bridge import log_task_error
from iotref.device.connection.state import IncomingMessage, MessageHandler
from iotref.protocol import limits

log = logging.getLogger("iotref.connection")

MAX_FILTERS_PER_SUBSCRIBE = limits.MAX_TOPIC_FILTERS_PER_SUBSCRIBE
"""Topic filters sent in one SUBSCRIBE at most (AWS IoT Core accepts 8)."""
MAX_SUBSCRIPTIONS = limits.MAX_SUBSCRIPTIONS_PER_CONNECTION
"""Topic filters one connection holds at most (AWS IoT Core: 50); more are refused with
:class:`~iotref.device.connection.errors.SubscribeFailed` before anything is sent."""
UNSUBSCRIBE_TIMEOUT_S = 5.0
"""Longest wait for an UNSUBACK."""

ClientGetter = Callable[[], "mqtt5.Client | None"]
"""The connection's awscrt client as it is now (``None`` once stopped)."""


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic filter matching with ``+`` and ``#`` (``$`` topics need a literal first
    level)."""
    if topic_filter == topic:
        return True
    f_parts = topic_filter.split("/")
    t_parts = topic.split("/")
    if topic.startswith("$") and f_parts[0] in ("+", "#"):
        return False
    for i, part in enumerate(f_parts):
        if part == "#":
            return True
        if i >= len(t_parts):
            return False
        if part != "+" and part != t_parts[i]:
            return False
    return len(f_parts) == len(t_parts)


class Subscription:
    """One topic filter, its handlers, and (for async handlers) an ordered worker."""

    __slots__ = ("_queue", "_worker", "acked", "handlers", "qos", "topic_filter")

    def __init__(self, topic_filter: str, qos: int) -> None:
        self.topic_filter = topic_filter
        self.qos = qos
        # A tuple (replaced on change): smaller than a list, and delivery needs no copy.
        self.handlers: tuple[MessageHandler, ...] = ()
        self.acked = False
        self._queue: asyncio.Queue[tuple[MessageHandler, IncomingMessage]] | None = None
        self._worker: asyncio.Task[None] | None = None

    def add(self, handler: MessageHandler) -> None:
        self.handlers = (*self.handlers, handler)

    def remove(self, handler: MessageHandler) -> None:
        """Remove the first occurrence of ``handler``, if any."""
        handlers = self.handlers
        if handler in handlers:
            i = handlers.index(handler)
            self.handlers = handlers[:i] + handlers[i + 1 :]

    def deliver(self, message: IncomingMessage) -> None:
        for handler in self.handlers:
            if is_async(handler):
                self._enqueue(handler, message)
                continue
            try:
                result = handler(message)
            except Exception:
                log.exception("handler for %s failed", self.topic_filter)
                continue
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                task.add_done_callback(log_task_error)

    def _enqueue(self, handler: MessageHandler, message: IncomingMessage) -> None:
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work())
        self._queue.put_nowait((handler, message))

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            handler, message = await self._queue.get()
            try:
                result = handler(message)
                if inspect.isawaitable(result):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("handler for %s failed", self.topic_filter)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None


def is_async(handler: Callable[..., Any]) -> bool:
    """Whether ``handler`` (or the function a ``functools.partial`` wraps) is a coroutine
    function, or an object whose ``__call__`` is one."""
    target = handler
    while hasattr(target, "func"):  # functools.partial
        target = target.func
    call = getattr(target, "__call__", None)  # noqa: B004
    return inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(call)


class Subscriptions:
    """The subscriptions of one connection, by topic filter."""

    __slots__ = ("_subs",)

    def __init__(self) -> None:
        self._subs: dict[str, Subscription] = {}

    def __len__(self) -> int:
        return len(self._subs)

    def holds(self, topic_filters: Sequence[str]) -> bool:
        """Whether every one of ``topic_filters`` is subscribed and acknowledged."""
        subs = self._subs
        return all(f in subs and subs[f].acked for f in topic_filters)

    def dispatch(self, message: IncomingMessage) -> None:
        """Hand ``message`` to the handlers of every filter that matches its topic."""
        for sub in list(self._subs.values()):
            if topic_matches(sub.topic_filter, message.topic):
                sub.deliver(message)

    def close(self) -> None:
        """Stop the workers of ``async`` handlers."""
        for sub in self._subs.values():
            sub.close()

    async def add(
        self,
        client: ClientGetter,
        subscriptions: Sequence[tuple[str, MessageHandler]],
        qos: int,
        *,
        connected: bool,
    ) -> None:
        """Add the handlers; SUBSCRIBE the new filters now if ``connected`` (else
        :meth:`resubscribe` makes them on connect). Refuses (adding nothing) more than
        :data:`MAX_SUBSCRIPTIONS` filters; removes the handlers again when the broker
        refuses."""
        subs = self._subs
        new = {f for f, _ in subscriptions if f not in subs}
        if len(subs) + len(new) > MAX_SUBSCRIPTIONS:
            raise SubscribeFailed(
                f"subscribing to {', '.join(sorted(new))} would give this connection "
                f"{len(subs) + len(new)} topic filters; the platform allows at most "
                f"{MAX_SUBSCRIPTIONS} per connection",
                "unsubscribe from topic filters no longer needed, or cover several topics "
                "with one wildcard filter",
            )
        added: list[tuple[Subscription, MessageHandler]] = []
        to_send: list[Subscription] = []
        for topic_filter, handler in subscriptions:
            sub = subs.get(topic_filter)
            if sub is None:
                sub = subs[topic_filter] = Subscription(topic_filter, qos)
            sub.add(handler)
            added.append((sub, handler))
            if not sub.acked and sub not in to_send:
                to_send.append(sub)
        if not to_send or not connected:
            return
        try:
            for i in range(0, len(to_send), MAX_FILTERS_PER_SUBSCRIBE):
                await send_subscribe(client(), to_send[i : i + MAX_FILTERS_PER_SUBSCRIBE])
        except BaseException:
            for sub, handler in added:
                sub.remove(handler)
                if not sub.handlers and not sub.acked:
                    subs.pop(sub.topic_filter, None)
            raise

    async def remove(
        self,
        client: mqtt5.Client | None,
        topic_filter: str,
        handler: MessageHandler | None,
        max_wait_s: float,
    ) -> None:
        """Remove ``handler`` (all if ``None``); UNSUBSCRIBE through ``client`` (``None``:
        not connected, send nothing) once none is left, waiting at most ``max_wait_s``."""
        sub = self._subs.get(topic_filter)
        if sub is None:
            return
        if handler is not None:
            sub.remove(handler)
            if sub.handlers:
                return
        self._subs.pop(topic_filter, None)
        sub.close()
        if client is None or max_wait_s <= 0:
            return
        try:
            crt_future = client.unsubscribe(mqtt5.UnsubscribePacket([topic_filter]))
        except Exception as exc:
            log.warning("unsubscribe %s failed: %s", topic_filter, crt_error_name(exc))
            return
        unsuback = asyncio.wrap_future(crt_future)
        try:
            done, _ = await asyncio.wait({unsuback}, timeout=max_wait_s)
        finally:
            if not unsuback.done():
                unsuback.cancel()  # also when this wait is cancelled: nobody awaits it then
        if not done:
            log.warning("unsubscribe %s: no UNSUBACK within %g s", topic_filter, max_wait_s)
        elif unsuback.exception() is not None:
            log.warning(
                "unsubscribe %s failed: %s", topic_filter, crt_error_name(unsuback.exception())
            )

    async def resubscribe(
        self, client: ClientGetter, session_present: bool
    ) -> list[SubscribeFailed]:
        """After a connect: SUBSCRIBE what the session does not hold (a resumed session
        keeps what was acknowledged; filters added meanwhile, or before the first connect,
        which may resume a session of an earlier run, are made now). Returns the refusals."""
        subs = [s for s in self._subs.values() if not (session_present and s.acked)]
        failures: list[SubscribeFailed] = []
        if not subs:
            return failures
        for s in subs:
            s.acked = False
        for i in range(0, len(subs), MAX_FILTERS_PER_SUBSCRIBE):
            try:
                await send_subscribe(client(), subs[i : i + MAX_FILTERS_PER_SUBSCRIBE])
            except SubscribeFailed as exc:
                failures.append(exc)
        log.info("connection: resubscribed %d topic filter(s)", len(subs))
        return failures


async def send_subscribe(client: mqtt5.Client | None, subs: list[Subscription]) -> None:
    """One SUBSCRIBE of ``subs``; marks those the broker accepted; raises
    :class:`~iotref.device.connection.errors.SubscribeFailed` for any refusal."""
    if client is None:
        raise SubscribeFailed("cannot subscribe: the connection is stopped")
    packet = mqtt5.SubscribePacket(
        [mqtt5.Subscription(s.topic_filter, mqtt5.QoS(s.qos)) for s in subs]
    )
    filters = ", ".join(s.topic_filter for s in subs)
    try:
        suback = await asyncio.wrap_future(client.subscribe(packet))
    except Exception as exc:
        raise SubscribeFailed(f"subscribing to {filters} failed: {crt_error_name(exc)}") from None
    codes = tuple(int(c) if c is not None else 0x80 for c in (suback.reason_codes or []))
    refused = [(s.topic_filter, c) for s, c in zip(subs, codes, strict=False) if c >= 0x80]
    for s, c in zip(subs, codes, strict=False):
        if c < 0x80:
            s.acked = True
    if refused or len(codes) != len(subs):
        detail = ", ".join(f"{f} (0x{c:02X})" for f, c in refused) or filters
        raise SubscribeFailed(
            f"the broker refused the subscription to {detail}",
            "check that the device may read these topics",
            reason_codes=codes,
        )
