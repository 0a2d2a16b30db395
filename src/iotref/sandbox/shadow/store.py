"""SQLite persistence of device shadows (tables ``shadow_*`` in the sandbox database).

One row per (thing, shadow name); the classic shadow has the empty name. A deleted shadow
keeps its row as a tombstone (``deleted_at``) so that a shadow re-created within 48 hours
continues its version numbers, as AWS IoT does. The sandbox's AWS credentials for the
REST data plane live here too.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass

from iotref.protocol.shadow_document import DELETED_VERSION_MEMORY_SECONDS, ShadowDocument
from iotref.sandbox.database import Database

_SCHEMA = [
    """
    CREATE TABLE IF NOT EXISTS shadow_documents (
        thing_name TEXT NOT NULL,
        shadow_name TEXT NOT NULL,
        state TEXT NOT NULL,
        metadata TEXT NOT NULL,
        version INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        deleted_at INTEGER,
        PRIMARY KEY (thing_name, shadow_name)
    )
    """,
    "CREATE TABLE IF NOT EXISTS shadow_settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
]


@dataclass(frozen=True)
class AwsCredentials:
    """An access key id and secret the sandbox accepts for Signature V4."""

    access_key_id: str
    secret_access_key: str


class ShadowStore:
    """Shadow documents by (thing name, shadow name or ``None`` for the classic shadow)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        db.ensure_schema(_SCHEMA)

    @staticmethod
    def _key(shadow_name: str | None) -> str:
        return shadow_name or ""

    def get(self, thing_name: str, shadow_name: str | None) -> ShadowDocument | None:
        """The live document, or ``None`` if there is none (never created or deleted)."""
        row = self.db.query_one(
            "SELECT state, metadata, version FROM shadow_documents "
            "WHERE thing_name = ? AND shadow_name = ? AND deleted_at IS NULL",
            (thing_name, self._key(shadow_name)),
        )
        if row is None:
            return None
        return ShadowDocument(json.loads(row["state"]), json.loads(row["metadata"]), row["version"])

    def base_version(self, thing_name: str, shadow_name: str | None, now: int) -> int:
        """The version a new shadow continues from: a recently deleted one's, else 0."""
        row = self.db.query_one(
            "SELECT version, deleted_at FROM shadow_documents "
            "WHERE thing_name = ? AND shadow_name = ? AND deleted_at IS NOT NULL",
            (thing_name, self._key(shadow_name)),
        )
        if row is None or now - int(row["deleted_at"]) > DELETED_VERSION_MEMORY_SECONDS:
            return 0
        return int(row["version"])

    def put(
        self, thing_name: str, shadow_name: str | None, document: ShadowDocument, now: int
    ) -> None:
        self.db.execute(
            "INSERT INTO shadow_documents "
            "(thing_name, shadow_name, state, metadata, version, updated_at, deleted_at) "
            "VALUES (?, ?, ?, ?, ?, ?, NULL) "
            "ON CONFLICT (thing_name, shadow_name) DO UPDATE SET state = excluded.state, "
            "metadata = excluded.metadata, version = excluded.version, "
            "updated_at = excluded.updated_at, deleted_at = NULL",
            (
                thing_name,
                self._key(shadow_name),
                json.dumps(document.state, separators=(",", ":")),
                json.dumps(document.metadata, separators=(",", ":")),
                document.version,
                now,
            ),
        )

    def delete(self, thing_name: str, shadow_name: str | None, now: int) -> None:
        """Turn the document into a tombstone that remembers its version."""
        self.db.execute(
            "UPDATE shadow_documents SET state = '{}', metadata = '{}', deleted_at = ? "
            "WHERE thing_name = ? AND shadow_name = ? AND deleted_at IS NULL",
            (now, thing_name, self._key(shadow_name)),
        )

    def named_shadows(self, thing_name: str) -> list[str]:
        """Names of the thing's live named shadows, sorted."""
        rows = self.db.query_all(
            "SELECT shadow_name FROM shadow_documents WHERE thing_name = ? "
            "AND shadow_name != '' AND deleted_at IS NULL ORDER BY shadow_name",
            (thing_name,),
        )
        return [str(row["shadow_name"]) for row in rows]

    def credentials(self) -> AwsCredentials:
        """The sandbox's access key (created on first use and kept in the database)."""
        with self.db.transaction() as conn:
            rows = dict(
                conn.execute(
                    "SELECT key, value FROM shadow_settings "
                    "WHERE key IN ('aws_access_key_id', 'aws_secret_access_key')"
                ).fetchall()
            )
            if len(rows) == 2:
                return AwsCredentials(rows["aws_access_key_id"], rows["aws_secret_access_key"])
            alphabet = string.ascii_uppercase + string.digits
            key_id = "AKIA" + "".join(secrets.choice(alphabet) for _ in range(16))
            secret = secrets.token_urlsafe(30)[:40]
            conn.executemany(
                "INSERT OR REPLACE INTO shadow_settings (key, value) VALUES (?, ?)",
                [("aws_access_key_id", key_id), ("aws_secret_access_key", secret)],
            )
            return AwsCredentials(key_id, secret)
