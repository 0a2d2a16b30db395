"""The configuration and provisioning service (contract section 4) and the thing admin API.

Owns ``GET /v3/configuration``, ``POST /v4/provisioning`` (bearer token from the
directory, CSR checked and signed by the device CA, one new thing per call) and the
admin routes ``GET /admin/things`` and ``POST /admin/things/{client_id}/revoke``, and the
device CA's CRL at ``GET /ca/device.crl`` (named in every device certificate).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from iotref.sandbox.broker.config import TELEMETRY_TOPIC
from iotref.sandbox.context import THING_REGISTERED, SandboxContext
from iotref.sandbox.http_errors import ApiError, read_json_object
from iotref.sandbox.provisioning.certificate_authority import (
    DEVICE_CRL_PATH,
    CertificateAuthorities,
    CsrError,
    load_device_csr,
)
from iotref.sandbox.provisioning.openapi import provisioning_service_fragment
from iotref.sandbox.provisioning.things import CLIENT_ID_PATTERN, ThingRegistry

log = logging.getLogger(__name__)

PROVISIONING_SCOPE = "Org.prinect.onprem.rw"
MACHINE_REGION = "local"
_BEARER_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="iotref-sandbox"'}


class AccessGrantLike(Protocol):
    """What provisioning needs of the directory's access grant."""

    @property
    def organization_id(self) -> str | None: ...

    def has_scope(self, scope: str) -> bool: ...


class SiteLike(Protocol):
    @property
    def organization_id(self) -> str: ...


class DirectoryLike(Protocol):
    """The part of :class:`iotref.sandbox.directory.service.Directory` provisioning uses."""

    def authenticate(self, authorization: str | None) -> AccessGrantLike | None: ...

    def site(self, site_id: str) -> SiteLike | None: ...


class BrokerLike(Protocol):
    """The part of :class:`iotref.sandbox.broker.supervisor.Broker` provisioning uses."""

    async def apply_policies(self) -> None:
        """Bring the broker's per-thing policies in line with the registry."""

    async def revoke(self, client_id: str) -> None:
        """Disconnect the thing and refuse it from now on."""


class ClientIdConvertor(Convertor[str]):
    """``{client_id:client_id}`` in a route: only the form of the ids the registry hands
    out, so that ``/admin/things/bulk`` is not taken for a thing called ``bulk``."""

    regex = CLIENT_ID_PATTERN

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("client_id", ClientIdConvertor())


