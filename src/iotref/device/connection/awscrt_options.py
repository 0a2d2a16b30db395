"""What the connection gives awscrt: the MQTT 5 client options, the socket options and
the mutual-TLS context built from :class:`ConnectionSettings`."""

from __future__ import annotations

from pathlib import Path

from awscrt import io, mqtt5

from iotref.device.connection.diagnostics import crt_error_name
from iotref.device.connection.errors import ConnectionFailed
from iotref.device.connection.settings import ALPN_PROTOCOL, ConnectionSettings


def build_client_options(settings: ConnectionSettings) -> mqtt5.ClientOptions:
    """awscrt client options for ``settings`` (without TLS context and callbacks), with
    awscrt's own reconnect loop: delays from ``min_backoff_s`` to ``max_backoff_s`` with
    full jitter, reset to the minimum only by a connection that lasted 30 s (awscrt's
    fixed default; :func:`supervised_client_options` is what the connection uses
    instead).

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
        socket_options=socket_options(settings),
        disable_metrics=True,
    )


def supervised_client_options(settings: ConnectionSettings) -> mqtt5.ClientOptions:
    """The options the connection gives awscrt: those of :func:`build_client_options`,
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


def socket_options(settings: ConnectionSettings) -> io.SocketOptions:
    """The connect timeout of ``settings``, and TCP keepalive."""
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
            f"cannot use the device certificate, key or CA file ({crt_error_name(exc)})",
            "check that the files are PEM and that the key belongs to the certificate",
            kind="config",
            error_name=crt_error_name(exc),
        ) from None
