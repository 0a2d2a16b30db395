"""The receiving connections' settings and awscrt options: mutual TLS with the platform
identity, persistent sessions rejoined on every connect, a bounded Receive Maximum."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from awscrt import io, mqtt5

SESSION_EXPIRY_SECONDS = 3600  # as a device's: the broker queues for a while, not forever
KEEPALIVE_SECONDS = 30
RECEIVE_MAXIMUM = 200  # unacknowledged messages per connection (docs/architecture.md)
EVENT_LOOP_THREADS = 1  # the callbacks take turns on the GIL anyway; one thread, no contention
RECONNECT_MIN_SECONDS = 0.1
RECONNECT_MAX_SECONDS = 2.0


@dataclass(frozen=True)
class ReceiverSettings:
    """What the receiving process needs (plain values: it is pickled to the child)."""

    host: str
    port: int
    ca_path: str
    cert_path: str
    key_path: str
    topic_filter: str
    client_ids: tuple[str, ...]
    receive_maximum: int = RECEIVE_MAXIMUM
    keepalive: int = KEEPALIVE_SECONDS
    event_loop_threads: int = EVENT_LOOP_THREADS


def tls_context(settings: ReceiverSettings) -> io.ClientTlsContext:
    """Mutual TLS with the platform identity; only the sandbox's root CA is trusted."""
    options = io.TlsContextOptions.create_client_with_mtls_from_path(
        settings.cert_path, settings.key_path
    )
    options.override_default_trust_store_from_path(None, settings.ca_path)
    options.min_tls_ver = io.TlsVersion.TLSv1_2
    options.verify_peer = True
    return io.ClientTlsContext(options)


def client_options(
    settings: ReceiverSettings,
    client_id: str,
    tls: io.ClientTlsContext | None,
    bootstrap: io.ClientBootstrap | None = None,
) -> mqtt5.ClientOptions:
    """awscrt options of one receiving connection (callbacks are added by the caller)."""
    return mqtt5.ClientOptions(
        host_name=settings.host,
        port=settings.port,
        bootstrap=bootstrap,
        tls_ctx=tls,
        connect_options=mqtt5.ConnectPacket(
            client_id=client_id,
            keep_alive_interval_sec=settings.keepalive,
            session_expiry_interval_sec=SESSION_EXPIRY_SECONDS,
            receive_maximum=settings.receive_maximum,
        ),
        # Rejoin the session on every connect, also the first of a new receiving process.
        session_behavior=mqtt5.ClientSessionBehaviorType.REJOIN_ALWAYS,
        # Mosquitto, not AWS IoT Core: no IoT Core throughput and size limits client-side.
        extended_validation_and_flow_control_options=(
            mqtt5.ExtendedValidationAndFlowControlOptions.NONE
        ),
        offline_queue_behavior=mqtt5.ClientOperationQueueBehaviorType.FAIL_ALL_ON_DISCONNECT,
        min_reconnect_delay_ms=round(RECONNECT_MIN_SECONDS * 1000),
        max_reconnect_delay_ms=round(RECONNECT_MAX_SECONDS * 1000),
        connack_timeout_ms=10_000,
        ack_timeout_sec=10,
        disable_metrics=True,
    )


def subscription_granted(suback: Any) -> bool:
    codes = list(getattr(suback, "reason_codes", None) or [])
    return bool(codes) and all(int(code) < 0x80 for code in codes)