class Provisioning:
    """The configuration + provisioning service (a sandbox component)."""

    def __init__(
        self,
        ctx: SandboxContext,
        directory: DirectoryLike,
        cas: CertificateAuthorities,
        things: ThingRegistry,
        broker: BrokerLike,
    ) -> None:
        self.ctx = ctx
        self.directory = directory
        self.cas = cas
        self.things = things
        self.broker = broker

    def routes(self) -> Sequence[BaseRoute]:
        return [
            Route("/v3/configuration", self.configuration, methods=["GET"]),
            Route("/v4/provisioning", self.provision, methods=["POST"]),
            Route("/admin/things", self.admin_list, methods=["GET"]),
            Route("/admin/things/{client_id:client_id}", self.admin_get, methods=["GET"]),
            Route(
                "/admin/things/{client_id:client_id}/revoke", self.admin_revoke, methods=["POST"]
            ),
            Route(DEVICE_CRL_PATH, self.device_crl, methods=["GET"]),
        ]

    async def start(self) -> None:
        return None

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI fragment of the routes above (merged into ``/openapi.json``)."""
        return provisioning_service_fragment()

    async def stop(self) -> None:
        return None

    # --- the service -------------------------------------------------------------------

    def configuration_document(self) -> dict[str, object]:
        return {
            "connectivity": {
                "serverRootCA": self.cas.server_root_ca_pem,
                "mqttEndPoint": self.ctx.mqtt_host,
                "mqttPort": self.ctx.mqtt_port,
                "machineRegion": MACHINE_REGION,
            },
            "provisioning": {"telemetryTopic": TELEMETRY_TOPIC},
        }

    async def configuration(self, request: Request) -> JSONResponse:
        self._grant(request)
        return JSONResponse(self.configuration_document())

    async def provision(self, request: Request) -> JSONResponse:
        grant = self._grant(request)
        if not grant.has_scope(PROVISIONING_SCOPE):
            raise ApiError(
                403,
                "insufficient_scope",
                f"the token lacks the scope {PROVISIONING_SCOPE}",
            )
        org_id = grant.organization_id
        if not org_id:
            raise ApiError(403, "forbidden", "provisioning needs an organization token")
        body = await read_json_object(request)
        csr_pem = body.get("certificateSigningRequest")
        site_id = body.get("siteId")
        if not isinstance(csr_pem, str) or not csr_pem.strip():
            raise ApiError(
                400, "invalid_request", "certificateSigningRequest (a PEM string) is required"
            )
        if not isinstance(site_id, str) or not site_id.strip():
            raise ApiError(400, "invalid_request", "siteId (a string) is required")
        try:
            csr = load_device_csr(csr_pem)
        except CsrError as exc:
            raise ApiError(400, "invalid_csr", str(exc)) from None
        site = self.directory.site(site_id)
        if site is None:
            raise ApiError(422, "unknown_site", f"there is no site {site_id}")
        if site.organization_id != org_id:
            raise ApiError(403, "forbidden", "the site belongs to another organization")

        client_id = self.things.new_client_id()
        cert = self.cas.sign_device_csr(csr, client_id)
        cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        thing = self.things.register(
            client_id=client_id,
            org_id=org_id,
            site_id=site_id,
            certificate_pem=cert_pem,
            serial=cert.serial_number,
            not_after=cert.not_valid_after_utc,
        )
        await self.broker.apply_policies()
        log.info("provisioned thing %s for organization %s, site %s", client_id, org_id, site_id)
        await self.ctx.events.emit(THING_REGISTERED, thing=thing)
        return JSONResponse({"deviceCert": cert_pem, "clientId": client_id, "orgId": org_id})

    def _grant(self, request: Request) -> AccessGrantLike:
        header = request.headers.get("authorization")
        if not header:
            raise ApiError(
                401, "unauthorized", "a bearer token is required", headers=_BEARER_CHALLENGE
            )
        grant = self.directory.authenticate(header)
        if grant is None:
            raise ApiError(
                401,
                "invalid_token",
                "the bearer token is unknown, expired or revoked",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return grant

    # --- admin -------------------------------------------------------------------------

    def _admin(self, request: Request) -> None:
        if not self.ctx.check_admin(request.headers.get("authorization")):
            raise ApiError(
                401, "unauthorized", "the admin token is required", headers=_BEARER_CHALLENGE
            )

    async def admin_list(self, request: Request) -> JSONResponse:
        self._admin(request)
        org_id = request.query_params.get("orgId")
        return JSONResponse({"things": [t.to_json() for t in self.things.list(org_id)]})

    async def admin_get(self, request: Request) -> JSONResponse:
        self._admin(request)
        thing = self.things.get(request.path_params["client_id"])
        if thing is None:
            raise ApiError(404, "not_found", "no such thing")
        return JSONResponse(thing.to_json(with_certificate=True))

    async def device_crl(self, request: Request) -> Response:
        """The device CA's CRL (DER), which device certificates name as their CRL
        distribution point; public, like a real CA's."""
        return Response(
            self.cas.device_crl_path.read_bytes(),
            media_type="application/pkix-crl",
            headers={"Cache-Control": "no-cache"},
        )

    async def admin_revoke(self, request: Request) -> JSONResponse:
        """Revoke the thing's certificate: CRL first, then the registry, then the broker
        disconnects the device and refuses it from now on (no other connection is
        touched)."""
        self._admin(request)
        client_id = request.path_params["client_id"]
        thing = self.things.get(client_id)
        if thing is None:
            raise ApiError(404, "not_found", f"no thing {client_id}")
        already = thing.revoked and self.cas.is_revoked(thing.serial)
        if not already:
            self.cas.revoke(thing.serial)
            thing = self.things.mark_revoked(client_id) or thing
            await self.broker.revoke(client_id)
            log.info("revoked thing %s", client_id)
        return JSONResponse({**thing.to_json(), "alreadyRevoked": already})
