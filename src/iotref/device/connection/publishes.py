"""The publishes of one connection: handing them to awscrt, charging them to the pace,
completing them on the loop (a future, or a callback called exactly once), what a PUBACK
or an error means (:class:`~iotref.device.connection.errors.PublishFailed`), slowing down
on "quota exceeded", and failing whatever is pending when the connection ends."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

from awscrt import exceptions as crt_exceptions
from awscrt import mqtt5

from iotref.device.connection.diagnostics import crt_error_name
from iotref.device.connection.errors import PublishFailed
from iotref.device.connection.loop_bridge import LoopBridge
from iotref.device.connection.native_publish import raw_publish_function
from iotref.device.connection.rate_limit import PublishLimiter
from iotref.device.connection.state import Counters, PublishCallback

log = logging.getLogger("iotref.connection")

QUOTA_EXCEEDED = 0x97
"""PUBACK reason code "Quota exceeded": the publish was throttled; it is retried and the
connection's :class:`~iotref.device.connection.rate_limit.PublishLimiter` slows down."""

_QOS: dict[int, mqtt5.QoS] = {0: mqtt5.QoS.AT_MOST_ONCE, 1: mqtt5.QoS.AT_LEAST_ONCE}


class PublishOperations:
    """The publishes in flight on one connection. Callers check first that the connection
    may publish (started, not stopped, QoS 0 or 1); every method runs on the loop, apart
    from awscrt's completions, which only post to the :class:`LoopBridge`."""

    # One per connection: no instance dict.
    __slots__ = ("_callbacks", "_counters", "_futures", "_limiter", "_next_key", "_raw")

    def __init__(self, counters: Counters, limiter: PublishLimiter | None) -> None:
        self._counters = counters
        self._limiter = limiter
        self._futures: set[asyncio.Future[None]] = set()
        # The callbacks not yet called, by a per-connection number.
        self._callbacks: dict[int, PublishCallback] = {}
        self._next_key = 0
        self._raw: Callable[..., None] | None = None

    def use_native_publish(self) -> None:
        """Publish through awscrt's native entry point where it is the known one
        (:mod:`iotref.device.connection.native_publish`)."""
        self._raw = raw_publish_function()

    def with_future(
        self,
        client: mqtt5.Client,
        bridge: LoopBridge,
        fut: asyncio.Future[None],
        topic: str,
        payload: bytes,
        qos: int,
    ) -> None:
        """Publish; ``fut`` resolves on the PUBACK (QoS 1) or once written (QoS 0), or
        fails with :class:`PublishFailed`."""
        try:
            crt_future = client.publish(
                mqtt5.PublishPacket(topic=topic, payload=payload, qos=_QOS[qos])
            )
        except Exception as exc:
            name = crt_error_name(exc)
            fut.set_exception(PublishFailed(f"cannot publish to {topic}: {name}", error_name=name))
            return
        self._charge(topic, payload)
        self._futures.add(fut)
        crt_future.add_done_callback(
            lambda cf: bridge.post(self._complete_future, fut, cf, topic, qos)
        )

    def with_callback(
        self,
        client: mqtt5.Client,
        bridge: LoopBridge,
        topic: str,
        payload: bytes,
        callback: PublishCallback,
        qos: int,
    ) -> None:
        """Publish; ``callback`` gets the outcome exactly once, on the loop. Raises
        :class:`PublishFailed` (and never calls ``callback``) when awscrt refuses at once."""
        raw = self._raw
        key = self._next_key
        if raw is not None and type(client) is mqtt5.Client:
            try:
                raw(
                    client._binding,
                    qos,
                    payload,
                    False,  # retain
                    topic,
                    None,  # payload format indicator
                    None,  # message expiry interval
                    None,  # topic alias
                    None,  # response topic
                    None,  # correlation data
                    None,  # content type
                    None,  # user properties
                    partial(self._native_done, bridge, key, topic, qos),
                )
            except Exception as exc:
                name = crt_error_name(exc)
                raise PublishFailed(f"cannot publish to {topic}: {name}", error_name=name) from None
        else:
            try:
                crt_future = client.publish(
                    mqtt5.PublishPacket(topic=topic, payload=payload, qos=_QOS[qos])
                )
            except Exception as exc:
                name = crt_error_name(exc)
                raise PublishFailed(f"cannot publish to {topic}: {name}", error_name=name) from None
            # Runs on an awscrt thread: only hands the completion over to the loop.
            crt_future.add_done_callback(
                partial(bridge.post, self._complete_callback, key, topic, qos)
            )
        self._charge(topic, payload)
        self._next_key = key + 1
        self._callbacks[key] = callback

    def fail_all(self, reason: str) -> None:
        """Fail every pending publish (the connection ended): ``publish not completed``."""
        futures = list(self._futures)
        self._futures.clear()
        for fut in futures:
            if not fut.done():
                fut.set_exception(PublishFailed(f"publish not completed: {reason}"))
                self._counters.publish_failures += 1
        callbacks = list(self._callbacks.values())
        self._callbacks.clear()
        for callback in callbacks:
            self._counters.publish_failures += 1
            _call(callback, PublishFailed(f"publish not completed: {reason}"))

    def _charge(self, topic: str, payload: bytes) -> None:
        self._counters.publishes += 1
        if self._limiter is not None:
            self._limiter.spend(len(topic) + len(payload))

    # ------------------------------------------------------------------ completions

    def _native_done(
        self,
        bridge: LoopBridge,
        key: int,
        topic: str,
        qos: int,
        error_code: int,
        _qos: Any,
        reason_code: Any,
        *_: Any,
    ) -> None:
        """awscrt's completion of a native publish (on an awscrt thread): to the loop."""
        bridge.post(self._complete_native, key, topic, qos, error_code, reason_code)

    def _complete_native(
        self, key: int, topic: str, qos: int, error_code: int, reason_code: Any
    ) -> None:
        callback = self._callbacks.pop(key, None)
        if callback is None:
            return  # already failed by fail_all
        error = crt_exceptions.from_code(error_code) if error_code else None
        # 0 (success), the usual case, needs no decoding: it reads like no code at all.
        code = (
            _puback_reason_code(reason_code) if qos == 1 and error is None and reason_code else None
        )
        _call(callback, self._outcome(topic, qos, error, code))

    def _complete_callback(self, key: int, topic: str, qos: int, cf: Any) -> None:
        callback = self._callbacks.pop(key, None)
        if callback is None:
            return  # already failed by fail_all
        _call(callback, self._future_outcome(cf, topic, qos))

    def _complete_future(self, fut: asyncio.Future[None], cf: Any, topic: str, qos: int) -> None:
        self._futures.discard(fut)
        if fut.done():
            return
        failure = self._future_outcome(cf, topic, qos)
        if failure is None:
            fut.set_result(None)
        else:
            fut.set_exception(failure)

    def _future_outcome(self, cf: Any, topic: str, qos: int) -> PublishFailed | None:
        """What a completed awscrt publish future means (and count it)."""
        exc = cf.exception()
        code = None
        if exc is None and qos == 1:
            puback = getattr(cf.result(), "puback", None)
            code = getattr(puback, "reason_code", None)
        return self._outcome(topic, qos, exc, code)

    def _outcome(
        self, topic: str, qos: int, exc: BaseException | None, code: Any
    ) -> PublishFailed | None:
        """A publish's failure, or None, from its error or PUBACK reason code (counted)."""
        if exc is not None:
            self._counters.publish_failures += 1
            name = crt_error_name(exc)
            return PublishFailed(f"publish to {topic} failed: {name}", error_name=name)
        if qos == 1:
            if code is not None and int(code) >= 0x80:
                self._counters.publish_failures += 1
                if int(code) == QUOTA_EXCEEDED:
                    self._on_quota_exceeded(topic)
                label = getattr(code, "name", str(int(code)))
                return PublishFailed(
                    f"the broker refused the publish to {topic}: {label} (0x{int(code):02X})",
                    reason_code=int(code),
                )
            self._counters.pubacks += 1
        return None

    def _on_quota_exceeded(self, topic: str) -> None:
        """The platform throttled a publish: slow the pace down (the publisher retries)."""
        self._counters.throttled += 1
        limiter = self._limiter
        if limiter is None:
            log.warning(
                "connection: the platform throttled a publish to %s (quota exceeded, 0x97) "
                "and publishes are not paced (publish_rate_limit is off)",
                topic,
            )
        elif limiter.throttled():
            log.warning(
                "connection: the platform throttled a publish to %s (quota exceeded, 0x97); "
                "pacing publishes at %.0f/s for now, back to %.0f/s over the next seconds",
                topic,
                limiter.pace or 0.0,
                limiter.full_pace or 0.0,
            )


def _puback_reason_code(value: Any) -> mqtt5.PubackReasonCode | None:
    """What awscrt's wrapper makes of a PUBACK reason code (None if unknown)."""
    try:
        return mqtt5.PubackReasonCode(value)
    except Exception:
        return None


def _call(callback: PublishCallback, outcome: BaseException | None) -> None:
    try:
        callback(outcome)
    except Exception:
        log.exception("publish callback failed")
