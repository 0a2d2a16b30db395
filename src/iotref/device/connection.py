"""The device's one MQTT connection to the platform (contract section 6), on awscrt's MQTT 5
client.

Owns: connection settings (and reading them from a certificate store, contract section 5);
mutual TLS (TLS 1.2 minimum, the broker's host name verified, optional ALPN
``x-amzn-mqtt-ca`` for AWS IoT Core on port 443); keepalive; automatic reconnect on the
schedule of :mod:`iotref.device.reconnect` (capped exponential backoff with full jitter,
from the minimum again after every successful connect, at most one attempt per second);
a persistent session; resubscribing after a reconnect that lost the session; observable,
logged connection state; publishing with PUBACK futures; dispatching incoming messages
to handlers on the asyncio loop; and detecting that another process with the same
identity took the session over, after which the connection stops with
:class:`ConnectionTakenOver` instead of fighting.

Reconnecting: awscrt's own reconnect loop cannot be given this schedule (awscrt 0.38's
Python binding hands ``min_connected_time_to_reset_reconnect_delay_ms`` to the C client as
its minimum reconnect delay, and the C client's "connected long enough to reset the
backoff" time stays at 30 s whatever is asked; docs/operations.md). So the connection
drives it: when a connection is lost or an attempt fails, the awscrt client is stopped at
once (before its own reconnect timer fires) and started again when the schedule says. The
client rejoins the persistent session on every start (``REJOIN_ALWAYS``); what a stop
fails (QoS 1 publishes not yet acknowledged, subscriptions in flight) is failed to its
caller: the outbox publishes it again, subscriptions are made again on connect.

Threading: awscrt calls back on its own event-loop threads. Those callbacks only copy what
they need and hand it to the asyncio loop (one ``call_soon_threadsafe`` per batch); they
never block and never run application code. The one exception is stopping the awscrt
client when a connection ends (lost, failed, taken over), which is a non-blocking request,
made right there so that awscrt's reconnect loop cannot start an attempt of its own in the
meantime.

Logging (logger ``iotref.connection``): every state change, with the endpoint, port and
client id, never key material.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
import hashlib
import importlib
import inspect
import json
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

from awscrt import exceptions as crt_exceptions
from awscrt import io, mqtt5

from iotref.device import stdlib_compat
from iotref.device.errors import IotrefError, StoreError
from iotref.device.onboarding.next_steps import NextStep, run
from iotref.device.rate_limit import ConnectGate, PublishLimiter
from iotref.device.reconnect import ReconnectSchedule
from iotref.device.thread_state import keep_thread_state
from iotref.protocol import limits

log = logging.getLogger("iotref.connection")

ALPN_PROTOCOL = "x-amzn-mqtt-ca"
"""ALPN protocol name with which AWS IoT Core accepts MQTT with client certificates on 443."""
MAX_FILTERS_PER_SUBSCRIBE = limits.MAX_TOPIC_FILTERS_PER_SUBSCRIBE
"""Topic filters sent in one SUBSCRIBE at most (AWS IoT Core accepts 8)."""
MAX_SUBSCRIPTIONS = limits.MAX_SUBSCRIPTIONS_PER_CONNECTION
"""Topic filters one connection holds at most (AWS IoT Core: 50); more are refused with
:class:`SubscribeFailed` before anything is sent."""
QUOTA_EXCEEDED = 0x97
"""PUBACK reason code "Quota exceeded": the publish was throttled; it is retried and the
connection's :class:`~iotref.device.rate_limit.PublishLimiter` slows down."""
STOP_TIMEOUT_S = 5.0
"""Longest wait for awscrt to report the client stopped, on :meth:`Connection.stop`."""
UNSUBSCRIBE_TIMEOUT_S = 5.0
"""Longest wait for an UNSUBACK."""
DIAGNOSE_AFTER_S = 1.0
"""Without a connection this long after an offline start, probe TLS in the background."""
EVENT_QUEUE_LIMIT = 1000

STORE_PROPERTIES = "properties.json"
STORE_CERT = "deviceCert.pem"
STORE_KEY = "devicePrivateKey.pem"
STORE_CA = "amazonRootCA1.pem"

SESSION_TAKEN_OVER = 0x8E
_HANGUP_ERRORS = frozenset(
    {"AWS_ERROR_MQTT_UNEXPECTED_HANGUP", "AWS_IO_SOCKET_CLOSED", "AWS_IO_BROKEN_PIPE"}
)
"""Disconnects that look like the broker closing the socket on purpose (what Mosquitto does
to the old connection on a session takeover), as opposed to timeouts."""
_FATAL_CONNACK_CODES = frozenset(
    {
        mqtt5.ConnectReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
        mqtt5.ConnectReasonCode.BAD_USERNAME_OR_PASSWORD,
        mqtt5.ConnectReasonCode.NOT_AUTHORIZED,
        mqtt5.ConnectReasonCode.BANNED,
        mqtt5.ConnectReasonCode.BAD_AUTHENTICATION_METHOD,
        mqtt5.ConnectReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
    }
)


# --------------------------------------------------------------------------- errors


class MqttError(IotrefError):
    """Base class of the connection's errors."""


class ConnectionFailed(MqttError):
    """The connection could not be established.

    ``kind`` is one of ``"config"`` (unreadable settings or files), ``"tls"`` (handshake
    failed: wrong CA, certificate not accepted, host name mismatch), ``"refused"`` (the
    broker refused the CONNECT or closed the connection during it), ``"unreachable"``
    (DNS, no route, nothing listening, timeout) or ``"other"``. ``error_name`` is awscrt's
    error name when there is one. ``revoked`` is true when the broker refused the device
    certificate as revoked (a ``"tls"`` failure).
    """

    def __init__(
        self,
        reason: str,
        next_step: str | NextStep | None = None,
        *,
        kind: str = "other",
        error_name: str | None = None,
        revoked: bool = False,
    ) -> None:
        super().__init__(reason, next_step)
        self.kind = kind
        self.error_name = error_name
        self.revoked = revoked


