"""The directory's ``/api/v1`` JSON API (contract section 3): person, organization, sites,
machines and machine ownerships, behind bearer tokens and scopes.

Answers follow the schemas of ``zaikio-directory-v1.openapi.yaml``. Fields the schema types
as plain strings are left out rather than sent as ``null`` (``kind`` of a machine created
without one, ``terminated_at`` of an active ownership).
"""

from __future__ import annotations

import sqlite3
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from iotref.sandbox.directory.device_authorization import (
    ORGANIZATION,
    AccessGrant,
    OAuthServer,
    iso_time,
)
from iotref.sandbox.directory.records import DirectoryRecords, Site
from iotref.sandbox.http_errors import ApiError, read_form_or_json, read_json_object

MACHINE_KINDS = ("offset_press", "digital_press", "folder")
MAX_FIELD_LENGTH = 255
READ_MACHINES = "directory.machines.r"
WRITE_MACHINES = "directory.machines.rw"
READ_ORGANIZATION = "directory.organization.r"
READ_PERSON = "directory.person.r"


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


def _validation(errors: dict[str, list[str]]) -> ApiError:
    return ApiError(422, "unprocessable_entity", body={"errors": errors})


def _require_scope(grant: AccessGrant, *scopes: str) -> None:
    if not any(grant.has_scope(scope) for scope in scopes):
        raise ApiError(403, "insufficient_scope", f"needs scope {' or '.join(scopes)}")


def machine_json(row: sqlite3.Row) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": str(row["id"]),
        "name": str(row["name"]),
        "manufacturer": str(row["manufacturer"]),
        "serial_number": str(row["serial_number"]),
    }
    if row["kind"] is not None:
        body["kind"] = str(row["kind"])
    body["created_at"] = iso_time(float(row["created_at"]))
    body["updated_at"] = iso_time(float(row["updated_at"]))
    return body


def ownership_json(row: sqlite3.Row) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": str(row["id"]),
        "machine_id": str(row["machine_id"]),
        "organization_id": str(row["organization_id"]),
        "created_at": iso_time(float(row["created_at"])),
        "updated_at": iso_time(float(row["updated_at"])),
    }
    if row["terminated_at"] is not None:
        body["terminated_at"] = iso_time(float(row["terminated_at"]))
    return body


def site_json(site: Site) -> dict[str, Any]:
    return {
        "id": site.id,
        "name": site.name,
        "organization": {"id": site.organization_id, "name": site.organization_name},
    }


