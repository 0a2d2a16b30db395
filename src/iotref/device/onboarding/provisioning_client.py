"""The configuration and provisioning service (contract section 4): the platform's
connection settings (``GET /v3/configuration``) and a device certificate for a CSR
(``POST /v4/provisioning``). Every provisioning call creates new assets in the backend, so
it is never retried automatically."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
from iotref.device.onboarding.http_client import error_detail, json_object, require_str, send
from iotref.device.onboarding.next_steps import Selection, run, steps


@dataclass(frozen=True)
class PlatformConfiguration:
    """``GET /v3/configuration``: where and how the device connects."""

    server_root_ca: str
    mqtt_endpoint: str
    mqtt_port: int
    machine_region: str
    telemetry_topic: str


@dataclass(frozen=True)
class ProvisionedCertificate:
    """``POST /v4/provisioning``: the device certificate and the identity behind it."""

    device_cert: str
    client_id: str
    org_id: str


class ProvisioningClient:
    """``{base_url}`` of one environment."""

    def __init__(self, env: Environment, http: httpx.AsyncClient, tokens: TokenProvider) -> None:
        self.env = env
        self.http = http
        self.tokens = tokens

    async def _call(
        self, method: str, path: str, what: str, json: dict[str, Any] | None = None
    ) -> httpx.Response:
        url = self.env.base_url + path
        for attempt in range(2):
            token = await self.tokens.access_token(force_refresh=attempt > 0)
            response = await send(
                self.http,
                method,
                url,
                what=what,
                json=json,
                headers={"Authorization": f"Bearer {token}"},
            )
            # A 401 means the token was refused before anything was created: retry once.
            if response.status_code != 401:
                break
        else:
            raise LoginRequired(
                f"{what}: the service does not accept this device's login",
                run("login", then="again").within(Selection.of(self.env)),
            )
        if response.status_code >= 400:
            raise _service_error(response, what)
        return response

    async def configuration(self) -> PlatformConfiguration:
        what = "reading the platform configuration"
        data = json_object(await self._call("GET", "/v3/configuration", what), what)
        connectivity = data.get("connectivity")
        provisioning = data.get("provisioning")
        if not isinstance(connectivity, dict) or not isinstance(provisioning, dict):
            raise ProtocolError(f"{what}: the answer lacks connectivity or provisioning")
        port = connectivity.get("mqttPort")
        if isinstance(port, str) and port.isdigit():
            port = int(port)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ProtocolError(f"{what}: mqttPort is not a port number")
        root_ca = require_str(connectivity, "serverRootCA", what)
        if "-----BEGIN CERTIFICATE-----" not in root_ca:
            raise ProtocolError(f"{what}: serverRootCA is not a PEM certificate")
        return PlatformConfiguration(
            server_root_ca=root_ca,
            mqtt_endpoint=require_str(connectivity, "mqttEndPoint", what),
            mqtt_port=port,
            machine_region=str(connectivity.get("machineRegion", "")),
            telemetry_topic=require_str(provisioning, "telemetryTopic", what),
        )

    async def provision(self, csr_pem: bytes, site_id: str) -> ProvisionedCertificate:
        what = "provisioning the device certificate"
        body = {"certificateSigningRequest": csr_pem.decode("ascii"), "siteId": site_id}
        data = json_object(await self._call("POST", "/v4/provisioning", what, body), what)
        cert = require_str(data, "deviceCert", what)
        if "-----BEGIN CERTIFICATE-----" not in cert:
            raise ProtocolError(f"{what}: deviceCert is not a PEM certificate")
        return ProvisionedCertificate(
            device_cert=cert,
            client_id=require_str(data, "clientId", what),
            org_id=require_str(data, "orgId", what),
        )


def _service_error(response: httpx.Response, what: str) -> ApiError:
    status = response.status_code
    text = error_detail(response)
    detail = f"HTTP {status}" + (f", {text}" if text else "")
    if status == 403:
        return PermissionDenied(
            f"{what}: the service refused access ({detail})",
            steps(
                "log in again for the organization that owns the site ({}, then {})",
                ("logout",),
                ("login",),
            ),
            status=status,
        )
    if status == 404:
        return NotFound(f"{what}: not found ({detail})", status=status)
    if status in (400, 422):
        return ValidationFailed(
            f"{what}: the service refused the request ({detail})", status=status
        )
    return ApiError(f"{what}: the service answered {detail}", "try again later", status=status)
