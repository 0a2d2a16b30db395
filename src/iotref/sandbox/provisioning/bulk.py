"""Bulk provisioning: the sandbox's fast path for fleets (``iotref fleet``).

``POST /admin/things/bulk`` (admin token) certifies many device keys for one site in one
call, each exactly as ``POST /v4/provisioning`` does (a new thing, ``thing_registered``),
all or nothing, and answers with the configuration document too. The real platform has no
such route; it exists so that a simulated fleet of thousands of machines is set up in
seconds. Its request and answer are described by :meth:`BulkProvisioning.openapi`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from iotref.sandbox.context import THING_REGISTERED, SandboxContext
from iotref.sandbox.directory.seed import FIRST_SITE_ID
from iotref.sandbox.http_errors import ApiError, read_json_object
from iotref.sandbox.openapi_fragment import schema_ref
from iotref.sandbox.provisioning.certificate_authority import (
    CertificateAuthorities,
    CsrError,
    load_device_csr,
)
from iotref.sandbox.provisioning.openapi import configuration_schema, unknown_site_response
from iotref.sandbox.provisioning.service import DirectoryLike, Provisioning
from iotref.sandbox.provisioning.things import ThingRegistry

log = logging.getLogger(__name__)

BULK_PATH = "/admin/things/bulk"
MAX_BATCH = 1000
"""Most CSRs in one call (an EC P-256 CSR is about 500 bytes; the body limit is 1 MiB)."""
MAX_MACHINE_ID = 128
EVENT_CONCURRENCY = 64
"""``thing_registered`` handlers running at once (each waits for the shadow service)."""
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="iotref-sandbox"'}


@dataclass(frozen=True)
class _Request:
    csr: x509.CertificateSigningRequest
    machine_id: str | None


class BulkProvisioning:
    """The bulk provisioning route (a sandbox component)."""

    def __init__(
        self,
        ctx: SandboxContext,
        directory: DirectoryLike,
        cas: CertificateAuthorities,
        things: ThingRegistry,
        provisioning: Provisioning,
    ) -> None:
        self.ctx = ctx
        self.directory = directory
        self.cas = cas
        self.things = things
        self.provisioning = provisioning
        self.provisioned = 0

    def routes(self) -> Sequence[BaseRoute]:
        return [Route(BULK_PATH, self.bulk, methods=["POST"])]

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"bulk_provisioning_url": f"{self.ctx.http_url}{BULK_PATH}"}

    # ------------------------------------------------------------------ the route

    async def bulk(self, request: Request) -> JSONResponse:
        if not self.ctx.check_admin(request.headers.get("authorization")):
            raise ApiError(401, "unauthorized", "the admin token is required", headers=_CHALLENGE)
        body = await read_json_object(request)
        site_id = body.get("siteId", FIRST_SITE_ID)
        if not isinstance(site_id, str) or not site_id.strip():
            raise ApiError(400, "invalid_request", "siteId must be a non-empty string")
        devices = body.get("devices")
        if not isinstance(devices, list) or not devices:
            raise ApiError(400, "invalid_request", "devices (a non-empty list) is required")
        if len(devices) > MAX_BATCH:
            raise ApiError(
                400, "invalid_request", f"at most {MAX_BATCH} devices per call, got {len(devices)}"
            )
        raw = [_device_entry(i, entry) for i, entry in enumerate(devices)]
        site = self.directory.site(site_id)
        if site is None:
            raise ApiError(422, "unknown_site", f"there is no site {site_id}")
        org_id = site.organization_id
        # Checking and signing is CPU work (tens of ms per hundred CSRs): off the event loop.
        signed = await asyncio.to_thread(self._sign_all, raw)
        things = []
        for (cert, client_id, cert_pem), entry in zip(signed, raw, strict=True):
            things.append(
                self.things.register(
                    client_id=client_id,
                    org_id=org_id,
                    site_id=site_id,
                    certificate_pem=cert_pem,
                    serial=cert.serial_number,
                    not_after=cert.not_valid_after_utc,
                    machine_id=entry[1],
                )
            )
        self.provisioned += len(things)
        await self.provisioning.broker.apply_policies()
        await self._announce(things)
        log.info(
            "bulk-provisioned %d things for organization %s, site %s", len(things), org_id, site_id
        )
        return JSONResponse(
            {
                "orgId": org_id,
                "siteId": site_id,
                "configuration": self.provisioning.configuration_document(),
                "things": [
                    {"clientId": t.client_id, "deviceCert": t.certificate_pem, "machineId": m}
                    for t, (_, m) in zip(things, raw, strict=True)
                ],
            }
        )

    def _sign_all(
        self, raw: list[tuple[str, str | None]]
    ) -> list[tuple[x509.Certificate, str, str]]:
        requests: list[_Request] = []
        for index, (pem, machine_id) in enumerate(raw):
            try:
                requests.append(_Request(load_device_csr(pem), machine_id))
            except CsrError as exc:
                raise ApiError(400, "invalid_csr", f"devices[{index}]: {exc}") from None
        out = []
        for req in requests:
            client_id = self.things.new_client_id()
            cert = self.cas.sign_device_csr(req.csr, client_id)
            out.append((cert, client_id, cert.public_bytes(serialization.Encoding.PEM).decode()))
        return out

    async def _announce(self, things: list[Any]) -> None:
        """Emit ``thing_registered`` for each thing, a bounded number at a time (the shadow
        service answers each with an update of the thing's shadow)."""
        limit = asyncio.Semaphore(EVENT_CONCURRENCY)

        async def one(thing: Any) -> None:
            async with limit:
                await self.ctx.events.emit(THING_REGISTERED, thing=thing)

        await asyncio.gather(*(one(t) for t in things))

    # ------------------------------------------------------------------ description

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI fragment of the bulk route."""
        error = {"$ref": "#/components/responses/BadRequest"}
        csr_item = {
            "type": "object",
            "required": ["certificateSigningRequest"],
            "properties": {
                "certificateSigningRequest": {"type": "string", "pattern": "\\S"},
                "machineId": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_MACHINE_ID,
                },
            },
        }
        result_item = {
            "type": "object",
            "required": ["clientId", "deviceCert", "machineId"],
            "properties": {
                "clientId": {"type": "string"},
                "deviceCert": {"type": "string"},
                "machineId": {"type": "string", "nullable": True},
            },
        }
        return {
            "paths": {
                BULK_PATH: {
                    "post": {
                        "tags": ["Admin"],
                        "operationId": "bulkProvisionThings",
                        "summary": "Certify many device keys for one site in one call "
                        "(sandbox only, for fleet simulations)",
                        "security": [{"adminBearer": []}],
                        "requestBody": {
                            "required": True,
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["devices"],
                                        "properties": {
                                            "siteId": {"type": "string", "minLength": 1},
                                            "devices": {
                                                "type": "array",
                                                "minItems": 1,
                                                "maxItems": MAX_BATCH,
                                                "items": csr_item,
                                            },
                                        },
                                    }
                                }
                            },
                        },
                        "responses": {
                            "200": {
                                "description": "The things, in request order.",
                                "content": {
                                    "application/json": {
                                        "schema": {
                                            "type": "object",
                                            "required": [
                                                "orgId",
                                                "siteId",
                                                "configuration",
                                                "things",
                                            ],
                                            "properties": {
                                                "orgId": {"type": "string"},
                                                "siteId": {"type": "string"},
                                                "configuration": schema_ref("Configuration"),
                                                "things": {"type": "array", "items": result_item},
                                            },
                                        }
                                    }
                                },
                            },
                            "400": error,
                            "401": {"$ref": "#/components/responses/Unauthorized"},
                            "413": {"$ref": "#/components/responses/PayloadTooLarge"},
                            "422": {"$ref": "#/components/responses/UnknownSite"},
                        },
                    }
                }
            },
            "components": {
                "schemas": {"Configuration": configuration_schema()},
                "responses": {"UnknownSite": unknown_site_response()},
            },
        }


def _device_entry(index: int, entry: Any) -> tuple[str, str | None]:
    """``(csr_pem, machine_id)`` of ``devices[index]``, or a 400."""
    if not isinstance(entry, dict):
        raise ApiError(400, "invalid_request", f"devices[{index}] must be an object")
    pem = entry.get("certificateSigningRequest")
    if not isinstance(pem, str) or not pem.strip():
        raise ApiError(
            400,
            "invalid_request",
            f"devices[{index}].certificateSigningRequest (a PEM string) is required",
        )
    machine_id = entry.get("machineId")
    if machine_id is not None and (
        not isinstance(machine_id, str) or not machine_id or len(machine_id) > MAX_MACHINE_ID
    ):
        raise ApiError(
            400,
            "invalid_request",
            f"devices[{index}].machineId must be a string of 1..{MAX_MACHINE_ID} characters",
        )
    return pem, machine_id
