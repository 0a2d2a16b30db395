"""Where and how the device connects: :class:`ConnectionSettings`, and reading them from
a certificate store (contract section 5)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iotref.device.errors import StoreError
from iotref.protocol import limits

ALPN_PROTOCOL = "x-amzn-mqtt-ca"
"""ALPN protocol name with which AWS IoT Core accepts MQTT with client certificates on 443."""

STORE_PROPERTIES = "properties.json"
STORE_CERT = "deviceCert.pem"
STORE_KEY = "devicePrivateKey.pem"
STORE_CA = "amazonRootCA1.pem"


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
    """On the first connect of
    :meth:`~iotref.device.connection.connection.Connection.start`, give up at once on
    errors that retrying cannot fix (TLS handshake failures, CONNACK not authorized /
    banned / bad client id) instead of retrying until ``connect_timeout_s``. After the
    first success the connection never gives up."""
    ping_timeout_s: float = 10.0
    publish_rate_limit: float | None = float(limits.PUBLISH_REQUESTS_PER_SECOND_PER_CONNECTION)
    """The platform's quota of publishes a second on this connection, which every publish
    is paced to stay under
    (:class:`~iotref.device.connection.rate_limit.PublishLimiter`); ``None`` or 0: not
    paced."""
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
