"""The directory's records: people, organizations, memberships, sites, the OAuth app,
machines and machine ownerships (the ``directory_*`` tables), seeded on first use
(:mod:`~iotref.sandbox.directory.seed`), and the queries the directory's parts share.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from iotref.sandbox.database import Database
from iotref.sandbox.directory.device_authorization import iso_time
from iotref.sandbox.directory.seed import check_password, seed_directory

log = logging.getLogger(__name__)

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS directory_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS directory_people (
        id TEXT PRIMARY KEY,
        email TEXT NOT NULL UNIQUE COLLATE NOCASE,
        first_name TEXT NOT NULL,
        name TEXT NOT NULL,
        password_hash TEXT NOT NULL,
        locale TEXT NOT NULL,
        time_zone TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS directory_organizations (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS directory_memberships (
        id TEXT PRIMARY KEY,
        person_id TEXT NOT NULL REFERENCES directory_people (id),
        organization_id TEXT NOT NULL REFERENCES directory_organizations (id),
        roles TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        UNIQUE (person_id, organization_id)
    )""",
    """CREATE TABLE IF NOT EXISTS directory_sites (
        id TEXT PRIMARY KEY,
        organization_id TEXT NOT NULL REFERENCES directory_organizations (id),
        name TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS directory_oauth_apps (
        client_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        scopes TEXT NOT NULL,
        created_at REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS directory_machines (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        manufacturer TEXT NOT NULL,
        serial_number TEXT NOT NULL,
        kind TEXT,
        site_id TEXT,
        created_by_organization_id TEXT,
        created_by_person_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        UNIQUE (manufacturer, serial_number)
    )""",
    """CREATE TABLE IF NOT EXISTS directory_machine_ownerships (
        id TEXT PRIMARY KEY,
        machine_id TEXT NOT NULL REFERENCES directory_machines (id),
        organization_id TEXT NOT NULL REFERENCES directory_organizations (id),
        site_id TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        terminated_at REAL
    )""",
    "CREATE INDEX IF NOT EXISTS directory_machine_ownerships_machine "
    "ON directory_machine_ownerships (machine_id)",
]


@dataclass(frozen=True)
class Site:
    """A site (location) of an organization."""

    id: str
    name: str
    organization_id: str
    organization_name: str


@dataclass(frozen=True)
class Organization:
    """An organization, as the verification page and ``/api/v1/organization`` show it."""

    id: str
    name: str
    created_at: float
    updated_at: float


class DirectoryRecords:
    """The ``directory_*`` tables of one database; see the module docstring."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock
        db.ensure_schema(SCHEMA)
        if seed_directory(db):
            log.info("directory seeded with the demo person and organizations")

    # -- sites ------------------------------------------------------------------------------

    def site(self, site_id: str) -> Site | None:
        row = self.db.query_one(
            "SELECT s.id, s.name, s.organization_id, o.name AS organization_name "
            "FROM directory_sites s JOIN directory_organizations o ON o.id = s.organization_id "
            "WHERE s.id = ?",
            (site_id,),
        )
        return _site(row) if row is not None else None

    def sites_of(self, organization_id: str) -> list[Site]:
        rows = self.db.query_all(
            "SELECT s.id, s.name, s.organization_id, o.name AS organization_name "
            "FROM directory_sites s JOIN directory_organizations o ON o.id = s.organization_id "
            "WHERE s.organization_id = ? ORDER BY s.created_at, s.id",
            (organization_id,),
        )
        return [_site(row) for row in rows]

    # -- people and organizations -----------------------------------------------------------

    def organization(self, organization_id: str) -> Organization | None:
        row = self.db.query_one(
            "SELECT id, name, created_at, updated_at FROM directory_organizations WHERE id = ?",
            (organization_id,),
        )
        if row is None:
            return None
        return Organization(
            str(row["id"]), str(row["name"]), float(row["created_at"]), float(row["updated_at"])
        )

    def organizations_of(self, person_id: str) -> list[Organization]:
        """The person's organizations, the first (seeded) one first."""
        rows = self.db.query_all(
            "SELECT o.id, o.name, o.created_at, o.updated_at FROM directory_organizations o "
            "JOIN directory_memberships m ON m.organization_id = o.id "
            "WHERE m.person_id = ? ORDER BY m.created_at, m.id",
            (person_id,),
        )
        return [
            Organization(
                str(r["id"]), str(r["name"]), float(r["created_at"]), float(r["updated_at"])
            )
            for r in rows
        ]

    def is_member(self, person_id: str, organization_id: str) -> bool:
        return (
            self.db.query_one(
                "SELECT 1 FROM directory_memberships WHERE person_id = ? AND organization_id = ?",
                (person_id, organization_id),
            )
            is not None
        )

    def person_row(self, person_id: str) -> sqlite3.Row | None:
        return self.db.query_one("SELECT * FROM directory_people WHERE id = ?", (person_id,))

    def check_login(self, email: str, password: str) -> str | None:
        """The person id for a correct email + password, else None."""
        row = self.db.query_one(
            "SELECT id, password_hash FROM directory_people WHERE email = ?", (email.strip(),)
        )
        if row is None or not check_password(password, str(row["password_hash"])):
            return None
        return str(row["id"])

    def person_json(self, person_id: str) -> dict[str, Any] | None:
        """The person as ``GET /person`` shows it, with organization memberships."""
        row = self.person_row(person_id)
        if row is None:
            return None
        memberships = self.db.query_all(
            "SELECT m.id, m.roles, m.created_at, m.updated_at, o.id AS org_id, "
            "o.name AS org_name, o.created_at AS org_created_at, o.updated_at AS org_updated_at "
            "FROM directory_memberships m JOIN directory_organizations o "
            "ON o.id = m.organization_id WHERE m.person_id = ? ORDER BY m.created_at, m.id",
            (person_id,),
        )
        return {
            "id": str(row["id"]),
            "first_name": str(row["first_name"]),
            "name": str(row["name"]),
            "full_name": f"{row['first_name']} {row['name']}",
            "email": str(row["email"]),
            "locale": str(row["locale"]),
            "time_zone": str(row["time_zone"]),
            "avatar_url": "",
            "created_at": iso_time(float(row["created_at"])),
            "updated_at": iso_time(float(row["updated_at"])),
            "organization_memberships": [
                {
                    "id": str(m["id"]),
                    "roles": [r for r in str(m["roles"]).split(",") if r],
                    "created_at": iso_time(float(m["created_at"])),
                    "updated_at": iso_time(float(m["updated_at"])),
                    "organization": {
                        "id": str(m["org_id"]),
                        "name": str(m["org_name"]),
                        "created_at": iso_time(float(m["org_created_at"])),
                        "updated_at": iso_time(float(m["org_updated_at"])),
                    },
                }
                for m in memberships
            ],
        }


def _site(row: sqlite3.Row) -> Site:
    return Site(
        id=str(row["id"]),
        name=str(row["name"]),
        organization_id=str(row["organization_id"]),
        organization_name=str(row["organization_name"]),
    )