class DirectoryApi:
    """The ``/api/v1`` routes over the directory's records, for the bearers of the tokens
    that ``oauth`` issued."""

    def __init__(self, records: DirectoryRecords, oauth: OAuthServer) -> None:
        self.records = records
        self.oauth = oauth
        self.db = records.db

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/api/v1/person", self._person, methods=["GET"]),
            Route("/api/v1/person/organization_memberships", self._memberships, methods=["GET"]),
            Route("/api/v1/organization", self._organization, methods=["GET"]),
            Route("/api/v1/sites", self._sites, methods=["GET"]),
            Route("/api/v1/machines", self._create_machine, methods=["POST"]),
            Route("/api/v1/machines/{machine_id}", self._machine, methods=["GET"]),
            Route(
                "/api/v1/machines/{machine_id}/machine_ownership",
                self._ownership,
                methods=["GET", "POST"],
            ),
        ]

    # -- authentication ---------------------------------------------------------------------

    def _grant(self, request: Request) -> AccessGrant:
        header = request.headers.get("authorization")
        if not header:
            raise ApiError(
                401,
                "unauthorized",
                "a bearer token is required",
                headers={"WWW-Authenticate": 'Bearer realm="directory"'},
            )
        grant = self.oauth.authenticate(header)
        if grant is None:
            raise ApiError(
                401,
                "invalid_token",
                "the access token is invalid, revoked or expired",
                headers={"WWW-Authenticate": 'Bearer realm="directory", error="invalid_token"'},
            )
        return grant

    def _organization_ids(self, grant: AccessGrant) -> list[str]:
        """The organizations a bearer acts for: its own, or all of a person's."""
        if grant.bearer_type == ORGANIZATION:
            return [grant.organization_id] if grant.organization_id else []
        return [org.id for org in self.records.organizations_of(grant.person_id)]

    # -- person and organization ------------------------------------------------------------

    async def _person(self, request: Request) -> Response:
        grant = self._grant(request)
        if grant.bearer_type == ORGANIZATION:
            raise ApiError(403, "forbidden", "needs a Person bearer")
        _require_scope(grant, READ_PERSON)
        person = self.records.person_json(grant.person_id)
        if person is None:
            raise _not_found("person")
        return JSONResponse(person)

    async def _memberships(self, request: Request) -> Response:
        grant = self._grant(request)
        if grant.bearer_type == ORGANIZATION:
            raise ApiError(403, "forbidden", "needs a Person bearer")
        _require_scope(grant, READ_PERSON)
        person = self.records.person_json(grant.person_id)
        if person is None:
            raise _not_found("person")
        return JSONResponse(person["organization_memberships"])

    async def _organization(self, request: Request) -> Response:
        grant = self._grant(request)
        if grant.bearer_type != ORGANIZATION or grant.organization_id is None:
            raise ApiError(403, "forbidden", "needs an Organization bearer")
        _require_scope(grant, READ_ORGANIZATION, READ_MACHINES)
        org = self.records.organization(grant.organization_id)
        if org is None:
            raise _not_found("organization")
        return JSONResponse(
            {
                "id": org.id,
                "name": org.name,
                "created_at": iso_time(org.created_at),
                "updated_at": iso_time(org.updated_at),
            }
        )

    async def _sites(self, request: Request) -> Response:
        grant = self._grant(request)
        _require_scope(grant, READ_MACHINES)
        sites = [
            site_json(site)
            for org_id in self._organization_ids(grant)
            for site in self.records.sites_of(org_id)
        ]
        return JSONResponse(sites)

    # -- machines ---------------------------------------------------------------------------

    async def _machine_params(self, request: Request) -> dict[str, str]:
        """``machine[field]`` parameters from the query, a form, or JSON (flat or nested
        under ``"machine"``)."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return await read_form_or_json(request)
        params: dict[str, str] = dict(request.query_params)
        body = await read_json_object(request)
        nested = body.get("machine")
        flat = {f"machine[{k}]": v for k, v in nested.items()} if isinstance(nested, dict) else {}
        for key, value in {**body, **flat}.items():
            if isinstance(value, str):
                params[key] = value
            elif isinstance(value, int | float) and not isinstance(value, bool):
                params[key] = str(value)
        return params

    def _site_for(self, site_id: str, organization_ids: list[str]) -> bool:
        """Whether ``site_id`` names a site of one of ``organization_ids``."""
        site: Site | None = self.records.site(site_id) if _is_uuid(site_id) else None
        return site is not None and site.organization_id in organization_ids

    async def _create_machine(self, request: Request) -> Response:
        grant = self._grant(request)
        _require_scope(grant, WRITE_MACHINES)
        params = await self._machine_params(request)
        errors: dict[str, list[str]] = {}
        values: dict[str, str] = {}
        for field in ("name", "manufacturer", "serial_number"):
            raw = params.get(f"machine[{field}]", "")
            value = raw.strip()
            if not value:
                errors.setdefault(field, []).append("can't be blank")
            elif len(raw) > MAX_FIELD_LENGTH:
                errors.setdefault(field, []).append(
                    f"is too long (maximum is {MAX_FIELD_LENGTH} characters)"
                )
            values[field] = value
        # An empty optional field is one not given (as a form sends it).
        kind = params.get("machine[kind]") or None
        if kind is not None and kind not in MACHINE_KINDS:
            errors["kind"] = ["is not included in the list"]
        site_id = params.get("machine[site_id]") or None
        if site_id is not None and not self._site_for(site_id, self._organization_ids(grant)):
            errors["site_id"] = ["is not a site of this organization"]
        machine_id = str(uuid.uuid4())
        now = self.records.clock()
        try:
            with self.db.transaction() as conn:
                taken = conn.execute(
                    "SELECT 1 FROM directory_machines WHERE manufacturer = ? AND serial_number = ?",
                    (values["manufacturer"], values["serial_number"]),
                ).fetchone()
                if taken is not None and "serial_number" not in errors:
                    errors["serial_number"] = ["has already been taken"]
                if errors:
                    raise _validation(errors)
                conn.execute(
                    "INSERT INTO directory_machines (id, name, manufacturer, serial_number, kind, "
                    "site_id, created_by_organization_id, created_by_person_id, created_at, "
                    "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        machine_id,
                        values["name"],
                        values["manufacturer"],
                        values["serial_number"],
                        kind,
                        site_id,
                        grant.organization_id if grant.bearer_type == ORGANIZATION else None,
                        grant.person_id,
                        now,
                        now,
                    ),
                )
        except sqlite3.IntegrityError as exc:  # a concurrent create won the race
            raise _validation({"serial_number": ["has already been taken"]}) from exc
        row = self._machine_row(machine_id)
        assert row is not None
        return JSONResponse(
            machine_json(row),
            status_code=201,
            headers={"Location": f"/api/v1/machines/{machine_id}"},
        )

    def _machine_row(self, machine_id: str) -> sqlite3.Row | None:
        if not _is_uuid(machine_id):
            return None
        return self.db.query_one("SELECT * FROM directory_machines WHERE id = ?", (machine_id,))

    def _visible(self, grant: AccessGrant, machine: sqlite3.Row) -> bool:
        """Whether the bearer made the machine or one of its organizations owns it."""
        organization_ids = self._organization_ids(grant)
        if machine["created_by_organization_id"] in organization_ids:
            return True
        if grant.bearer_type != ORGANIZATION and machine["created_by_person_id"] == (
            grant.person_id
        ):
            return True
        return self._active_ownership(str(machine["id"]), organization_ids) is not None

    def _active_ownership(
        self, machine_id: str, organization_ids: list[str] | None = None
    ) -> sqlite3.Row | None:
        rows = self.db.query_all(
            "SELECT * FROM directory_machine_ownerships WHERE machine_id = ? "
            "AND terminated_at IS NULL ORDER BY created_at DESC",
            (machine_id,),
        )
        for row in rows:
            if organization_ids is None or row["organization_id"] in organization_ids:
                return row
        return None

    async def _machine(self, request: Request) -> Response:
        grant = self._grant(request)
        _require_scope(grant, READ_MACHINES)
        machine = self._machine_row(request.path_params["machine_id"])
        if machine is None or not self._visible(grant, machine):
            raise _not_found("machine")
        return JSONResponse(machine_json(machine))

    async def _ownership(self, request: Request) -> Response:
        grant = self._grant(request)
        if request.method == "GET":
            _require_scope(grant, READ_MACHINES)
            machine = self._machine_row(request.path_params["machine_id"])
            if machine is None or not self._visible(grant, machine):
                raise _not_found("machine")
            ownership = self._active_ownership(str(machine["id"]))
            if ownership is None:
                raise _not_found("machine ownership")
            return JSONResponse(ownership_json(ownership))
        _require_scope(grant, WRITE_MACHINES)
        machine = self._machine_row(request.path_params["machine_id"])
        if machine is None:
            raise _not_found("machine")
        params = await read_form_or_json(request)
        organization_id = self._ownership_organization(grant, params)
        site_id = params.get("site_id") or None
        if site_id is not None and not self._site_for(site_id, [organization_id]):
            raise _validation({"site_id": ["is not a site of this organization"]})
        if (
            site_id is None
            and machine["site_id"] is not None
            and self._site_for(str(machine["site_id"]), [organization_id])
        ):
            site_id = str(machine["site_id"])
        ownership_id = str(uuid.uuid4())
        now = self.records.clock()
        with self.db.transaction() as conn:
            active = conn.execute(
                "SELECT 1 FROM directory_machine_ownerships WHERE machine_id = ? "
                "AND terminated_at IS NULL",
                (machine["id"],),
            ).fetchone()
            if active is not None:
                raise _validation({"machine": ["already has an active ownership"]})
            conn.execute(
                "INSERT INTO directory_machine_ownerships (id, machine_id, organization_id, "
                "site_id, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                (ownership_id, machine["id"], organization_id, site_id, now, now),
            )
            if site_id is not None:
                conn.execute(
                    "UPDATE directory_machines SET site_id = ?, updated_at = ? WHERE id = ?",
                    (site_id, now, machine["id"]),
                )
        row = self.db.query_one(
            "SELECT * FROM directory_machine_ownerships WHERE id = ?", (ownership_id,)
        )
        assert row is not None
        return JSONResponse(ownership_json(row), status_code=201)

    def _ownership_organization(self, grant: AccessGrant, params: dict[str, str]) -> str:
        if grant.bearer_type == ORGANIZATION and grant.organization_id is not None:
            return grant.organization_id
        organization_id = params.get("organization_id", "").strip()
        if not organization_id:
            raise _validation({"organization_id": ["can't be blank"]})
        if not _is_uuid(organization_id) or not self.records.is_member(
            grant.person_id, organization_id
        ):
            raise _validation({"organization_id": ["is not an organization of this person"]})
        return organization_id
