"""What a CRL says about a device certificate (iotref.device.onboarding.revocation): listed, not
listed, or not usable (another issuer, another key, out of date, not a CRL); which CRL
distribution points may be fetched."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from iotref.device.onboarding.revocation import crl_urls, judge_crl

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.timezone.utc)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class Ca:
    def __init__(self, cn: str = "Device CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(cn)

    def aki(self) -> x509.AuthorityKeyIdentifier:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())

    def issue(self, *crl_points: str) -> x509.Certificate:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name("iotref-device"))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(days=1))
            .not_valid_after(NOW + dt.timedelta(days=365))
            .add_extension(self.aki(), critical=False)
        )
        if crl_points:
            points = [
                x509.DistributionPoint([x509.UniformResourceIdentifier(u)], None, None, None)
                for u in crl_points
            ]
            builder = builder.add_extension(x509.CRLDistributionPoints(points), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def crl(self, *revoked: int, next_update: dt.datetime | None = None) -> bytes:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.name)
            .last_update(NOW - dt.timedelta(days=10))
            .next_update(next_update or NOW + dt.timedelta(days=30))
            .add_extension(self.aki(), critical=False)
        )
        for serial in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(NOW - dt.timedelta(minutes=5))
                .build()
            )
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_listed_certificate_is_revoked_with_its_date() -> None:
    ca = Ca()
    cert = ca.issue()
    answer = judge_crl("u", ca.crl(12345, cert.serial_number), cert, NOW)
    assert answer.state == "revoked"
    assert answer.revoked_at == NOW - dt.timedelta(minutes=5)


def test_pem_crl_and_unlisted_certificate() -> None:
    ca = Ca()
    cert = ca.issue()
    pem = x509.load_der_x509_crl(ca.crl(1)).public_bytes(serialization.Encoding.PEM)
    assert judge_crl("u", pem, cert, NOW).state == "good"


@pytest.mark.parametrize("case", ["other issuer", "same name other key", "stale", "garbage"])
def test_unusable_crls_say_nothing(case: str) -> None:
    ca = Ca()
    cert = ca.issue()
    if case == "other issuer":
        data = Ca("Another CA").crl(cert.serial_number)
    elif case == "same name other key":
        data = Ca("Device CA").crl(cert.serial_number)
    elif case == "stale":
        data = ca.crl(cert.serial_number, next_update=NOW - dt.timedelta(days=1))
    else:
        data = b"not a crl"
    answer = judge_crl("u", data, cert, NOW)
    assert answer.state == "unknown"
    assert answer.detail


def test_only_https_or_loopback_http_points_are_fetched() -> None:
    ca = Ca()
    cert = ca.issue(
        "http://127.0.0.1:8780/ca/device.crl",
        "https://crl.example.com/device.crl",
        "http://crl.example.com/device.crl",
        "ldap://crl.example.com/cn=x",
    )
    assert crl_urls(cert) == [
        "http://127.0.0.1:8780/ca/device.crl",
        "https://crl.example.com/device.crl",
    ]
    assert crl_urls(ca.issue()) == []
