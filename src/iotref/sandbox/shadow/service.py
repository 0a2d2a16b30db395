"""The sandbox's Device Shadow service (a component): AWS IoT shadow semantics over MQTT.

It connects to the sandbox's Mosquitto as the platform identity (mutual TLS), subscribes to
the request topics of every thing (``get``/``update``/``delete``, classic and named) and
answers on ``/accepted``, ``/rejected``, ``update/delta`` and ``update/documents`` at QoS 1,
one request after another per shadow; the REST data plane
(:mod:`~iotref.sandbox.shadow.rest`) and the ``thing_registered`` event use the same
operations. docs/architecture.md ("State sync") says how it keeps the round trip short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiomqtt
from starlette.routing import BaseRoute

from iotref.protocol import shadow_document as sd
from iotref.protocol.topics import SHADOW_OPERATIONS, parse_shadow_topic, shadow_topic
from iotref.sandbox.context import LOOPBACK, THING_REGISTERED, SandboxContext
from iotref.sandbox.quota_meter import QuotaMeter
from iotref.sandbox.shadow.openapi import shadow_fragment
from iotref.sandbox.shadow.request_limits import ShadowRequestLimits
from iotref.sandbox.shadow.rest import shadow_routes
from iotref.sandbox.shadow.store import AwsCredentials, ShadowStore

log = logging.getLogger(__name__)

AWS_REGION = "local"
AWS_SIGNING_SERVICE = "iotdata"
REQUEST_FILTERS = tuple(
    f"$aws/things/+/shadow/{prefix}{op}" for prefix in ("", "name/+/") for op in SHADOW_OPERATIONS
)
SEND_TELEMETRY_UPDATE = b'{"state":{"desired":{"sendTelemetryData":true}}}'
CONNECT_WAIT_SECONDS = 15.0
PUBLISH_WAIT_SECONDS = 10.0
RECONNECT_MIN_SECONDS = 0.1
RECONNECT_MAX_SECONDS = 2.0

ShadowKey = tuple[str, str | None]
Message = tuple[str, bytes]
Job = Callable[[], tuple[Any, list[Message]]]


def now_seconds() -> int:
    return int(time.time())


class ShadowService:
    """Component: the shadow service (MQTT side) plus the REST data plane's routes.

    It applies the sandbox's shadow limits (``ctx.settings.limits``): document size and
    depth through the document rules, requests a second and in flight per thing through
    :class:`ShadowRequestLimits`; and it reports every MQTT request to the ``meter``, the
    per-connection quota meter (the thing name is the device's client id)."""

    def __init__(
        self,
        ctx: SandboxContext,
        cas: Any,
        *,
        region: str = AWS_REGION,
        meter: QuotaMeter | None = None,
    ) -> None:
        self.ctx = ctx
        self.cas = cas
        self.region = region
        self.meter = meter
        limits = ctx.settings.limits
        self.document_limits = limits.shadow_document
        self.request_limits = ShadowRequestLimits(limits.shadow_rate, limits.shadow_in_flight)
        self.store = ShadowStore(ctx.db)
        self.credentials: AwsCredentials = self.store.credentials()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._publish_tails: dict[ShadowKey, asyncio.Future[Any]] = {}
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._stopping = False
        ctx.events.subscribe(THING_REGISTERED, self._on_thing_registered)

    # ------------------------------------------------------------------ component

    def routes(self) -> Sequence[BaseRoute]:
        return shadow_routes(self, self.ctx.check_admin)

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI fragment of the REST data plane (merged into ``/openapi.json``)."""
        return shadow_fragment()

    def describe(self) -> dict[str, Any]:
        return {
            "aws_access_key_id": self.credentials.access_key_id,
            "aws_secret_access_key": self.credentials.secret_access_key,
            "aws_region": self.region,
            "aws_iot_data_endpoint": self.ctx.http_url,
        }

    async def start(self) -> None:
        self._stopping = False
        self._runner = asyncio.create_task(self._run(), name="shadow-service-mqtt")
        try:
            await asyncio.wait_for(self._connected.wait(), CONNECT_WAIT_SECONDS)
        except asyncio.TimeoutError:
            log.warning(
                "shadow service: not connected to the broker after %.0f s; still trying",
                CONNECT_WAIT_SECONDS,
            )

    async def stop(self) -> None:
        self._stopping = True
        tasks = [t for t in (self._runner, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._runner = None

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # ------------------------------------------------------------------ MQTT connection

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.cas.server_root_ca_path))
        context.load_cert_chain(str(self.cas.platform_cert_path), str(self.cas.platform_key_path))
        return context

    async def _run(self) -> None:
        delay = RECONNECT_MIN_SECONDS
        while not self._stopping:
            try:
                async with aiomqtt.Client(
                    LOOPBACK,
                    self.ctx.platform_mqtt_port,
                    identifier=f"iotref-platform-shadow-{os.getpid()}",
                    tls_context=self._tls_context(),
                    keepalive=30,
                    clean_session=True,
                    max_inflight_messages=200,
                    timeout=10,
                    socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                    queue_type=_dispatching_queue(self._dispatch),
                ) as client:
                    for topic_filter in REQUEST_FILTERS:
                        await client.subscribe(topic_filter, qos=1)
                    self._client = client
                    self._connected.set()
                    log.info("shadow service connected to the broker")
                    delay = RECONNECT_MIN_SECONDS
                    # Messages are handled as they are read (see _dispatching_queue); the
                    # iteration ends with MqttError when the connection goes away.
                    async for message in client.messages:
                        self._dispatch(message)
            except aiomqtt.MqttError as exc:
                if self._connected.is_set():
                    log.warning("shadow service lost the broker connection: %s", exc)
                else:
                    log.debug("shadow service cannot connect yet: %s", exc)
            except (OSError, ssl.SSLError) as exc:
                log.warning("shadow service cannot connect: %s", exc)
            except Exception:
                log.exception("shadow service connection failed; reconnecting")
            finally:
                self._connected.clear()
                self._client = None
            if self._stopping:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    async def _publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> bool:
        """Publish, waiting for the connection (and retrying once after a drop)."""
        for _attempt in range(2):
            if not self._connected.is_set():
                try:
                    await asyncio.wait_for(self._connected.wait(), PUBLISH_WAIT_SECONDS)
                except asyncio.TimeoutError:
                    break
            client = self._client
            if client is None:
                continue
            try:
                await client.publish(topic, payload, qos=qos, retain=retain, timeout=10)
                return True
            except aiomqtt.MqttError as exc:
                log.warning("shadow service could not publish to %s: %s", topic, exc)
                await asyncio.sleep(RECONNECT_MIN_SECONDS)
        log.warning("shadow service dropped a message to %s: broker not connected", topic)
        return False

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        """Publish on behalf of a REST caller (``Publish`` of the data plane)."""
        return await self._publish(topic, payload, qos, retain)

    # ------------------------------------------------------------------ per-shadow queues

    def _publish_in_order(
        self, key: ShadowKey, messages: list[Message]
    ) -> asyncio.Future[Any] | None:
        """Publish ``messages`` after everything published before for the same shadow,
        without holding up the shadow's operations: while the broker is away, operations
        (REST callers included) are answered at once and their messages follow when it is
        back. Returns the future that is done once they are all published."""
        if not messages:
            return None
        previous = self._publish_tails.get(key)
        tail: asyncio.Future[Any]
        if previous is None and self._connected.is_set():
            # Nothing of this shadow's still on its way: one task per message, started in
            # this order in the next loop turn, each handing its message to the client at
            # once (the broker receives them in order on the one connection); the PUBACKs
            # are awaited together, not one before the next message goes.
            parts = [
                asyncio.create_task(self._publish(topic, payload)) for topic, payload in messages
            ]
            for part in parts:
                self._tasks.add(part)
                part.add_done_callback(self._tasks.discard)
            tail = parts[0] if len(parts) == 1 else asyncio.gather(*parts)
        else:

            async def run() -> None:
                if previous is not None:
                    # Whatever became of the earlier messages; being cancelled still stops
                    # this task (awaiting ``previous`` itself would re-raise its outcome).
                    await asyncio.wait([previous])
                await asyncio.gather(
                    *(self._publish(topic, payload) for topic, payload in messages)
                )

            task = asyncio.create_task(run())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            tail = task
        self._publish_tails[key] = tail
        tail.add_done_callback(_ignore_outcome)

        def forget(done: asyncio.Future[Any]) -> None:
            if self._publish_tails.get(key) is done:
                del self._publish_tails[key]

        tail.add_done_callback(forget)
        return tail

    def _submit(self, key: ShadowKey, job: Job) -> asyncio.Future[Any]:
        """Run ``job`` on the shadow ``key`` now; the returned future is done.

        Jobs are synchronous, short (one SQLite read and write) and run on the loop's
        thread, so requests for one shadow are processed one after another in arrival order
        without a queue or a task hand-off. Their messages are published in the same order
        (:meth:`_publish_in_order`).
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        messages: list[Message] = []
        try:
            self.request_limits.admit(key[0], mqtt=False)
            result, messages = job()
        except Exception as exc:
            if not isinstance(exc, sd.ShadowError):
                log.exception("shadow operation failed for %s", key)
            future.set_exception(exc)
            future.exception()  # the caller may be gone; never "never retrieved"
        else:
            future.set_result(result)
        self._publish_in_order(key, messages)
        return future

    def _submit_mqtt(self, key: ShadowKey, operation: str, payload: bytes, job: Job) -> None:
        """A request that arrived over MQTT: its answers are in flight until the broker
        acknowledged every one of them; over a limit it is answered 429 on ``/rejected``."""
        thing, shadow = key
        refused = sd.name_error(thing, shadow)
        if refused is None:
            try:
                self.request_limits.admit(thing, mqtt=True)
            except sd.ShadowError as exc:
                refused = sd.ShadowError(exc.code, exc.message, _client_token(payload))
        if refused is not None:
            topic = shadow_topic(thing, f"{operation}/rejected", shadow)
            self._publish_in_order(key, [(topic, sd.to_json(refused.payload(now_seconds())))])
            return
        try:
            _result, messages = job()
        except Exception:
            log.exception("shadow operation failed for %s", key)
            return
        tail = self._publish_in_order(key, messages)
        if tail is not None:
            limits = self.request_limits
            limits.started(thing)
            tail.add_done_callback(lambda _done: limits.finished(thing))

    # ------------------------------------------------------------------ operations

    def _update_job(
        self, thing: str, shadow: str | None, payload: bytes, *, mqtt: bool
    ) -> tuple[Any, list[Message]]:
        now = now_seconds()
        try:
            request = sd.parse_update(payload, self.document_limits)
            current = self.store.get(thing, shadow)
            base = self.store.base_version(thing, shadow, now) if current is None else 0
            outcome = sd.apply_update(
                current, request, now, base_version=base, limits=self.document_limits
            )
        except sd.ShadowError as exc:
            if not mqtt:
                raise
            topic = shadow_topic(thing, "update/rejected", shadow)
            return exc, [(topic, sd.to_json(exc.payload(now)))]
        self.store.put(thing, shadow, outcome.document, now)
        messages = [(shadow_topic(thing, "update/accepted", shadow), sd.to_json(outcome.accepted))]
        if outcome.delta is not None:
            messages.append(
                (shadow_topic(thing, "update/delta", shadow), sd.to_json(outcome.delta))
            )
        messages.append(
            (shadow_topic(thing, "update/documents", shadow), sd.to_json(outcome.documents))
        )
        return outcome.accepted, messages

    def _get_job(
        self, thing: str, shadow: str | None, payload: bytes, *, mqtt: bool
    ) -> tuple[Any, list[Message]]:
        now = now_seconds()
        try:
            request = sd.parse_simple(payload, strict=True)
            document = self.store.get(thing, shadow)
            if document is None:
                raise sd.not_found_error(thing, shadow, request.client_token)
        except sd.ShadowError as exc:
            if not mqtt:
                raise
            return exc, [
                (shadow_topic(thing, "get/rejected", shadow), sd.to_json(exc.payload(now)))
            ]
        response = sd.get_response(document, now, request.client_token)
        if not mqtt:
            return response, []
        return response, [(shadow_topic(thing, "get/accepted", shadow), sd.to_json(response))]

    def _delete_job(
        self, thing: str, shadow: str | None, payload: bytes, *, mqtt: bool
    ) -> tuple[Any, list[Message]]:
        now = now_seconds()
        request = sd.parse_simple(payload, strict=False)
        document = self.store.get(thing, shadow)
        if document is None:
            exc = sd.not_found_error(thing, shadow, request.client_token)
            if not mqtt:
                raise exc
            topic = shadow_topic(thing, "delete/rejected", shadow)
            return exc, [(topic, sd.to_json(exc.payload(now)))]
        self.store.delete(thing, shadow, now)
        response = sd.delete_response(document, now, request.client_token)
        return response, [(shadow_topic(thing, "delete/accepted", shadow), sd.to_json(response))]

    _JOBS = {"update": _update_job, "get": _get_job, "delete": _delete_job}

    def _dispatch(self, message: aiomqtt.Message) -> None:
        try:
            self._on_message(message.topic.value, _payload_bytes(message.payload))
        except Exception:
            log.exception("shadow service: handling a message on %s failed", message.topic)

    def _on_message(self, topic: str, payload: bytes) -> None:
        parsed = parse_shadow_topic(topic)
        if parsed is None:
            return
        thing, shadow, operation = parsed
        method = self._JOBS.get(operation)
        if method is None:
            return
        if self.meter is not None:
            self.meter.add(thing, 1, len(topic) + len(payload), time.time())
        self._submit_mqtt(
            (thing, shadow),
            operation,
            payload,
            lambda: method(self, thing, shadow, payload, mqtt=True),
        )

    async def update(self, thing: str, shadow: str | None, payload: bytes) -> sd.JsonObject:
        """UpdateThingShadow: the accepted document, or :class:`ShadowError`."""
        result: sd.JsonObject = await self._submit(
            (thing, shadow), lambda: self._update_job(thing, shadow, payload, mqtt=False)
        )
        return result

    async def get(self, thing: str, shadow: str | None) -> sd.JsonObject:
        """GetThingShadow: the full document, or :class:`ShadowError` 404."""
        result: sd.JsonObject = await self._submit(
            (thing, shadow), lambda: self._get_job(thing, shadow, b"", mqtt=False)
        )
        return result

    async def delete(self, thing: str, shadow: str | None) -> sd.JsonObject:
        """DeleteThingShadow: ``{"version", "timestamp"}``, or :class:`ShadowError` 404."""
        result: sd.JsonObject = await self._submit(
            (thing, shadow), lambda: self._delete_job(thing, shadow, b"", mqtt=False)
        )
        return result

    def named_shadows(self, thing: str) -> list[str]:
        return self.store.named_shadows(thing)

    async def _on_thing_registered(self, thing: Any = None, **_: Any) -> None:
        client_id = getattr(thing, "client_id", None)
        if not client_id:
            return
        await self.update(str(client_id), None, SEND_TELEMETRY_UPDATE)
        log.info("shadow of %s: desired.sendTelemetryData = true", client_id)


def _dispatching_queue(
    handle: Callable[[aiomqtt.Message], None],
) -> type[asyncio.Queue[aiomqtt.Message]]:
    """An incoming-message queue for aiomqtt (its ``queue_type``) that hands every message
    to ``handle`` as the client reads it, on the loop's thread, instead of keeping it for
    ``client.messages``: that iteration costs a task and three loop turns per message, on
    the path of every shadow request and reported update."""

    class DispatchingQueue(asyncio.Queue[aiomqtt.Message]):
        def put_nowait(self, item: aiomqtt.Message) -> None:
            handle(item)

    return DispatchingQueue


def _client_token(payload: bytes) -> str | None:
    """The request's ``clientToken`` for a rejection, if it has a valid one."""
    try:
        doc = sd.decode_json(payload) if payload.strip() else None
    except sd.ShadowError:
        return None
    token = doc.get("clientToken") if isinstance(doc, dict) else None
    if isinstance(token, str) and len(token.encode()) <= sd.MAX_CLIENT_TOKEN_BYTES:
        return token
    return None


def _payload_bytes(payload: Any) -> bytes:
    if payload is None:
        return b""
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    return str(payload).encode()


def _ignore_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
