"""The device's one MQTT connection to the platform (contract section 6):
:class:`Connection`, on awscrt's MQTT 5 client.

Owns the connection's lifecycle: mutual TLS (:mod:`~iotref.device.connection.awscrt_options`),
keepalive, a persistent session, reconnecting on the schedule of
:mod:`~iotref.device.connection.reconnect`, observable and logged state, subscriptions made
again after a reconnect that lost the session, publishing with PUBACK futures or callbacks
(:mod:`~iotref.device.connection.publishes`), dispatching incoming messages to handlers on
the asyncio loop, and stopping with :class:`ConnectionTakenOver` instead of fighting when
another process with the same identity takes the session over
(:mod:`~iotref.device.connection.takeover`).

The connection drives reconnecting itself: when a connection is lost or an attempt fails,
awscrt's client is stopped at once, from awscrt's thread (before its own reconnect timer
fires), and started again when the schedule says; it rejoins the persistent session on
every start. What a stop fails (QoS 1 publishes not yet acknowledged, subscriptions in
flight) is failed to its caller. docs/architecture.md explains why.

Logging (logger ``iotref.connection``): every state change, with the endpoint, port and
client id, never key material.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import Any

from awscrt import io, mqtt5

from iotref.device import stdlib_compat
from iotref.device.connection.awscrt_options import build_tls_context, supervised_client_options
from iotref.device.connection.diagnostics import (
    crt_error_name,
    describe_failure,
    is_fatal,
    probe_tls_in_background,
    wait_first_connect,
)
from iotref.device.connection.errors import (
    ConnectionClosed,
    ConnectionFailed,
    ConnectionTakenOver,
    MqttError,
    PublishFailed,
    SubscribeFailed,
)
from iotref.device.connection.loop_bridge import END, EventStream, LoopBridge, log_task_error
from iotref.device.connection.publishes import PublishOperations
from iotref.device.connection.rate_limit import ConnectGate, PublishLimiter
from iotref.device.connection.reconnect import ReconnectSchedule
from iotref.device.connection.settings import ConnectionSettings
from iotref.device.connection.state import (
    ConnectedCallback,
    ConnectionEvent,
    ConnectionState,
    ConnectionStats,
    Counters,
    IncomingMessage,
    MessageHandler,
    PublishCallback,
)
from iotref.device.connection.subscriptions import UNSUBSCRIBE_TIMEOUT_S, Subscriptions
from iotref.device.connection.takeover import TakeoverDetector

log = logging.getLogger("iotref.connection")

STOP_TIMEOUT_S = 5.0
"""Longest wait for awscrt to report the client stopped, on :meth:`Connection.stop`."""
DIAGNOSE_AFTER_S = 1.0
"""Without a connection this long after an offline start, probe TLS in the background."""


@dataclass(slots=True)
class _Attempt:
    """What the first connect of :meth:`Connection.start` learned."""

    last_failure: ConnectionFailed | None = None
    fatal: bool = False
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


class Connection:
    """One MQTT 5 connection with automatic reconnect. Use ``async with Connection(s) as c``
    or :meth:`start` / :meth:`stop`. Not thread-safe: use it from one asyncio loop."""

    # A fleet holds thousands of connections: no instance dict (``__weakref__`` kept, so
    # that applications can still hold weak references to a connection).
    __slots__ = (
        "__weakref__",
        "_attempt",
        "_bridge",
        "_client",
        "_client_stopped",
        "_connect_gate",
        "_connected_callbacks",
        "_counters",
        "_detector",
        "_diagnosis",
        "_ever_connected",
        "_limiter",
        "_loop",
        "_on_event",
        "_publishes",
        "_reconnect_due",
        "_reconnect_timer",
        "_refused",
        "_schedule",
        "_session_present",
        "_started",
        "_state",
        "_stop_waiter",
        "_stopping",
        "_streams",
        "_subscriptions",
        "_takeover_lock",
        "_takeover_reason",
        "_tasks",
        "_tls_context",
        "settings",
    )

    def __init__(
        self,
        settings: ConnectionSettings,
        *,
        on_event: Callable[[ConnectionEvent], None] | None = None,
        tls_context: io.ClientTlsContext | None = None,
        connect_gate: ConnectGate | None = None,
    ) -> None:
        """``tls_context``: a context already built for ``settings`` (e.g. by
        :func:`~iotref.device.connection.awscrt_options.build_tls_context`, ahead of time
        or on another thread); without it, :meth:`start` builds one from ``settings``. The
        client keeps it while it lives (it is needed for every reconnect).
        ``connect_gate``: start times shared with other connections (a fleet's
        account-level connect rate), taken by every attempt."""
        self.settings = settings
        self._connect_gate = connect_gate
        self._limiter = PublishLimiter.from_limits(
            settings.publish_rate_limit, settings.throughput_limit
        )
        self._on_event = on_event
        self._tls_context = tls_context
        self._state = ConnectionState.STOPPED
        self._started = False
        self._client: mqtt5.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._bridge: LoopBridge | None = None
        self._subscriptions = Subscriptions()
        self._connected_callbacks: list[ConnectedCallback] = []
        self._streams: set[EventStream] | None = None  # made by events()
        self._counters = Counters()
        self._publishes = PublishOperations(self._counters, self._limiter)
        self._detector = TakeoverDetector(
            settings.takeover_limit, settings.takeover_window_s, settings.takeover_uptime_s
        )
        self._schedule = ReconnectSchedule(settings.min_backoff_s, settings.max_backoff_s)
        # The pending restart of the awscrt client (a loop timer), and whether its time
        # came before awscrt reported the client stopped (then it starts on that report).
        self._reconnect_timer: asyncio.TimerHandle | None = None
        self._reconnect_due = False
        self._diagnosis: asyncio.TimerHandle | None = None
        self._takeover_reason: str | None = None
        self._takeover_lock = threading.Lock()
        # Set when the broker refused the certificate as revoked: no attempt can succeed.
        self._refused: ConnectionFailed | None = None
        # Whether awscrt reported the client stopped (set on the loop, by _on_stopped),
        # and the future stop() waits on for that: made only by stop(), which spares
        # every connection a threading.Event (a Condition with a deque: ~1.1 kB).
        self._client_stopped = False
        self._stop_waiter: asyncio.Future[None] | None = None
        self._attempt = _Attempt()
        self._session_present: bool | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ever_connected = False
        self._stopping = False

    # ------------------------------------------------------------------ properties

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def connected(self) -> bool:
        return self._state is ConnectionState.CONNECTED

    @property
    def client_id(self) -> str:
        return self.settings.client_id

    @property
    def session_present(self) -> bool | None:
        """Whether the last CONNACK resumed a session (``None`` before the first)."""
        return self._session_present

    @property
    def taken_over(self) -> bool:
        return self._state is ConnectionState.TAKEN_OVER

    @property
    def rate_limiter(self) -> PublishLimiter | None:
        """The pace of this connection's publishes (``None``: not paced). Every publish is
        charged to it; publishers that hold a queue ask it how many may go now."""
        return self._limiter

    @property
    def refused(self) -> ConnectionFailed | None:
        """Why the platform refuses this identity for good (its certificate is revoked),
        found while starting offline; the connection then stopped trying."""
        return self._refused

    @property
    def stats(self) -> ConnectionStats:
        return self._counters.snapshot()

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Connection:
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
        """Start connecting; with ``wait``, wait for the first CONNECTED.

        With ``wait``: raises :class:`ConnectionFailed` (with the last attempt's reason)
        when not connected within ``connect_timeout_s`` (or at once on a fatal error with
        ``fail_fast``), :class:`ConnectionTakenOver` if taken over meanwhile; the
        connection is stopped when this raises.

        Without ``wait`` (an offline start): returns once the first attempt is under way
        and keeps trying on the reconnect schedule, however long the platform stays out
        of reach; :attr:`stats` ``last_error`` says why it is not connected. Raises only
        :class:`ConnectionFailed` of kind ``"config"`` (unusable certificate files).
        """
        if self._started:
            raise RuntimeError("a Connection can be started only once")
        self._started = True
        self._loop = asyncio.get_running_loop()
        self._bridge = LoopBridge(self._loop)
        try:
            tls = self._tls_context
            if tls is None:
                tls = build_tls_context(self.settings)
        except ConnectionFailed as exc:
            self._counters.last_error = exc.reason
            self._set_state(ConnectionState.STOPPED, exc.reason)
            raise
        options = supervised_client_options(self.settings)
        options.tls_ctx = tls
        options.on_publish_callback_fn = self._crt_publish
        options.on_lifecycle_event_attempting_connect_fn = self._crt_attempting
        options.on_lifecycle_event_connection_success_fn = self._crt_success
        options.on_lifecycle_event_connection_failure_fn = self._crt_failure
        options.on_lifecycle_event_disconnection_fn = self._crt_disconnection
        options.on_lifecycle_event_stopped_fn = self._crt_stopped
        self._client = mqtt5.Client(options)
        self._tls_context = None  # the client holds it from now on
        self._publishes.use_native_publish()
        log.info(
            "connection: starting client id %s to %s",
            self.settings.client_id,
            self.settings.where(),
        )
        gate = self._connect_gate
        if gate is not None:
            await gate.wait()
            if self._stopping:
                if wait:
                    raise ConnectionClosed("the connection was stopped before it connected")
                return
        self._set_state(ConnectionState.CONNECTING)
        self._schedule.attempt_started()
        self._client.start()
        if not wait:
            self._diagnosis = self._loop.call_later(DIAGNOSE_AFTER_S, self._diagnose)
            return
        waiter = self._loop.create_future()
        self._attempt.waiters.append(waiter)
        await wait_first_connect(
            waiter, self.settings, lambda: self._attempt.last_failure, self.stop
        )

    async def stop(self, max_wait_s: float | None = None) -> None:
        """Disconnect (DISCONNECT normal), stop reconnecting, fail what is pending. Waits
        at most ``max_wait_s`` seconds (default :data:`STOP_TIMEOUT_S`) for awscrt to report
        the client stopped; it finishes on its own after that."""
        client = self._client
        self._stopping = True
        self._cancel_reconnect()
        if client is not None and not self._client_stopped:
            client.stop()
            # A connection that never came up may be stuck in s2n's TLS blinding delay;
            # awscrt finishes that on its own, nobody needs to wait for it.
            wait_s = STOP_TIMEOUT_S if self._ever_connected else 0.5
            if max_wait_s is not None:
                wait_s = min(wait_s, max(0.0, max_wait_s))
            waiter = self._stop_waiter
            if waiter is None:
                waiter = self._stop_waiter = asyncio.get_running_loop().create_future()
            done, _ = await asyncio.wait([waiter], timeout=wait_s)
            stopped = bool(done)
            if not stopped and self._ever_connected:
                log.warning("connection: awscrt did not report stopped in %g s", wait_s)
        self._finish(ConnectionClosed("the connection was stopped"))
        if self._state is not ConnectionState.TAKEN_OVER:
            self._set_state(ConnectionState.STOPPED, "stopped")
        self._client = None

    def _cancel_reconnect(self) -> None:
        timer, self._reconnect_timer = self._reconnect_timer, None
        if timer is not None:
            timer.cancel()
        self._reconnect_due = False
        diagnosis, self._diagnosis = self._diagnosis, None
        if diagnosis is not None:
            diagnosis.cancel()

    def _finish(self, error: MqttError) -> None:
        """Fail pending operations and waiters, close workers (on the loop)."""
        self._publishes.fail_all(error.reason)
        for waiter in self._attempt.waiters:
            if not waiter.done():
                waiter.set_exception(error)
        self._attempt.waiters.clear()
        self._subscriptions.close()
        for task in list(self._tasks):
            task.cancel()

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Return once connected. Raises :class:`TimeoutError` after ``timeout`` seconds,
        :class:`ConnectionTakenOver` / :class:`ConnectionClosed` if the connection ended."""
        self._raise_if_ended()
        if self.connected:
            return
        assert self._loop is not None, "start the connection first"
        waiter = self._loop.create_future()
        self._attempt.waiters.append(waiter)
        try:
            async with stdlib_compat.timeout(timeout):
                await waiter
        finally:
            if waiter in self._attempt.waiters:
                self._attempt.waiters.remove(waiter)

    async def wait_closed(self) -> None:
        """Wait until the connection ended; raises :class:`ConnectionTakenOver` if that is
        why."""
        async for _ in self.events():
            pass
        self._raise_if_ended(closed_ok=True)

    def _raise_if_ended(self, closed_ok: bool = False) -> None:
        if self._state is ConnectionState.TAKEN_OVER:
            raise ConnectionTakenOver(
                f"client id {self.settings.client_id!r} is in use by another connection: "
                f"{self._takeover_reason}",
                "make sure only one process runs with this machine's identity",
            )
        if self._started and self._state is ConnectionState.STOPPED and not closed_ok:
            raise ConnectionClosed("the connection was stopped")

    def events(self) -> AsyncIterator[ConnectionEvent]:
        """Every connection event from now on; ends after STOPPED / TAKEN_OVER."""
        stream = EventStream(self._discard_stream)
        if self._started and self._state.terminal:
            stream.push(END)
        else:
            if self._streams is None:
                self._streams = set()
            self._streams.add(stream)
        return stream

    def _discard_stream(self, stream: EventStream) -> None:
        streams = self._streams
        if streams is not None:
            streams.discard(stream)

    def add_connected_callback(self, cb: ConnectedCallback) -> None:
        """``cb(session_present)`` after every (re)connect, once resubscribed."""
        self._connected_callbacks.append(cb)

    def remove_connected_callback(self, cb: ConnectedCallback) -> None:
        with contextlib.suppress(ValueError):
            self._connected_callbacks.remove(cb)

    # ------------------------------------------------------------------ operations

    def publish_nowait(self, topic: str, payload: bytes, qos: int = 1) -> asyncio.Future[None]:
        """Queue a publish. The future resolves on PUBACK (QoS 1) or once written (QoS 0),
        and fails with :class:`PublishFailed`. QoS 1 publishes made while disconnected are
        kept (in memory) and sent after the reconnect."""
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        try:
            client, bridge = self._publish_target(qos)
        except PublishFailed as exc:
            fut.set_exception(exc)
            return fut
        self._publishes.with_future(client, bridge, fut, topic, payload, qos)
        return fut

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Wait for room in the connection's pace (:meth:`pace`), publish, and wait for the
        PUBACK (QoS 1) or until written (QoS 0); raises :class:`PublishFailed`."""
        await self.pace()
        await self.publish_nowait(topic, payload, qos)

    async def pace(self) -> None:
        """Return once the connection's pace lets one more publish go (at once when it is
        not paced). :meth:`publish_nowait` and :meth:`publish_callback` do not wait: every
        publish is charged to the pace, and a publisher that holds a queue waits here (or
        asks :attr:`rate_limiter` how many may go) before it publishes."""
        limiter = self._limiter
        if limiter is not None:
            await limiter.wait()

    def publish_callback(
        self, topic: str, payload: bytes, callback: PublishCallback, qos: int = 1
    ) -> None:
        """Queue a publish like :meth:`publish_nowait`, but instead of a future call
        ``callback(None)`` on PUBACK (QoS 1) or once written (QoS 0), or
        ``callback(PublishFailed)``, exactly once, on the loop (also when the connection
        stops before the publish completed). Cheaper per message: no future, no extra
        loop pass; for publishers that keep many messages in flight.

        Raises :class:`PublishFailed` at once (and never calls ``callback``) when the
        publish cannot even be queued: QoS other than 0 or 1, the connection not started,
        stopped or taken over. Exceptions from ``callback`` are logged."""
        client, bridge = self._publish_target(qos)
        self._publishes.with_callback(client, bridge, topic, payload, callback, qos)

    def _publish_target(self, qos: int) -> tuple[mqtt5.Client, LoopBridge]:
        """The client and bridge to publish through; raises :class:`PublishFailed` when
        there is none, or for a QoS other than 0 and 1."""
        if qos != 1 and qos != 0:
            raise PublishFailed(f"QoS {qos} is not supported (0 or 1)")
        client = self._client
        bridge = self._bridge
        if client is None or bridge is None or self._state.terminal:
            why = "taken over" if self.taken_over else "not started or stopped"
            raise PublishFailed(f"cannot publish: the connection is {why}")
        return client, bridge

    async def subscribe(self, topic_filter: str, handler: MessageHandler, qos: int = 1) -> None:
        """Add ``handler`` for messages matching ``topic_filter``; SUBSCRIBE if the filter is
        new (waits for the SUBACK when connected; otherwise the subscription is made on
        connect). Synchronous handlers run inline on the loop; ``async`` handlers run one
        message at a time, in order, per filter. Raises :class:`SubscribeFailed`, also when
        the connection would hold more topic filters than the platform allows
        (:data:`~iotref.device.connection.subscriptions.MAX_SUBSCRIPTIONS`)."""
        await self.subscribe_many([(topic_filter, handler)], qos)

    async def subscribe_many(
        self, subscriptions: Sequence[tuple[str, MessageHandler]], qos: int = 1
    ) -> None:
        """:meth:`subscribe` for several ``(topic_filter, handler)`` pairs at once: the new
        topic filters go to the broker together, in SUBSCRIBEs of as many filters as the
        platform accepts. Nothing is added when the connection would hold more filters than
        the platform allows; when the broker refuses a SUBSCRIBE, the handlers given here
        are removed again (:mod:`~iotref.device.connection.subscriptions`)."""
        stopped = self._started and (self._client is None or self._state.terminal)
        if stopped and not self._subscriptions.holds([f for f, _ in subscriptions]):
            raise SubscribeFailed("cannot subscribe: the connection is stopped")
        await self._subscriptions.add(
            self._current_client, subscriptions, qos, connected=self.connected
        )

    async def unsubscribe(
        self,
        topic_filter: str,
        handler: MessageHandler | None = None,
        *,
        max_wait_s: float = UNSUBSCRIBE_TIMEOUT_S,
    ) -> None:
        """Remove ``handler`` (all handlers if ``None``); UNSUBSCRIBE once none is left.

        Waits at most ``max_wait_s`` seconds for the UNSUBACK, and not at all while not
        connected (then the subscription stays in the broker's session, and what still
        arrives on it finds no handler)."""
        client = self._client if self.connected else None
        await self._subscriptions.remove(client, topic_filter, handler, max_wait_s)

    def _current_client(self) -> mqtt5.Client | None:
        return self._client

    # ------------------------------------------------------------------ awscrt threads

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        bridge = self._bridge
        if bridge is not None:
            bridge.post(fn, *args)

    def _crt_publish(self, data: mqtt5.PublishReceivedData) -> None:
        packet = data.publish_packet
        payload = packet.payload
        if isinstance(payload, str):
            payload = payload.encode()
        self._post(
            self._on_message,
            IncomingMessage(str(packet.topic), bytes(payload or b""), int(packet.qos or 0)),
        )

    def _crt_attempting(self, data: mqtt5.LifecycleAttemptingConnectData) -> None:
        self._post(self._on_attempting)

    def _crt_success(self, data: mqtt5.LifecycleConnectSuccessData) -> None:
        self._detector.connected()
        connack = data.connack_packet
        present = bool(getattr(connack, "session_present", False))
        self._post(self._on_success, present)

    def _crt_failure(self, data: mqtt5.LifecycleConnectFailureData) -> None:
        self._hold_client()
        connack = data.connack_packet
        code = getattr(connack, "reason_code", None)
        self._post(
            self._on_failure,
            crt_error_name(data.exception),
            int(code) if code is not None else None,
        )

    def _crt_disconnection(self, data: mqtt5.LifecycleDisconnectData) -> None:
        packet = data.disconnect_packet
        code = getattr(packet, "reason_code", None)
        reason_code = int(code) if code is not None else None
        error_name = crt_error_name(data.exception)
        takeover = self._detector.disconnected(error_name, reason_code)
        if takeover is not None:
            with self._takeover_lock:
                self._takeover_reason = self._takeover_reason or takeover
        self._hold_client()
        label = error_name
        if packet is not None and code is not None:
            label = f"DISCONNECT {getattr(code, 'name', code)} (0x{reason_code:02X})"
            if packet.reason_string:
                label += f": {packet.reason_string}"
        self._post(self._on_disconnect, label, takeover)

    def _crt_stopped(self, data: mqtt5.LifecycleStoppedData) -> None:
        self._post(self._on_stopped)

    def _hold_client(self) -> None:
        """Stop the awscrt client (non-blocking), on an awscrt thread, right when a
        connection ended or an attempt failed: awscrt's reconnect loop must not start an
        attempt of its own; the schedule starts the next one (:meth:`_schedule_reconnect`)."""
        client = self._client
        if client is not None:
            client.stop()

    # ------------------------------------------------------------------ loop side

    def _on_message(self, message: IncomingMessage) -> None:
        self._counters.messages_received += 1
        self._subscriptions.dispatch(message)

    def _on_attempting(self) -> None:
        if self._state in (ConnectionState.CONNECTED, ConnectionState.CONNECTING):
            return
        if not self._state.terminal:
            self._set_state(ConnectionState.CONNECTING)

    def _on_success(self, session_present: bool) -> None:
        if self._state.terminal:
            return
        self._counters.connects += 1
        self._session_present = session_present
        self._ever_connected = True
        self._schedule.connected()
        self._set_state(ConnectionState.CONNECTED, session_present=session_present)
        for waiter in self._attempt.waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._attempt.waiters.clear()
        self._spawn(self._after_connect(session_present))

    async def _after_connect(self, session_present: bool) -> None:
        failures = await self._subscriptions.resubscribe(self._current_client, session_present)
        for exc in failures:
            self._counters.last_error = exc.reason
            log.error("connection: resubscribing failed: %s", exc.reason)
        awaitables: list[Awaitable[None]] = []
        for cb in list(self._connected_callbacks):
            try:
                result = cb(session_present)
            except Exception:
                log.exception("connected callback failed")
                continue
            if inspect.isawaitable(result):
                awaitables.append(result)
        if awaitables:
            outcomes = await asyncio.gather(*awaitables, return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, Exception):
                    log.error("connected callback failed", exc_info=outcome)

    def _on_failure(self, error_name: str | None, connack_code: int | None) -> None:
        if self._state.terminal:
            return
        failure = describe_failure(self.settings, error_name, connack_code)
        self._counters.failures += 1
        self._counters.last_error = failure.reason
        self._attempt.last_failure = failure
        self._set_state(ConnectionState.DISCONNECTED, failure.reason)
        self._schedule_reconnect()
        if (
            self.settings.fail_fast
            and not self._ever_connected
            and is_fatal(failure, connack_code)
            and self._attempt.waiters
        ):
            for waiter in self._attempt.waiters:
                if not waiter.done():
                    waiter.set_exception(failure.copy())
            self._attempt.waiters.clear()

    def _on_disconnect(self, label: str | None, takeover: str | None) -> None:
        if self._state.terminal:
            return
        self._counters.disconnects += 1
        if self._stopping and takeover is None:
            return  # our own stop: STOPPED follows
        reason = f"connection lost: {label}" if label else "connection lost"
        self._counters.last_error = reason
        if takeover is not None:
            self._counters.last_error = f"taken over: {takeover}"
            log.error(
                "connection: client id %s taken over by another connection (%s); stopping",
                self.settings.client_id,
                takeover,
            )
            self._set_state(ConnectionState.TAKEN_OVER, takeover)
            self._finish(
                ConnectionTakenOver(
                    f"client id {self.settings.client_id!r} is in use by another connection: "
                    f"{takeover}",
                    "make sure only one process runs with this machine's identity",
                )
            )
            return
        self._set_state(ConnectionState.DISCONNECTED, reason)
        self._schedule_reconnect()

    def _on_stopped(self) -> None:
        self._client_stopped = True
        waiter, self._stop_waiter = self._stop_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._takeover_reason is not None and self._state is not ConnectionState.TAKEN_OVER:
            self._set_state(ConnectionState.TAKEN_OVER, self._takeover_reason)
        if self._reconnect_due:
            self._restart()

    # ------------------------------------------------------------------ reconnecting

    def _schedule_reconnect(self) -> None:
        """Plan the next attempt on the schedule (once per lost connection or failed
        attempt; the awscrt client was stopped by :meth:`_hold_client`)."""
        if self._stopping or self._state.terminal or self._reconnect_timer is not None:
            return
        if self._reconnect_due:
            return
        delay = self._schedule.next_delay()
        if self._connect_gate is not None:
            delay = self._connect_gate.delay(delay)
        log.info(
            "connection: next attempt for client id %s in %.2f s", self.settings.client_id, delay
        )
        loop = self._loop
        assert loop is not None
        self._reconnect_timer = loop.call_later(delay, self._reconnect_time)

    def _reconnect_time(self) -> None:
        self._reconnect_timer = None
        if self._stopping or self._state.terminal:
            return
        self._reconnect_due = True
        if self._client_stopped:
            self._restart()
        # else: awscrt has not reported the client stopped yet; _on_stopped restarts it

    def _restart(self) -> None:
        self._reconnect_due = False
        client = self._client
        if client is None or self._stopping or self._state.terminal:
            return
        self._client_stopped = False
        self._schedule.attempt_started()
        client.start()

    def _diagnose(self) -> None:
        """After an offline start without a connection yet: probe TLS on a daemon thread
        (awscrt reports TLS failures only after s2n's blinding delay of 10-30 s), so that
        the reason the platform is out of reach is known early."""
        self._diagnosis = None
        if self._ever_connected or self._stopping or self._state.terminal:
            return
        probe_tls_in_background(self.settings, partial(self._post, self._on_diagnosis))

    def _on_diagnosis(self, found: ConnectionFailed) -> None:
        if self._ever_connected or self._stopping or self._state.terminal:
            return
        if found.revoked:
            # A revoked certificate is never accepted again: stop trying, and say so to
            # whoever sends next (the caller shows it with its own next step).
            log.warning(
                "connection: client id %s: %s; stopping",
                self.settings.client_id,
                found.reason,
            )
            self._refused = found
            self._counters.last_error = found.reason
            self._attempt.last_failure = found
            self._spawn(self.stop())
            return
        if found.kind in ("tls", "config"):
            log.error(
                "connection: client id %s cannot connect to %s: %s",
                self.settings.client_id,
                self.settings.where(),
                found.one_line(),
            )
        if self._attempt.last_failure is None or found.kind in ("tls", "config"):
            self._counters.last_error = found.reason
            self._attempt.last_failure = found

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(log_task_error)

    def _set_state(
        self,
        state: ConnectionState,
        reason: str | None = None,
        *,
        session_present: bool | None = None,
    ) -> None:
        previous = self._state
        if previous is ConnectionState.TAKEN_OVER:
            return  # final
        if previous is state and state is not ConnectionState.DISCONNECTED:
            return
        self._state = state
        event = ConnectionEvent(state, time.time(), reason, session_present)
        level = logging.INFO
        if state is ConnectionState.TAKEN_OVER:
            level = logging.ERROR
        elif state is ConnectionState.DISCONNECTED:
            level = logging.WARNING
        log.log(
            level,
            "connection %s -> %s (client id %s, %s)%s%s",
            previous.value,
            state.value,
            self.settings.client_id,
            self.settings.where(),
            f": {reason}" if reason else "",
            "" if session_present is None else f" session_present={session_present}",
        )
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                log.exception("on_event callback failed")
        streams = self._streams
        if streams:
            for stream in list(streams):
                stream.push(event)
                if state.terminal:
                    stream.push(END)
            if state.terminal:
                streams.clear()
