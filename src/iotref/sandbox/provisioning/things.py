"""The thing registry: every device the provisioning service certified (tables ``things_*``).

A thing is one provisioning result: its client id (= MQTT client id = thing name = the
certificate's CN), organization, site, certificate and whether it was revoked.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from dataclasses import dataclass
from typing import Any

from iotref.sandbox.database import Database

CLIENT_ID_PREFIX = "iotref-"
CLIENT_ID_PATTERN = "iotref-[0-9a-f]{20}"
_CLIENT_ID_RE = re.compile(f"^{CLIENT_ID_PATTERN}$")

_SCHEMA = [
    """
    CREATE TABLE IF NOT EXISTS things_things (
        client_id TEXT PRIMARY KEY,
        org_id TEXT NOT NULL,
        site_id TEXT NOT NULL,
        machine_id TEXT,
        certificate_pem TEXT NOT NULL,
        serial TEXT NOT NULL UNIQUE,
        not_after TEXT NOT NULL,
        created_at TEXT NOT NULL,
        revoked_at TEXT
    )
    """,
    "CREATE INDEX IF NOT EXISTS things_things_org ON things_things (org_id)",
]


def new_client_id() -> str:
    """A fresh client id: ``iotref-`` + 20 hex digits; safe in MQTT client ids and topics."""
    return CLIENT_ID_PREFIX + secrets.token_hex(10)


def is_client_id(value: str) -> bool:
    """Whether ``value`` has the form of a client id this registry hands out."""
    return bool(_CLIENT_ID_RE.fullmatch(value))


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _parse(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Thing:
    """One provisioned device."""

    client_id: str
    org_id: str
    site_id: str
    machine_id: str | None
    certificate_pem: str
    serial: int
    not_after: dt.datetime
    created_at: dt.datetime
    revoked_at: dt.datetime | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def to_json(self, *, with_certificate: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "clientId": self.client_id,
            "orgId": self.org_id,
            "siteId": self.site_id,
            "machineId": self.machine_id,
            "serial": format(self.serial, "x"),
            "notAfter": _iso(self.not_after),
            "createdAt": _iso(self.created_at),
            "revokedAt": _iso(self.revoked_at) if self.revoked_at else None,
        }
        if with_certificate:
            data["certificatePem"] = self.certificate_pem
        return data


def _row_to_thing(row: Any) -> Thing:
    return Thing(
        client_id=row["client_id"],
        org_id=row["org_id"],
        site_id=row["site_id"],
        machine_id=row["machine_id"],
        certificate_pem=row["certificate_pem"],
        serial=int(row["serial"], 16),
        not_after=_parse(row["not_after"]),
        created_at=_parse(row["created_at"]),
        revoked_at=_parse(row["revoked_at"]) if row["revoked_at"] else None,
    )


class ThingRegistry:
    """Things in the sandbox database."""

    def __init__(self, db: Database) -> None:
        self.db = db
        db.ensure_schema(_SCHEMA)

    @staticmethod
    def new_client_id() -> str:
        return new_client_id()

    def register(
        self,
        *,
        client_id: str,
        org_id: str,
        site_id: str,
        certificate_pem: str,
        serial: int,
        not_after: dt.datetime,
        machine_id: str | None = None,
        created_at: dt.datetime | None = None,
    ) -> Thing:
        """Insert a new thing; raises ``sqlite3.IntegrityError`` if the id is taken."""
        thing = Thing(
            client_id=client_id,
            org_id=org_id,
            site_id=site_id,
            machine_id=machine_id,
            certificate_pem=certificate_pem,
            serial=serial,
            not_after=not_after,
            created_at=created_at or dt.datetime.now(dt.timezone.utc).replace(microsecond=0),
        )
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO things_things (client_id, org_id, site_id, machine_id, "
                "certificate_pem, serial, not_after, created_at, revoked_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                (
                    thing.client_id,
                    thing.org_id,
                    thing.site_id,
                    thing.machine_id,
                    thing.certificate_pem,
                    format(thing.serial, "x"),
                    _iso(thing.not_after),
                    _iso(thing.created_at),
                ),
            )
        return thing

    def get(self, client_id: str) -> Thing | None:
        row = self.db.query_one("SELECT * FROM things_things WHERE client_id = ?", (client_id,))
        return _row_to_thing(row) if row is not None else None

    def policies(self) -> list[tuple[str, str, bool]]:
        """``(client_id, org_id, revoked)`` of every thing, oldest first: what the broker's
        policies are made of (no certificates read)."""
        rows = self.db.query_all(
            "SELECT client_id, org_id, revoked_at FROM things_things ORDER BY created_at, client_id"
        )
        return [(row["client_id"], row["org_id"], row["revoked_at"] is not None) for row in rows]

    def list(self, org_id: str | None = None) -> list[Thing]:
        if org_id is None:
            rows = self.db.query_all("SELECT * FROM things_things ORDER BY created_at, client_id")
        else:
            rows = self.db.query_all(
                "SELECT * FROM things_things WHERE org_id = ? ORDER BY created_at, client_id",
                (org_id,),
            )
        return [_row_to_thing(row) for row in rows]

    def count(self) -> int:
        row = self.db.query_one("SELECT COUNT(*) AS n FROM things_things")
        return int(row["n"]) if row is not None else 0

    def mark_revoked(self, client_id: str, when: dt.datetime | None = None) -> Thing | None:
        """Record the revocation (the first time only); ``None`` if there is no such thing."""
        stamp = _iso(when or dt.datetime.now(dt.timezone.utc))
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE things_things SET revoked_at = ? "
                "WHERE client_id = ? AND revoked_at IS NULL",
                (stamp, client_id),
            )
        return self.get(client_id)

    def set_machine_id(self, client_id: str, machine_id: str | None) -> Thing | None:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE things_things SET machine_id = ? WHERE client_id = ?",
                (machine_id, client_id),
            )
        return self.get(client_id)
