"""Whether the platform still accepts a device certificate, as ``iotref status`` asks it:
the CRLs the certificate names (fetched only over ``https://`` or loopback ``http://``) and
a TLS handshake with the broker using the device's certificate and key (no MQTT session).
What is trusted and why: docs/security.md and docs/operations.md, "Certificates".
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal

import httpx
from cryptography import x509

from iotref.device.connection.diagnostics import REVOKED_NEXT_STEP, diagnose_tls
from iotref.device.connection.settings import ConnectionSettings
from iotref.device.errors import ConfigurationError
from iotref.device.onboarding.certificate_store import DeviceIdentity
from iotref.device.onboarding.environment import check_service_url
from iotref.device.onboarding.next_steps import NextStep

log = logging.getLogger("iotref.revocation")

DEFAULT_TIMEOUT_S = 3.0
_MAX_CRL_BYTES = 8 * 1024 * 1024

#: ``accepted``: the broker took the certificate; ``revoked``: a CRL lists it or the broker
#: refused it as revoked; ``failed``: the TLS handshake failed otherwise (the reason says
#: how); ``unreachable``: no answer from the broker; ``unknown``: anything else.
Verdict = Literal["accepted", "revoked", "failed", "unreachable", "unknown"]


@dataclass(frozen=True)
class CrlAnswer:
    """What one CRL says about the certificate: ``revoked`` (with when), ``good``, or
    ``unknown`` (not fetched, not usable), with the reason."""

    url: str
    state: Literal["revoked", "good", "unknown"]
    detail: str = ""
    revoked_at: datetime | None = None


@dataclass(frozen=True)
class RevocationStatus:
    """The verdict and how it was reached: the CRLs asked and the handshake's outcome;
    ``next_step`` when something is wrong."""

    verdict: Verdict
    reason: str
    crls: tuple[CrlAnswer, ...] = ()
    handshake: str = ""
    next_step: str | NextStep | None = None

    @property
    def revoked(self) -> bool:
        return self.verdict == "revoked"

    def as_json(self) -> dict[str, object]:
        return {
            "verdict": self.verdict,
            "reason": self.reason,
            "handshake": self.handshake,
            "crls": [
                {
                    "url": a.url,
                    "state": a.state,
                    "detail": a.detail,
                    "revoked_at": None if a.revoked_at is None else a.revoked_at.isoformat(),
                }
                for a in self.crls
            ],
        }


def crl_urls(certificate: x509.Certificate) -> list[str]:
    """The certificate's CRL distribution points that may be fetched (see the module)."""
    try:
        points = certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return []
    urls = []
    for point in points:
        for name in point.full_name or ():
            if isinstance(name, x509.UniformResourceIdentifier):
                try:
                    urls.append(check_service_url(name.value, "CRL distribution point"))
                except ConfigurationError as exc:
                    log.info("not fetching CRL %s: %s", name.value, exc.reason)
    return urls


def _key_id(value: x509.AuthorityKeyIdentifier | x509.SubjectKeyIdentifier) -> bytes | None:
    return value.key_identifier if isinstance(value, x509.AuthorityKeyIdentifier) else value.digest


def _authority_key_id(item: x509.Certificate | x509.CertificateRevocationList) -> bytes | None:
    try:
        return _key_id(item.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value)
    except x509.ExtensionNotFound:
        return None


def judge_crl(
    url: str, data: bytes, certificate: x509.Certificate, now: datetime | None = None
) -> CrlAnswer:
    """What the CRL ``data`` (DER or PEM) says about ``certificate``."""
    now = now or datetime.now(timezone.utc)
    try:
        crl = (
            x509.load_pem_x509_crl(data)
            if data.lstrip().startswith(b"-----BEGIN")
            else x509.load_der_x509_crl(data)
        )
    except ValueError:
        return CrlAnswer(url, "unknown", "not a CRL")
    if crl.issuer != certificate.issuer:
        return CrlAnswer(url, "unknown", f"issued by {crl.issuer.rfc4514_string()}, not the CA")
    ours, theirs = _authority_key_id(certificate), _authority_key_id(crl)
    if ours is not None and theirs is not None and ours != theirs:
        return CrlAnswer(url, "unknown", "issued by another key of the CA")
    next_update = crl.next_update_utc
    if next_update is not None and next_update < now:
        return CrlAnswer(url, "unknown", f"out of date since {next_update:%Y-%m-%d %H:%M} UTC")
    entry = crl.get_revoked_certificate_by_serial_number(certificate.serial_number)
    if entry is None:
        return CrlAnswer(url, "good", "not listed")
    return CrlAnswer(url, "revoked", "listed", entry.revocation_date_utc)


async def _fetch_crl(http: httpx.AsyncClient, url: str, certificate: x509.Certificate) -> CrlAnswer:
    try:
        response = await http.get(url)
    except httpx.HTTPError as exc:
        return CrlAnswer(url, "unknown", f"cannot fetch it: {type(exc).__name__}")
    if response.status_code != 200:
        return CrlAnswer(url, "unknown", f"HTTP {response.status_code}")
    if len(response.content) > _MAX_CRL_BYTES:
        return CrlAnswer(url, "unknown", "too large")
    return judge_crl(url, response.content, certificate)


async def check_revocation(
    identity: DeviceIdentity,
    *,
    http: httpx.AsyncClient | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    alpn: bool = False,
) -> RevocationStatus:
    """Ask the CRLs the certificate names and the broker (see the module) whether the
    platform accepts ``identity``'s certificate. Never raises for the network."""
    certificate = x509.load_pem_x509_certificate(identity.certificate_path.read_bytes())
    props = identity.properties
    answers: list[CrlAnswer] = []
    urls = crl_urls(certificate)
    if urls:
        owned = http is None
        client = http or httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)
        try:
            answers = list(
                await asyncio.gather(*(_fetch_crl(client, url, certificate) for url in urls))
            )
        finally:
            if owned:
                await client.aclose()
    settings = ConnectionSettings(
        endpoint=props.mqtt_endpoint,
        port=props.mqtt_port,
        client_id=props.client_id,
        cert_path=identity.certificate_path,
        key_path=identity.private_key_path,
        ca_path=identity.root_ca_path,
        alpn=alpn,
    )
    failure = await asyncio.to_thread(diagnose_tls, settings, timeout_s)
    where = settings.where()
    handshake = "accepted" if failure is None else failure.reason
    listed = next((a for a in answers if a.state == "revoked"), None)
    crls = tuple(answers)
    renew = REVOKED_NEXT_STEP
    if listed is not None:
        when = f" since {listed.revoked_at:%Y-%m-%d %H:%M} UTC" if listed.revoked_at else ""
        return RevocationStatus(
            "revoked",
            f"the certificate is revoked{when}: the CA's CRL ({listed.url}) lists it",
            crls,
            handshake,
            renew,
        )
    if failure is not None and failure.revoked:
        return RevocationStatus(
            "revoked",
            f"the certificate is revoked: the broker at {where} refused it as revoked",
            crls,
            handshake,
            renew,
        )
    if failure is None:
        return RevocationStatus(
            "accepted", f"the broker at {where} accepts the certificate", crls, handshake
        )
    step = failure.hint or failure.next_step
    if failure.kind == "unreachable":
        return RevocationStatus("unreachable", failure.reason, crls, handshake, step)
    if failure.kind in ("tls", "refused"):
        return RevocationStatus("failed", failure.reason, crls, handshake, step)
    return RevocationStatus("unknown", failure.reason, crls, handshake, step)