class ConnectionTakenOver(MqttError):
    """Another connection with the same client id took the session over, repeatedly (or the
    broker said so); this connection stopped instead of fighting for the session."""


class ConnectionClosed(MqttError):
    """The connection was stopped; no more operations are possible on it."""


class PublishFailed(MqttError):
    """A publish was not acknowledged: a PUBACK reason code >= 0x80 (``reason_code``), an
    error of the MQTT library (``error_name``, e.g. ``AWS_ERROR_MQTT5_PACKET_VALIDATION``),
    or the connection stopped / was taken over before it completed."""

    def __init__(
        self,
        reason: str,
        next_step: str | None = None,
        *,
        reason_code: int | None = None,
        error_name: str | None = None,
    ) -> None:
        super().__init__(reason, next_step)
        self.reason_code = reason_code
        self.error_name = error_name


class SubscribeFailed(MqttError):
    """The broker refused a subscription (a SUBACK reason code >= 0x80) or it could not be
    sent."""

    def __init__(
        self, reason: str, next_step: str | None = None, *, reason_codes: tuple[int, ...] = ()
    ) -> None:
        super().__init__(reason, next_step)
        self.reason_codes = reason_codes


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ConnectionSettings:
    """Where and how to connect. Times in seconds."""

    endpoint: str
    port: int
    client_id: str
    cert_path: Path
    key_path: Path
    ca_path: Path
    alpn: bool = False
    keepalive_s: int = 30
    min_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    session_expiry_s: int = 3600
    connect_timeout_s: float = 10.0
    takeover_limit: int = 5
    takeover_window_s: float = 120.0
    takeover_uptime_s: float = 10.0
    """A disconnect counts towards the takeover heuristic only if the connection had been
    up for less than this (a fight for the session gives short-lived connections)."""
    fail_fast: bool = True
    """On the first connect of :meth:`Connection.start`, give up at once on errors that
    retrying cannot fix (TLS handshake failures, CONNACK not authorized / banned / bad
    client id) instead of retrying until ``connect_timeout_s``. After the first success
    the connection never gives up."""
    ping_timeout_s: float = 10.0
    publish_rate_limit: float | None = float(limits.PUBLISH_REQUESTS_PER_SECOND_PER_CONNECTION)
    """The platform's quota of publishes a second on this connection, which every publish
    is paced to stay under (:class:`~iotref.device.rate_limit.PublishLimiter`); ``None`` or
    0: not paced."""
    throughput_limit: int | None = limits.THROUGHPUT_BYTES_PER_SECOND_PER_CONNECTION
    """The platform's quota of bytes a second (topic plus payload) on this connection, paced
    the same way; ``None`` or 0: not paced."""

    def __post_init__(self) -> None:
        problems = []
        if not self.endpoint:
            problems.append("endpoint is empty")
        if not 0 < self.port < 65536:
            problems.append(f"port {self.port} is not a TCP port")
        if not self.client_id:
            problems.append("client_id is empty")
        if not 0 < self.keepalive_s <= 65535:
            problems.append("keepalive_s must be 1..65535")
        if not 0 < self.min_backoff_s <= self.max_backoff_s:
            problems.append("backoff needs 0 < min_backoff_s <= max_backoff_s")
        if self.session_expiry_s < 0:
            problems.append("session_expiry_s must be >= 0")
        if self.connect_timeout_s <= 0:
            problems.append("connect_timeout_s must be > 0")
        if self.takeover_limit < 0 or self.takeover_window_s <= 0:
            problems.append("takeover_limit must be >= 0 and takeover_window_s > 0")
        for name in ("publish_rate_limit", "throughput_limit"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                problems.append(f"{name} must be 0 (off) or more")
        if problems:
            raise ValueError("invalid connection settings: " + "; ".join(problems))

    @classmethod
    def from_store(cls, store_dir: Path, **overrides: Any) -> ConnectionSettings:
        """Settings from a certificate store (contract section 5): ``properties.json``
        (``mqtt_endpoint``, ``mqtt_port``, ``client_id``), ``deviceCert.pem``,
        ``devicePrivateKey.pem``, ``amazonRootCA1.pem``. Keyword arguments override any
        field. Raises :class:`~iotref.device.errors.StoreError` if the store is unusable."""
        store_dir = Path(store_dir)
        props_path = store_dir / STORE_PROPERTIES
        try:
            props = json.loads(props_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StoreError(
                f"no {STORE_PROPERTIES} in the certificate store {store_dir}",
                "onboard this machine first",
                path=props_path,
            ) from None
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"cannot read {props_path}: {exc}", "onboard this machine again", path=props_path
            ) from None
        if not isinstance(props, dict):
            raise StoreError(f"{props_path} is not a JSON object", path=props_path)
        values: dict[str, Any] = {
            "cert_path": store_dir / STORE_CERT,
            "key_path": store_dir / STORE_KEY,
            "ca_path": store_dir / STORE_CA,
        }
        for key, name in (
            ("endpoint", "mqtt_endpoint"),
            ("port", "mqtt_port"),
            ("client_id", "client_id"),
        ):
            if name in props:
                values[key] = props[name]
        values.update(overrides)
        missing = [k for k in ("endpoint", "port", "client_id") if not values.get(k)]
        if missing:
            raise StoreError(
                f"{props_path} lacks {', '.join(missing)}",
                "onboard this machine again",
                path=props_path,
            )
        try:
            values["port"] = int(values["port"])
        except (TypeError, ValueError):
            raise StoreError(f"{props_path}: mqtt_port is not a number", path=props_path) from None
        for key in ("cert_path", "key_path", "ca_path"):
            values[key] = Path(values[key])
        return cls(**values)

    def where(self) -> str:
        """``host:port`` (and ALPN) for messages and logs."""
        return f"{self.endpoint}:{self.port}" + (" (ALPN)" if self.alpn else "")


# --------------------------------------------------------------------------- state, events


class ConnectionState(enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    TAKEN_OVER = "taken_over"
    STOPPED = "stopped"

    @property
    def terminal(self) -> bool:
        # Identity, not ``in (...)``: the members are singletons, and this runs for every
        # publish (a tuple's ``in`` calls the enum's ``__eq__``).
        return self is ConnectionState.TAKEN_OVER or self is ConnectionState.STOPPED


@dataclass(frozen=True)
class ConnectionEvent:
    state: ConnectionState
    at: float
    """``time.time()`` of the change."""
    reason: str | None = None
    session_present: bool | None = None


@dataclass(frozen=True)
class IncomingMessage:
    topic: str
    payload: bytes
    qos: int


@dataclass(frozen=True)
class ConnectionStats:
    connects: int = 0
    disconnects: int = 0
    publishes: int = 0
    pubacks: int = 0
    failures: int = 0
    """Failed connection attempts."""
    publish_failures: int = 0
    messages_received: int = 0
    last_error: str | None = None
    throttled: int = 0
    """Publishes the platform answered with "quota exceeded" (PUBACK 0x97)."""


MessageHandler = Callable[[IncomingMessage], Awaitable[None] | None]
ConnectedCallback = Callable[[bool], Awaitable[None] | None]
PublishCallback = Callable[[BaseException | None], None]
"""What :meth:`Connection.publish_callback` calls on the loop: ``None`` on success, else
the :class:`PublishFailed`."""


# --------------------------------------------------------------------------- pure policy


class TakeoverDetector:
    """Decides whether a disconnect means that another connection took the session over.

    A DISCONNECT with reason code 0x8E (SESSION_TAKEN_OVER, what AWS IoT Core sends) is a
    takeover. Brokers that just close the socket (Mosquitto 2.0) are recognized by a
    heuristic: ``limit`` hang-ups within ``window_s`` seconds, each of a connection that
    had been up for less than ``uptime_s``. ``limit`` 0 turns the heuristic off.
    Thread-safe; times come from ``clock`` (monotonic seconds).
    """

    # One per connection: no instance dict (see Connection.__slots__).
    __slots__ = ("_clock", "_connected_at", "_lock", "_short", "limit", "uptime_s", "window_s")

    def __init__(
        self,
        limit: int,
        window_s: float,
        uptime_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self.uptime_s = uptime_s
        self._clock = clock
        self._lock = threading.Lock()
        self._connected_at: float | None = None
        # The times of the recent short-lived hang-ups, oldest first: at most a few (a
        # list, not a deque: an empty deque already takes a 760-byte block).
        self._short: list[float] = []

    def connected(self) -> None:
        with self._lock:
            self._connected_at = self._clock()

    def disconnected(self, error_name: str | None, reason_code: int | None) -> str | None:
        """Record a disconnect; return why it is a takeover, or ``None``."""
        with self._lock:
            now = self._clock()
            connected_at, self._connected_at = self._connected_at, None
            if reason_code == SESSION_TAKEN_OVER:
                return "the broker reported SESSION_TAKEN_OVER"
            if self.limit <= 0 or connected_at is None:
                return None
            if error_name not in _HANGUP_ERRORS or now - connected_at > self.uptime_s:
                return None
            short = self._short
            short.append(now)
            expired = 0
            while expired < len(short) and now - short[expired] > self.window_s:
                expired += 1
            del short[:expired]
            if len(short) >= self.limit:
                return (
                    f"the broker closed {len(short)} connections within "
                    f"{self.window_s:g} s, each soon after it was accepted: another process "
                    "is probably using this identity (or the network drops every new "
                    "connection)"
                )
            return None


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


def describe_failure(
    settings: ConnectionSettings, error_name: str | None, connack_code: int | None
) -> ConnectionFailed:
    """A :class:`ConnectionFailed` that says in words why a connection attempt failed."""
    where = settings.where()
    if connack_code is not None and connack_code >= 0x80:
        try:
            label = mqtt5.ConnectReasonCode(connack_code).name
        except ValueError:
            label = "unknown"
        return ConnectionFailed(
            f"the broker at {where} refused the connection of client id "
            f"{settings.client_id!r}: {label} (0x{connack_code:02X})",
            "check that the certificate belongs to this client id and is not revoked",
            kind="refused",
            error_name=error_name,
        )
    name = error_name or "unknown error"
    if name.startswith("AWS_IO_TLS"):
        return ConnectionFailed(
            f"the TLS handshake with {where} failed ({name})",
            "check that the CA file holds the server's root CA, that the endpoint name "
            "matches the server certificate, and that the device certificate and key "
            "belong together and are accepted by the platform",
            kind="tls",
            error_name=error_name,
        )
    if name in _HANGUP_ERRORS:
        return ConnectionFailed(
            f"{where} closed the connection during the handshake ({name})",
            "the broker probably did not accept the device certificate",
            kind="refused",
            error_name=error_name,
        )
    if name.startswith(("AWS_IO_SOCKET", "AWS_IO_DNS")) or "TIMEOUT" in name:
        return ConnectionFailed(
            f"{where} is unreachable ({name})",
            "check the endpoint, the port and the network",
            kind="unreachable",
            error_name=error_name,
        )
    return ConnectionFailed(
        f"connecting to {where} failed ({name})", kind="other", error_name=error_name
    )


def diagnose_tls(settings: ConnectionSettings, timeout_s: float = 3.0) -> ConnectionFailed | None:
    """Probe ``settings`` with Python's own TLS (same files, same checks) and say what is
    wrong, or ``None`` if the TLS handshake works. Blocking; run it in a thread. Makes no
    MQTT connection, so it never takes a session over."""
    where = settings.where()
    try:
        context = ssl.create_default_context(cafile=str(settings.ca_path))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(settings.cert_path), str(settings.key_path))
        if settings.alpn:
            context.set_alpn_protocols([ALPN_PROTOCOL])
    except (OSError, ssl.SSLError, ValueError) as exc:
        return ConnectionFailed(
            f"cannot use the device certificate, key or CA file: {exc}",
            "check that the files are PEM and that the key belongs to the certificate",
            kind="config",
        )
    try:
        with (
            socket.create_connection((settings.endpoint, settings.port), timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=settings.endpoint) as tls,
        ):
            # A refused client certificate may only show on the first read (TLS 1.3).
            tls.settimeout(min(0.5, timeout_s))
            try:
                if tls.recv(1) == b"":
                    return ConnectionFailed(
                        f"{where} closed the connection right after the TLS handshake",
                        "the broker probably did not accept the device certificate",
                        kind="tls",
                    )
            except TimeoutError:
                return None  # the broker waits for CONNECT: TLS is fine
    except ssl.SSLCertVerificationError as exc:
        detail = exc.verify_message or str(exc)
        if "hostname" in detail.lower() or "match" in detail.lower():
            reason = f"the server certificate of {where} is not valid for {settings.endpoint!r}"
            step = "connect with the host name the platform gave you (mqtt_endpoint)"
        else:
            reason = f"the server certificate of {where} is not trusted: {detail}"
            step = f"check that {settings.ca_path} holds the platform's server root CA"
        return ConnectionFailed(reason, step, kind="tls")
    except ssl.SSLError as exc:
        text = (exc.reason or str(exc)).lower()
        if "revoked" in text:
            return revoked_failure(where, exc.reason or str(exc))
        if any(w in text for w in ("certificate", "unknown_ca", "unknown ca", "bad cert")):
            return ConnectionFailed(
                f"{where} did not accept the device certificate ({exc.reason or exc})",
                "check that the device certificate was issued by the platform for this "
                "environment and is not revoked",
                kind="tls",
            )
        return ConnectionFailed(
            f"the TLS handshake with {where} failed ({exc.reason or exc})", kind="tls"
        )
    except (ConnectionResetError, BrokenPipeError) as exc:
        return ConnectionFailed(
            f"{where} closed the connection during the TLS handshake ({exc})",
            "the broker probably did not accept the device certificate",
            kind="tls",
        )
    except OSError as exc:
        return ConnectionFailed(
            f"{where} is unreachable ({exc})",
            "check the endpoint, the port and the network",
            kind="unreachable",
        )
    return None


#: What to do about a revoked device certificate.
REVOKED_NEXT_STEP = run(
    "provision",
    "--renew",
    before="a revoked certificate is never accepted again:",
    then="for a new key and certificate",
)


def revoked_failure(where: str, detail: str) -> ConnectionFailed:
    """The broker refused the device certificate because it is revoked."""
    return ConnectionFailed(
        f"{where} refused the device certificate: it is revoked ({detail})",
        REVOKED_NEXT_STEP,
        kind="tls",
        revoked=True,
    )


def _fatal(failure: ConnectionFailed, connack_code: int | None) -> bool:
    if failure.kind == "tls":
        return True
    return connack_code is not None and connack_code in _FATAL_CONNACK_CODES


_CRT_ERROR_NAME = re.compile(r"\((AWS_ERROR_[A-Z0-9_]+)\)")


def _error_name(exc: BaseException | None) -> str | None:
    """awscrt's error name of ``exc`` (an ``AwsCrtError``'s ``name``, or the name in the
    ``RuntimeError`` that awscrt raises at once, "5143 (AWS_ERROR_...): ..."), else the
    exception's type."""
    if exc is None:
        return None
    name = getattr(exc, "name", None)
    if name:
        return str(name)
    found = _CRT_ERROR_NAME.search(str(exc)) if isinstance(exc, RuntimeError) else None
    return found.group(1) if found else type(exc).__name__


def build_client_options(settings: ConnectionSettings) -> mqtt5.ClientOptions:
    """awscrt client options for ``settings`` (without TLS context and callbacks), with
    awscrt's own reconnect loop: delays from ``min_backoff_s`` to ``max_backoff_s`` with
    full jitter, reset to the minimum only by a connection that lasted 30 s (awscrt's
    fixed default, see :func:`supervised_client_options` for what :class:`Connection`
    uses instead).

    ``min_connected_time_to_reset_reconnect_delay_ms`` is left out on purpose: awscrt
    0.38's Python binding takes it as the minimum reconnect delay (and ignores
    ``min_reconnect_delay_ms`` then)."""
    connect = mqtt5.ConnectPacket(
        client_id=settings.client_id,
        keep_alive_interval_sec=settings.keepalive_s,
        session_expiry_interval_sec=settings.session_expiry_s,
        request_problem_information=True,
    )
    return mqtt5.ClientOptions(
        host_name=settings.endpoint,
        port=settings.port,
        connect_options=connect,
        session_behavior=(
            mqtt5.ClientSessionBehaviorType.REJOIN_POST_SUCCESS
            if settings.session_expiry_s > 0
            else mqtt5.ClientSessionBehaviorType.CLEAN
        ),
        offline_queue_behavior=mqtt5.ClientOperationQueueBehaviorType.FAIL_QOS0_PUBLISH_ON_DISCONNECT,
        retry_jitter_mode=io.ExponentialBackoffJitterMode.FULL,
        min_reconnect_delay_ms=max(1, round(settings.min_backoff_s * 1000)),
        max_reconnect_delay_ms=max(1, round(settings.max_backoff_s * 1000)),
        ping_timeout_ms=max(1, round(settings.ping_timeout_s * 1000)),
        connack_timeout_ms=max(1, round(settings.connect_timeout_s * 1000)),
        socket_options=_socket_options(settings),
        disable_metrics=True,
    )


def supervised_client_options(settings: ConnectionSettings) -> mqtt5.ClientOptions:
    """The options :class:`Connection` gives awscrt: those of :func:`build_client_options`,
    but rejoining the persistent session on every start (the connection stops and starts
    the client to reconnect on its own schedule), and awscrt's reconnect loop only as a
    fallback: a fixed delay of ``max_backoff_s`` (the connection stops the client long
    before that)."""
    options = build_client_options(settings)
    if settings.session_expiry_s > 0:
        options.session_behavior = mqtt5.ClientSessionBehaviorType.REJOIN_ALWAYS
    fallback_ms = max(1, round(settings.max_backoff_s * 1000))
    options.retry_jitter_mode = io.ExponentialBackoffJitterMode.NONE
    options.min_reconnect_delay_ms = fallback_ms
    options.max_reconnect_delay_ms = fallback_ms
    return options


def _socket_options(settings: ConnectionSettings) -> io.SocketOptions:
    options = io.SocketOptions()
    options.connect_timeout_ms = max(1, round(settings.connect_timeout_s * 1000))
    options.keep_alive = True  # TCP keepalive as well, for NATs on shop floors
    return options


def build_tls_context(settings: ConnectionSettings) -> io.ClientTlsContext:
    """Mutual TLS: the device certificate and key, only ``ca_path`` trusted, TLS >= 1.2,
    the server's certificate and host name verified; ALPN if asked for."""
    for label, path in (
        ("certificate", settings.cert_path),
        ("private key", settings.key_path),
        ("CA file", settings.ca_path),
    ):
        if not Path(path).is_file():
            raise ConnectionFailed(
                f"the device {label} {path} does not exist",
                "onboard this machine, or point the settings at its certificate store",
                kind="config",
            )
    try:
        options = io.TlsContextOptions.create_client_with_mtls_from_path(
            str(settings.cert_path), str(settings.key_path)
        )
        options.override_default_trust_store_from_path(None, str(settings.ca_path))
        options.min_tls_ver = io.TlsVersion.TLSv1_2
        options.verify_peer = True
        if settings.alpn:
            options.alpn_list = [ALPN_PROTOCOL]
        return io.ClientTlsContext(options)
    except Exception as exc:
        raise ConnectionFailed(
            f"cannot use the device certificate, key or CA file ({_error_name(exc)})",
            "check that the files are PEM and that the key belongs to the certificate",
            kind="config",
            error_name=_error_name(exc),
        ) from None


# --------------------------------------------------------------------------- internals


class _LoopBridge:
    """Hands calls from awscrt threads to the asyncio loop, in order, batched."""

    __slots__ = ("_items", "_lock", "_loop", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        # A list swapped for a new one by each drain (a deque would keep a 760-byte block
        # per connection even when empty).
        self._items: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self._scheduled = False

    def post(self, fn: Callable[..., None], *args: Any) -> None:
        # Called on awscrt's threads: keep their Python thread state instead of building
        # and destroying one per callback (see iotref.device.thread_state).
        keep_thread_state()
        with self._lock:
            self._items.append((fn, args))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            with self._lock:
                self._items = []
                self._scheduled = False

    def _drain(self) -> None:
        with self._lock:
            items = self._items
            self._items = []
            self._scheduled = False
        for fn, args in items:
            try:
                fn(*args)
            except Exception:
                log.exception("connection: internal callback failed")


class _Subscription:
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
            if _is_async(handler):
                self._enqueue(handler, message)
                continue
            try:
                result = handler(message)
            except Exception:
                log.exception("handler for %s failed", self.topic_filter)
                continue
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                task.add_done_callback(_log_task_error)

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


def _is_async(handler: Callable[..., Any]) -> bool:
    target = handler
    while hasattr(target, "func"):  # functools.partial
        target = target.func
    call = getattr(target, "__call__", None)  # noqa: B004
    return inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(call)


_QOS: dict[int, mqtt5.QoS] = {0: mqtt5.QoS.AT_MOST_ONCE, 1: mqtt5.QoS.AT_LEAST_ONCE}

_KNOWN_CRT_PUBLISH_SHA256 = "70269f0e2ead0e172c1a13879ea56505fbcac6ed51559d31eb15a90e1db12382"
"""SHA-256 of the source of ``awscrt.mqtt5.Client.publish`` as of awscrt 0.38.1."""


@functools.cache
def _raw_publish_function() -> Callable[..., None] | None:
    """awscrt's native publish function, which ``mqtt5.Client.publish`` wraps in a
    concurrent future, a packet object and a closure per message, or None.

    :meth:`Connection.publish_callback` calls it directly, with its own completion
    callback, which spares those objects and most of the Python work awscrt's threads do
    (holding the GIL) per PUBACK. It is not a public API, so it is used only while the
    wrapper's source is exactly the one this was written against: that pins the
    function's arguments and its callback's. Any other awscrt uses the public wrapper."""
    try:
        source = inspect.getsource(mqtt5.Client.publish)
        native = importlib.import_module("_awscrt")
    except (ImportError, OSError, TypeError):
        return None
    if hashlib.sha256(source.encode()).hexdigest() != _KNOWN_CRT_PUBLISH_SHA256:
        log.debug("connection: unknown awscrt publish wrapper; using it as it is")
        return None
    publish = getattr(native, "mqtt5_client_publish", None)
    return publish if callable(publish) else None


def _puback_reason_code(value: Any) -> mqtt5.PubackReasonCode | None:
    """What awscrt's wrapper makes of a PUBACK reason code (None if unknown)."""
    try:
        return mqtt5.PubackReasonCode(value)
    except Exception:
        return None


def _call_publish_callback(callback: PublishCallback, outcome: BaseException | None) -> None:
    try:
        callback(outcome)
    except Exception:
        log.exception("publish callback failed")


def _log_task_error(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("message handler failed", exc_info=task.exception())


_END = object()


class _EventStream:
    """What :meth:`Connection.events` returns: every event from its creation on."""

    def __init__(self, owner: Connection) -> None:
        self._owner = owner
        self._queue: collections.deque[object] = collections.deque()
        self._wakeup: asyncio.Event = asyncio.Event()
        self._closed = False

    def push(self, item: object) -> None:
        if len(self._queue) >= EVENT_QUEUE_LIMIT:
            self._queue.popleft()
        self._queue.append(item)
        self._wakeup.set()

    def __aiter__(self) -> _EventStream:
        return self

    async def __anext__(self) -> ConnectionEvent:
        while True:
            if self._queue:
                item = self._queue.popleft()
                if item is _END:
                    self._close()
                    raise StopAsyncIteration
                assert isinstance(item, ConnectionEvent)
                return item
            if self._closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        self._closed = True
        streams = self._owner._streams
        if streams is not None:
            streams.discard(self)


# --------------------------------------------------------------------------- the connection


@dataclass(slots=True)
class _Counters:
    connects: int = 0
    disconnects: int = 0
    publishes: int = 0
    pubacks: int = 0
    failures: int = 0
    publish_failures: int = 0
    messages_received: int = 0
    last_error: str | None = None
    throttled: int = 0


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
        "_next_callback_key",
        "_on_event",
        "_pending",
        "_pending_callbacks",
        "_raw_publish",
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
        "_subs",
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
        :func:`build_tls_context`, ahead of time or on another thread); without it,
        :meth:`start` builds one from ``settings``. The client keeps it while it lives (it
        is needed for every reconnect). ``connect_gate``: start times shared with other
        connections (a fleet's account-level connect rate), taken by every attempt."""
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
        self._bridge: _LoopBridge | None = None
        self._subs: dict[str, _Subscription] = {}
        self._connected_callbacks: list[ConnectedCallback] = []
        self._streams: set[_EventStream] | None = None  # made by events()
        self._pending: set[asyncio.Future[None]] = set()
        # publish_callback's callbacks not yet called, by a per-connection number.
        self._pending_callbacks: dict[int, PublishCallback] = {}
        self._next_callback_key = 0
        self._raw_publish: Callable[..., None] | None = None
        self._counters = _Counters()
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
        c = self._counters
        return ConnectionStats(
            connects=c.connects,
            disconnects=c.disconnects,
            publishes=c.publishes,
            pubacks=c.pubacks,
            failures=c.failures,
            publish_failures=c.publish_failures,
            messages_received=c.messages_received,
            last_error=c.last_error,
            throttled=c.throttled,
        )

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
        self._bridge = _LoopBridge(self._loop)
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
        self._raw_publish = _raw_publish_function()
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
        timeout = self.settings.connect_timeout_s
        try:
            async with stdlib_compat.timeout(timeout):
                if self.settings.fail_fast:
                    # awscrt (s2n) reports TLS failures only after a "blinding" delay of
                    # 10-30 s; a quick TLS probe tells at once what is wrong.
                    done, _ = await asyncio.wait({waiter}, timeout=min(1.0, timeout / 4))
                    if not done:
                        found = await asyncio.to_thread(
                            diagnose_tls, self.settings, max(1.0, timeout / 2)
                        )
                        if found is not None and found.kind in ("tls", "config"):
                            if not waiter.done():
                                waiter.cancel()
                            raise found
                await waiter
        except TimeoutError:
            failure = self._attempt.last_failure
            if failure is None:
                failure = await asyncio.to_thread(diagnose_tls, self.settings, 3.0)
            failure = failure or ConnectionFailed(
                f"no connection to {self.settings.where()} within {timeout:g} s",
                "check the endpoint, the port and the network",
                kind="unreachable",
            )
            await self.stop()
            raise ConnectionFailed(
                failure.reason,
                failure.hint or failure.next_step,
                kind=failure.kind,
                error_name=failure.error_name,
                revoked=failure.revoked,
            ) from None
        except ConnectionFailed as exc:
            await self.stop()
            if exc.kind == "tls" and not exc.revoked:
                # awscrt's TLS errors are generic (AWS_IO_TLS_ERROR_READ_FAILURE); Python's
                # handshake names the cause, e.g. the broker's "certificate revoked" alert.
                found = await asyncio.to_thread(diagnose_tls, self.settings, 3.0)
                if found is not None and found.kind in ("tls", "config"):
                    raise found from None
            raise
        except MqttError:
            await self.stop()
            raise

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
        for fut in list(self._pending):
            if not fut.done():
                fut.set_exception(PublishFailed(f"publish not completed: {error.reason}"))
                self._counters.publish_failures += 1
        self._pending.clear()
        callbacks = list(self._pending_callbacks.values())
        self._pending_callbacks.clear()
        for callback in callbacks:
            self._counters.publish_failures += 1
            _call_publish_callback(
                callback, PublishFailed(f"publish not completed: {error.reason}")
            )
        for waiter in self._attempt.waiters:
            if not waiter.done():
                waiter.set_exception(error)
        self._attempt.waiters.clear()
        for sub in self._subs.values():
            sub.close()
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
        stream = _EventStream(self)
        if self._started and self._state.terminal:
            stream.push(_END)
        else:
            if self._streams is None:
                self._streams = set()
            self._streams.add(stream)
        return stream

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
        if qos not in (0, 1):
            fut.set_exception(PublishFailed(f"QoS {qos} is not supported (0 or 1)"))
            return fut
        client = self._client
        if client is None or self._state.terminal:
            why = "taken over" if self.taken_over else "not started or stopped"
            fut.set_exception(PublishFailed(f"cannot publish: the connection is {why}"))
            return fut
        try:
            crt_future = client.publish(
                mqtt5.PublishPacket(topic=topic, payload=payload, qos=mqtt5.QoS(qos))
            )
        except Exception as exc:
            name = _error_name(exc)
            fut.set_exception(PublishFailed(f"cannot publish to {topic}: {name}", error_name=name))
            return fut
        self._counters.publishes += 1
        if self._limiter is not None:
            self._limiter.spend(len(topic) + len(payload))
        self._pending.add(fut)
        bridge = self._bridge
        assert bridge is not None
        crt_future.add_done_callback(
            lambda cf: bridge.post(self._complete_publish, fut, cf, topic, qos)
        )
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
        if qos != 1 and qos != 0:
            raise PublishFailed(f"QoS {qos} is not supported (0 or 1)")
        client = self._client
        if client is None or self._state.terminal:
            why = "taken over" if self.taken_over else "not started or stopped"
            raise PublishFailed(f"cannot publish: the connection is {why}")
        raw = self._raw_publish
        if raw is not None and type(client) is mqtt5.Client:
            key = self._next_callback_key
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
                    partial(self._crt_published, key, topic, qos),
                )
            except Exception as exc:
                name = _error_name(exc)
                raise PublishFailed(f"cannot publish to {topic}: {name}", error_name=name) from None
            self._counters.publishes += 1
            self._next_callback_key = key + 1
            self._pending_callbacks[key] = callback
            if self._limiter is not None:
                self._limiter.spend(len(topic) + len(payload))
            return
        try:
            crt_future = client.publish(
                mqtt5.PublishPacket(topic=topic, payload=payload, qos=_QOS[qos])
            )
        except Exception as exc:
            name = _error_name(exc)
            raise PublishFailed(f"cannot publish to {topic}: {name}", error_name=name) from None
        self._counters.publishes += 1
        if self._limiter is not None:
            self._limiter.spend(len(topic) + len(payload))
        key = self._next_callback_key
        self._next_callback_key = key + 1
        self._pending_callbacks[key] = callback
        bridge = self._bridge
        assert bridge is not None
        # Runs on an awscrt thread: only hands the completion over to the loop.
        crt_future.add_done_callback(
            partial(bridge.post, self._complete_publish_callback, key, topic, qos)
        )

    def _crt_published(
        self, key: int, topic: str, qos: int, error_code: int, _qos: Any, reason_code: Any, *_: Any
    ) -> None:
        """awscrt's completion of a raw publish (on an awscrt thread): hand it to the loop."""
        bridge = self._bridge
        if bridge is not None:
            bridge.post(self._complete_raw_publish, key, topic, qos, error_code, reason_code)

    def _complete_raw_publish(
        self, key: int, topic: str, qos: int, error_code: int, reason_code: Any
    ) -> None:
        callback = self._pending_callbacks.pop(key, None)
        if callback is None:
            return  # already failed by _finish
        error = crt_exceptions.from_code(error_code) if error_code else None
        # 0 (success), the usual case, needs no decoding: it reads like no code at all.
        code = (
            _puback_reason_code(reason_code) if qos == 1 and error is None and reason_code else None
        )
        _call_publish_callback(callback, self._outcome(topic, qos, error, code))

    def _complete_publish_callback(self, key: int, topic: str, qos: int, cf: Any) -> None:
        callback = self._pending_callbacks.pop(key, None)
        if callback is None:
            return  # already failed by _finish
        _call_publish_callback(callback, self._publish_outcome(cf, topic, qos))

    def _complete_publish(self, fut: asyncio.Future[None], cf: Any, topic: str, qos: int) -> None:
        self._pending.discard(fut)
        if fut.done():
            return
        failure = self._publish_outcome(cf, topic, qos)
        if failure is None:
            fut.set_result(None)
        else:
            fut.set_exception(failure)

    def _publish_outcome(self, cf: Any, topic: str, qos: int) -> PublishFailed | None:
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
            name = _error_name(exc)
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

    async def subscribe(self, topic_filter: str, handler: MessageHandler, qos: int = 1) -> None:
        """Add ``handler`` for messages matching ``topic_filter``; SUBSCRIBE if the filter is
        new (waits for the SUBACK when connected; otherwise the subscription is made on
        connect). Synchronous handlers run inline on the loop; ``async`` handlers run one
        message at a time, in order, per filter. Raises :class:`SubscribeFailed`, also when
        the connection would hold more than :data:`MAX_SUBSCRIPTIONS` topic filters."""
        await self.subscribe_many([(topic_filter, handler)], qos)

    async def subscribe_many(
        self, subscriptions: Sequence[tuple[str, MessageHandler]], qos: int = 1
    ) -> None:
        """:meth:`subscribe` for several ``(topic_filter, handler)`` pairs at once: the new
        topic filters go to the broker together, in SUBSCRIBEs of at most
        :data:`MAX_FILTERS_PER_SUBSCRIBE` filters. Nothing is added when the connection
        would hold more than :data:`MAX_SUBSCRIPTIONS` filters; when the broker refuses a
        SUBSCRIBE, the handlers given here are removed again."""
        subs = self._subs
        stopped = self._started and (self._client is None or self._state.terminal)
        if stopped and any(f not in subs or not subs[f].acked for f, _ in subscriptions):
            raise SubscribeFailed("cannot subscribe: the connection is stopped")
        new = {f for f, _ in subscriptions if f not in subs}
        if len(subs) + len(new) > MAX_SUBSCRIPTIONS:
            raise SubscribeFailed(
                f"subscribing to {', '.join(sorted(new))} would give this connection "
                f"{len(subs) + len(new)} topic filters; the platform allows at most "
                f"{MAX_SUBSCRIPTIONS} per connection",
                "unsubscribe from topic filters no longer needed, or cover several topics "
                "with one wildcard filter",
            )
        added: list[tuple[_Subscription, MessageHandler]] = []
        to_send: list[_Subscription] = []
        for topic_filter, handler in subscriptions:
            sub = subs.get(topic_filter)
            if sub is None:
                sub = subs[topic_filter] = _Subscription(topic_filter, qos)
            sub.add(handler)
            added.append((sub, handler))
            if not sub.acked and sub not in to_send:
                to_send.append(sub)
        if not to_send or not self.connected:
            return  # made by _after_connect
        try:
            for i in range(0, len(to_send), MAX_FILTERS_PER_SUBSCRIBE):
                await self._send_subscribe(to_send[i : i + MAX_FILTERS_PER_SUBSCRIBE])
        except BaseException:
            for sub, handler in added:
                sub.remove(handler)
                if not sub.handlers and not sub.acked:
                    subs.pop(sub.topic_filter, None)
            raise

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
        sub = self._subs.get(topic_filter)
        if sub is None:
            return
        if handler is not None:
            sub.remove(handler)
            if sub.handlers:
                return
        self._subs.pop(topic_filter, None)
        sub.close()
        if self._client is None or not self.connected or max_wait_s <= 0:
            return
        try:
            crt_future = self._client.unsubscribe(mqtt5.UnsubscribePacket([topic_filter]))
        except Exception as exc:
            log.warning("unsubscribe %s failed: %s", topic_filter, _error_name(exc))
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
                "unsubscribe %s failed: %s", topic_filter, _error_name(unsuback.exception())
            )

    async def _send_subscribe(self, subs: list[_Subscription]) -> None:
        client = self._client
        if client is None:
            raise SubscribeFailed("cannot subscribe: the connection is stopped")
        packet = mqtt5.SubscribePacket(
            [mqtt5.Subscription(s.topic_filter, mqtt5.QoS(s.qos)) for s in subs]
        )
        filters = ", ".join(s.topic_filter for s in subs)
        try:
            suback = await asyncio.wrap_future(client.subscribe(packet))
        except Exception as exc:
            raise SubscribeFailed(f"subscribing to {filters} failed: {_error_name(exc)}") from None
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
            self._on_failure, _error_name(data.exception), int(code) if code is not None else None
        )

    def _crt_disconnection(self, data: mqtt5.LifecycleDisconnectData) -> None:
        packet = data.disconnect_packet
        code = getattr(packet, "reason_code", None)
        reason_code = int(code) if code is not None else None
        error_name = _error_name(data.exception)
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
        for sub in list(self._subs.values()):
            if topic_matches(sub.topic_filter, message.topic):
                sub.deliver(message)

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
        # A resumed session keeps the subscriptions it had; those made meanwhile (or before
        # the first connect, which may resume a session of an earlier run) are made now.
        subs = [s for s in self._subs.values() if not (session_present and s.acked)]
        if subs:
            for s in subs:
                s.acked = False
            for i in range(0, len(subs), MAX_FILTERS_PER_SUBSCRIBE):
                batch = subs[i : i + MAX_FILTERS_PER_SUBSCRIBE]
                try:
                    await self._send_subscribe(batch)
                except SubscribeFailed as exc:
                    self._counters.last_error = exc.reason
                    log.error("connection: resubscribing failed: %s", exc.reason)
            if subs:
                log.info("connection: resubscribed %d topic filter(s)", len(subs))
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
            and _fatal(failure, connack_code)
            and self._attempt.waiters
        ):
            for waiter in self._attempt.waiters:
                if not waiter.done():
                    waiter.set_exception(
                        ConnectionFailed(
                            failure.reason,
                            failure.hint or failure.next_step,
                            kind=failure.kind,
                            error_name=failure.error_name,
                            revoked=failure.revoked,
                        )
                    )
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
        settings = self.settings

        def probe() -> None:
            try:
                found = diagnose_tls(settings, 3.0)
            except Exception:  # a probe only: never let it take anything down
                log.debug("connection: TLS probe failed", exc_info=True)
                return
            if found is not None:
                self._post(self._on_diagnosis, found)

        threading.Thread(target=probe, name="iotref-tls-probe", daemon=True).start()

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
        task.add_done_callback(_log_task_error)

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
                    stream.push(_END)
            if state.terminal:
                streams.clear()


__all__ = [
    "ALPN_PROTOCOL",
    "Connection",
    "ConnectionClosed",
    "ConnectionEvent",
    "ConnectionFailed",
    "ConnectionSettings",
    "ConnectionState",
    "ConnectionStats",
    "ConnectionTakenOver",
    "IncomingMessage",
    "MqttError",
    "PublishCallback",
    "PublishFailed",
    "SubscribeFailed",
    "TakeoverDetector",
    "build_client_options",
    "build_tls_context",
    "describe_failure",
    "topic_matches",
]
