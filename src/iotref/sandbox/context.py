"""What the sandbox's components share: settings, paths, the database, the admin token,
the addresses they serve on, and a small in-process event hub."""

from __future__ import annotations

import logging
import secrets
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iotref.protocol.limits import (
    DEFAULT_SESSION_EXPIRY_SECONDS,
    MAX_KEEPALIVE_SECONDS,
    MAX_PAYLOAD_BYTES,
)
from iotref.sandbox.database import Database
from iotref.sandbox.limits import SandboxLimits

log = logging.getLogger(__name__)

DEFAULT_HTTP_PORT = 8780
DEFAULT_MQTT_PORT = 8883
DEFAULT_DATA_DIR = Path(".sandbox")
LOOPBACK = "127.0.0.1"
MQTT_HOST = "localhost"

EventHandler = Callable[..., Awaitable[None] | None]

THING_REGISTERED = "thing_registered"
"""Event: provisioning registered a thing (``thing=`` the new
:class:`~iotref.sandbox.provisioning.things.Thing`)."""
INGESTION_SUBSCRIBED = "ingestion_subscribed"
"""Event: all the ingestion's connections subscribed (again)."""


@dataclass
class SandboxSettings:
    """What ``iotref sandbox up`` was asked for (ports may be 0: any free port)."""

    data_dir: Path = DEFAULT_DATA_DIR
    http_port: int = DEFAULT_HTTP_PORT
    mqtt_port: int = DEFAULT_MQTT_PORT
    platform_mqtt_port: int = 0
    auto_approve: bool = False
    access_token_ttl: int = 3600
    refresh_token_ttl: int = 7 * 24 * 3600
    device_code_ttl: int = 900
    poll_interval: int = 5
    telemetry_max_messages: int = 1_000_000  # stored telemetry messages kept; 0: no limit
    telemetry_max_age: int = 7 * 24 * 3600  # seconds a stored message is kept; 0: no limit
    max_payload_bytes: int = MAX_PAYLOAD_BYTES  # broker-enforced platform limits
    max_keepalive: int = MAX_KEEPALIVE_SECONDS
    session_expiry_hours: int = DEFAULT_SESSION_EXPIRY_SECONDS // 3600
    mosquitto_binary: str = "mosquitto"
    dynsec_plugin: str | None = None  # Mosquitto's dynamic-security plugin; None: search
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    """AWS IoT Core's per-device limits the sandbox applies (``sandbox up`` options)."""


@dataclass(frozen=True)
class SandboxPaths:
    """Files in the data dir."""

    data_dir: Path

    @property
    def database(self) -> Path:
        return self.data_dir / "sandbox.db"

    @property
    def ca_dir(self) -> Path:
        return self.data_dir / "ca"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def sandbox_json(self) -> Path:
        return self.data_dir / "sandbox.json"

    @property
    def env_file(self) -> Path:
        return self.data_dir / "env.local"

    @property
    def lock_file(self) -> Path:
        return self.data_dir / "sandbox.lock"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"


class EventHub:
    """In-process events between components, e.g. :data:`THING_REGISTERED` from
    provisioning to the shadow service. Handlers may be sync or async; errors are logged,
    not raised."""

    def __init__(self) -> None:
        self._handlers: dict[str, list[EventHandler]] = defaultdict(list)

    def subscribe(self, event: str, handler: EventHandler) -> None:
        self._handlers[event].append(handler)

    async def emit(self, event: str, **payload: Any) -> None:
        for handler in list(self._handlers[event]):
            try:
                result = handler(**payload)
                if result is not None:
                    await result
            except Exception:
                log.exception("handler for event %s failed", event)


@dataclass
class SandboxContext:
    """Shared by every component of one running sandbox."""

    settings: SandboxSettings
    db: Database
    admin_token: str
    #: This sandbox's identity, made with its database: a new data dir is a new sandbox,
    #: even on the same ports. Written into ``env.local`` and served by ``/healthz``.
    sandbox_id: str = ""
    events: EventHub = field(default_factory=EventHub)
    http_url: str = ""
    mqtt_host: str = MQTT_HOST
    mqtt_port: int = 0
    platform_mqtt_port: int = 0

    @property
    def paths(self) -> SandboxPaths:
        return SandboxPaths(self.settings.data_dir)

    @classmethod
    def open(cls, settings: SandboxSettings) -> SandboxContext:
        """Open (or create) the data dir's database, admin token and sandbox id."""
        paths = SandboxPaths(settings.data_dir)
        paths.data_dir.mkdir(parents=True, exist_ok=True)
        db = Database(paths.database)
        db.ensure_schema(
            ["CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)"]
        )
        token = _setting(db, "admin_token", lambda: secrets.token_urlsafe(32))
        sandbox_id = _setting(db, "sandbox_id", lambda: secrets.token_hex(8))
        return cls(settings=settings, db=db, admin_token=token, sandbox_id=sandbox_id)

    def check_admin(self, authorization: str | None) -> bool:
        """Whether an ``Authorization: Bearer ...`` header carries the admin token."""
        if not authorization:
            return False
        scheme, _, value = authorization.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(
            value.strip().encode(), self.admin_token.encode()
        )


def _setting(db: Database, key: str, make: Callable[[], str]) -> str:
    """The ``settings`` row ``key``, made with ``make()`` the first time."""
    row = db.query_one("SELECT value FROM settings WHERE key = ?", (key,))
    if row is not None:
        return str(row["value"])
    value = make()
    db.execute("INSERT INTO settings (key, value) VALUES (?, ?)", (key, value))
    return value
