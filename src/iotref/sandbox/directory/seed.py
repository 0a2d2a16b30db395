"""The directory's seed data: the demo person, two organizations with their sites and the
OAuth app whose client id goes into ``env.local``.

Every id is a fixed UUID so that a fresh data dir always holds the same records. The
directory writes these on its first start only (see :func:`seed_directory`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from iotref.sandbox.database import Database

OAUTH_CLIENT_ID = "5c1e0b1a-7f3d-4e2a-9b6c-0d1a2e3f4b5c"
OAUTH_APP_NAME = "iotref device client"

DEMO_PERSON_ID = "9a3c1f6e-2b4d-4c8a-8e1f-3d5b7a9c0e21"
DEMO_EMAIL = "demo@iotref.local"
DEMO_PASSWORD = "demo"
DEMO_FIRST_NAME = "Dana"
DEMO_LAST_NAME = "Demo"

FIRST_ORGANIZATION_ID = "b7e2d4c6-1a3f-4b5d-9c7e-8f0a2b4c6d81"
FIRST_ORGANIZATION_NAME = "Demo Print Works"
SECOND_ORGANIZATION_ID = "c8f3e5d7-2b4a-4c6e-8d9f-9a1b3c5d7e92"
SECOND_ORGANIZATION_NAME = "Second Demo Press"

FIRST_SITE_ID = "d1a2b3c4-5e6f-4a7b-8c9d-0e1f2a3b4c01"
SECOND_SITE_ID = "d1a2b3c4-5e6f-4a7b-8c9d-0e1f2a3b4c02"
THIRD_SITE_ID = "d1a2b3c4-5e6f-4a7b-8c9d-0e1f2a3b4c03"

#: Scopes the seeded OAuth app may ask for. ``Org.`` scopes make an Organization bearer.
OAUTH_APP_SCOPES = (
    "Org.prinect.onprem.r",
    "Org.prinect.onprem.rw",
    "Org.directory.machines.r",
    "Org.directory.machines.rw",
    "Org.directory.organization.r",
    "Org.directory.organization_members.r",
    "directory.person.r",
    "directory.machines.r",
    "directory.machines.rw",
    "prinect.onprem.r",
    "prinect.onprem.rw",
)

SEED_VERSION = "1"
# A fixed point in time for the seeded records' created_at/updated_at.
SEED_TIME = 1_735_689_600.0  # 2025-01-01T00:00:00Z

_PBKDF2_ROUNDS = 200_000


@dataclass(frozen=True)
class SeedSite:
    id: str
    organization_id: str
    name: str


@dataclass(frozen=True)
class SeedOrganization:
    id: str
    name: str


ORGANIZATIONS = (
    SeedOrganization(FIRST_ORGANIZATION_ID, FIRST_ORGANIZATION_NAME),
    SeedOrganization(SECOND_ORGANIZATION_ID, SECOND_ORGANIZATION_NAME),
)
SITES = (
    SeedSite(FIRST_SITE_ID, FIRST_ORGANIZATION_ID, "Main Plant"),
    SeedSite(SECOND_SITE_ID, FIRST_ORGANIZATION_ID, "Finishing Hall"),
    SeedSite(THIRD_SITE_ID, SECOND_ORGANIZATION_ID, "Harbour Works"),
)
MEMBERSHIPS = (
    # (membership id, organization id, roles)
    ("e1f2a3b4-c5d6-4e7f-8a9b-0c1d2e3f4a01", FIRST_ORGANIZATION_ID, "owner"),
    ("e1f2a3b4-c5d6-4e7f-8a9b-0c1d2e3f4a02", SECOND_ORGANIZATION_ID, "admin"),
)


def hash_password(password: str, salt: bytes | None = None) -> str:
    """``pbkdf2_sha256$rounds$salt_hex$hash_hex``."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, _PBKDF2_ROUNDS)
    return f"pbkdf2_sha256${_PBKDF2_ROUNDS}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        algorithm, rounds, salt_hex, digest_hex = stored.split("$")
        if algorithm != "pbkdf2_sha256":
            return False
        digest = hashlib.pbkdf2_hmac(
            "sha256", password.encode(), bytes.fromhex(salt_hex), int(rounds)
        )
    except ValueError:
        return False
    return hmac.compare_digest(digest.hex(), digest_hex)


def seed_directory(db: Database) -> bool:
    """Write the seed records unless this data dir was seeded before; True if it wrote."""
    with db.transaction() as conn:
        done = conn.execute(
            "SELECT value FROM directory_meta WHERE key = 'seed_version'"
        ).fetchone()
        if done is not None:
            return False
        t = SEED_TIME
        conn.execute(
            "INSERT OR IGNORE INTO directory_people (id, email, first_name, name, "
            "password_hash, locale, time_zone, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, 'en', 'UTC', ?, ?)",
            (
                DEMO_PERSON_ID,
                DEMO_EMAIL,
                DEMO_FIRST_NAME,
                DEMO_LAST_NAME,
                hash_password(DEMO_PASSWORD),
                t,
                t,
            ),
        )
        for org in ORGANIZATIONS:
            conn.execute(
                "INSERT OR IGNORE INTO directory_organizations (id, name, created_at, updated_at)"
                " VALUES (?, ?, ?, ?)",
                (org.id, org.name, t, t),
            )
        for site in SITES:
            conn.execute(
                "INSERT OR IGNORE INTO directory_sites "
                "(id, organization_id, name, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                (site.id, site.organization_id, site.name, t, t),
            )
        for membership_id, org_id, roles in MEMBERSHIPS:
            conn.execute(
                "INSERT OR IGNORE INTO directory_memberships "
                "(id, person_id, organization_id, roles, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (membership_id, DEMO_PERSON_ID, org_id, roles, t, t),
            )
        conn.execute(
            "INSERT OR IGNORE INTO directory_oauth_apps (client_id, name, scopes, created_at) "
            "VALUES (?, ?, ?, ?)",
            (OAUTH_CLIENT_ID, OAUTH_APP_NAME, ",".join(OAUTH_APP_SCOPES), t),
        )
        conn.execute(
            "INSERT INTO directory_meta (key, value) VALUES ('seed_version', ?)", (SEED_VERSION,)
        )
    return True
