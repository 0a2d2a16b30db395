"""The directory API the device uses (contract section 3): organization, sites, machines and
machine ownership, with a bearer token from :mod:`iotref.device.onboarding.auth`.

A 401 triggers one token refresh and one retry; 403, 404 and 422 become
:class:`~iotref.device.errors.PermissionDenied`, :class:`~iotref.device.errors.NotFound` and
:class:`~iotref.device.errors.ValidationFailed` with the directory's validation messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from iotref.device.errors import (
    ApiError,
    LoginRequired,
    NotFound,
    PermissionDenied,
    ProtocolError,
    ValidationFailed,
)
from iotref.device.onboarding.auth import TokenProvider
from iotref.device.onboarding.environment import Environment
from iotref.device.onboarding.http_client import json_object, json_value, require_str, send
from iotref.device.onboarding.next_steps import Selection, run, steps

MACHINE_KINDS = ("offset_press", "digital_press", "folder")


@dataclass(frozen=True)
class Organization:
    id: str
    name: str


@dataclass(frozen=True)
class Site:
    id: str
    name: str
    organization_id: str | None


@dataclass(frozen=True)
class MachineSpec:
    """What the directory needs to create a machine; ``serial_number`` is unique per
    ``manufacturer``."""

    name: str
    manufacturer: str
    serial_number: str
    kind: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {
            "name": self.name,
            "manufacturer": self.manufacturer,
            "serial_number": self.serial_number,
            "kind": self.kind,
        }


@dataclass(frozen=True)
class Machine:
    id: str
    name: str
    manufacturer: str
    serial_number: str
    kind: str | None


@dataclass(frozen=True)
class MachineOwnership:
    id: str
    machine_id: str
    organization_id: str
    terminated_at: str | None

    @property
    def active(self) -> bool:
        return not self.terminated_at


class DirectoryClient:
    """``{DIRECTORY_HOST}/api/v1`` for one environment."""

    def __init__(self, env: Environment, http: httpx.AsyncClient, tokens: TokenProvider) -> None:
        self.env = env
        self.http = http
        self.tokens = tokens
        self.api = f"{env.directory_host}/api/v1"

    async def _call(
        self, method: str, path: str, what: str, params: dict[str, str] | None = None
    ) -> httpx.Response:
        url = self.api + path
        token = await self.tokens.access_token()
        response = await send(
            self.http,
            method,
            url,
            what=what,
            params=params,
            headers={"Authorization": f"Bearer {token}"},
        )
        if response.status_code == 401:
            token = await self.tokens.access_token(force_refresh=True)
            response = await send(
                self.http,
                method,
                url,
                what=what,
                params=params,
                headers={"Authorization": f"Bearer {token}"},
            )
            if response.status_code == 401:
                raise LoginRequired(
                    f"{what}: the directory does not accept this device's login",
                    run("login", then="again").within(Selection.of(self.env)),
                )
        if response.status_code >= 400:
            raise _api_error(response, what)
        return response

    async def organization(self) -> Organization:
        what = "reading the organization"
        data = json_object(await self._call("GET", "/organization", what), what)
        return Organization(id=require_str(data, "id", what), name=str(data.get("name", "")))

    async def sites(self) -> list[Site]:
        what = "listing the sites"
        value = json_value(await self._call("GET", "/sites", what), what)
        if not isinstance(value, list):
            raise ProtocolError(f"{what}: expected a JSON list")
        sites = []
        for item in value:
            if not isinstance(item, dict):
                raise ProtocolError(f"{what}: expected a list of objects")
            organization = item.get("organization")
            org_id = organization.get("id") if isinstance(organization, dict) else None
            sites.append(
                Site(
                    id=require_str(item, "id", what),
                    name=str(item.get("name", "")),
                    organization_id=str(org_id) if org_id else None,
                )
            )
        return sites

    async def create_machine(self, spec: MachineSpec, site_id: str | None = None) -> Machine:
        what = "creating the machine"
        params = {
            "machine[name]": spec.name,
            "machine[manufacturer]": spec.manufacturer,
            "machine[serial_number]": spec.serial_number,
        }
        if spec.kind:
            params["machine[kind]"] = spec.kind
        if site_id:
            params["machine[site_id]"] = site_id
        response = await self._call("POST", "/machines", what, params)
        return _machine(json_object(response, what), what)

    async def machine(self, machine_id: str) -> Machine:
        what = f"reading machine {machine_id}"
        response = await self._call("GET", f"/machines/{quote(machine_id, safe='')}", what)
        return _machine(json_object(response, what), what)

    async def create_ownership(self, machine_id: str, site_id: str | None) -> MachineOwnership:
        what = f"taking ownership of machine {machine_id}"
        params = {"site_id": site_id} if site_id else None
        response = await self._call(
            "POST", f"/machines/{quote(machine_id, safe='')}/machine_ownership", what, params
        )
        return _ownership(json_object(response, what), what)

    async def ownership(self, machine_id: str) -> MachineOwnership:
        what = f"reading the ownership of machine {machine_id}"
        response = await self._call(
            "GET", f"/machines/{quote(machine_id, safe='')}/machine_ownership", what
        )
        return _ownership(json_object(response, what), what)


def _machine(data: dict[str, Any], what: str) -> Machine:
    kind = data.get("kind")
    return Machine(
        id=require_str(data, "id", what),
        name=str(data.get("name", "")),
        manufacturer=str(data.get("manufacturer", "")),
        serial_number=str(data.get("serial_number", "")),
        kind=str(kind) if kind else None,
    )


def _ownership(data: dict[str, Any], what: str) -> MachineOwnership:
    terminated = data.get("terminated_at")
    return MachineOwnership(
        id=require_str(data, "id", what),
        machine_id=require_str(data, "machine_id", what),
        organization_id=require_str(data, "organization_id", what),
        terminated_at=str(terminated) if terminated else None,
    )


def validation_messages(response: httpx.Response) -> dict[str, list[str]]:
    """``{"errors": {field: [message...]}}`` as a dict; empty if the answer is not that."""
    try:
        data = response.json()
    except ValueError:
        return {}
    errors = data.get("errors") if isinstance(data, dict) else None
    if not isinstance(errors, dict):
        return {}
    result: dict[str, list[str]] = {}
    for field, messages in errors.items():
        if isinstance(messages, list):
            result[str(field)] = [str(m)[:200] for m in messages]
        else:
            result[str(field)] = [str(messages)[:200]]
    return result


def _api_error(response: httpx.Response, what: str) -> ApiError:
    status = response.status_code
    if status == 422:
        errors = validation_messages(response)
        detail = "; ".join(f"{field} {', '.join(msgs)}" for field, msgs in errors.items())
        return ValidationFailed(
            f"{what}: the directory refused it ({detail or 'validation failed'})",
            errors=errors,
        )
    if status == 403:
        return PermissionDenied(
            f"{what}: the directory refused access (HTTP 403)",
            steps(
                "log in again and approve the request for an organization ({}, then {})",
                ("logout",),
                ("login",),
            ),
            status=status,
        )
    if status == 404:
        return NotFound(f"{what}: not found (HTTP 404)", status=status)
    return ApiError(f"{what}: the directory answered HTTP {status}", status=status)
