"""The sandbox CAs: files and modes, reuse across starts, device certificates, CSR checks,
revocation and CRLs; and the thing registry they feed."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from iotref.sandbox.database import Database
from iotref.sandbox.provisioning.certificate_authority import (
    DEVICE_CRL_PATH,
    OPERATOR_IDENTITY,
    PLATFORM_IDENTITY,
    CertificateAuthorities,
    CsrError,
    load_device_csr,
)
from iotref.sandbox.provisioning.things import ThingRegistry, is_client_id, new_client_id
from tests.support.device_keys import corrupt_csr_signature, make_csr, make_key


@pytest.fixture
def cas(tmp_path: Path) -> CertificateAuthorities:
    authorities = CertificateAuthorities(tmp_path / "ca")
    authorities.ensure()
    return authorities


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_files_and_modes(cas: CertificateAuthorities) -> None:
    assert stat.S_IMODE(cas.ca_dir.stat().st_mode) == 0o700
    keys = sorted(cas.ca_dir.glob("*.key"))
    assert len(keys) == 6
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert not list(cas.ca_dir.glob(".*tmp"))
    assert cas.server_root_ca_pem == cas.server_root_ca_path.read_text()
    assert cas.ca_bundle_path.read_text() == cas.server_root_ca_pem


def test_chains(cas: CertificateAuthorities) -> None:
    root = _cert(cas.server_root_ca_path)
    broker = _cert(cas.broker_cert_path)
    broker.verify_directly_issued_by(root)
    san = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    platform_ca = _cert(cas.platform_ca_path)
    for path, name in (
        (cas.platform_cert_path, PLATFORM_IDENTITY),
        (cas.operator_cert_path, OPERATOR_IDENTITY),
    ):
        cert = _cert(path)
        cert.verify_directly_issued_by(platform_ca)
        assert _cn(cert) == name
    bundle = x509.load_pem_x509_certificates(cas.client_ca_bundle_path.read_bytes())
    assert bundle == [_cert(cas.device_ca_path), platform_ca]


def test_ensure_is_idempotent_and_reuses_everything(
    tmp_path: Path, cas: CertificateAuthorities
) -> None:
    crls = {"crl.pem", "device.crl"}  # rewritten on every start (fresh dates)
    before = {p.name: p.read_bytes() for p in cas.ca_dir.iterdir() if p.name not in crls}
    again = CertificateAuthorities(cas.ca_dir)
    again.ensure()
    after = {p.name: p.read_bytes() for p in cas.ca_dir.iterdir() if p.name not in crls}
    assert after == before


def test_lost_leaf_is_reissued_by_the_same_ca(cas: CertificateAuthorities) -> None:
    root = cas.server_root_ca_path.read_bytes()
    cas.broker_cert_path.unlink()
    cas.broker_key_path.unlink()
    cas.ensure()
    assert cas.server_root_ca_path.read_bytes() == root
    _cert(cas.broker_cert_path).verify_directly_issued_by(_cert(cas.server_root_ca_path))


@pytest.mark.parametrize("key_type", ["ec-p256", "ec-p384", "rsa2048"])
def test_sign_device_csr(cas: CertificateAuthorities, key_type: str) -> None:
    key = make_key(key_type)
    client_id = new_client_id()
    cert = cas.sign_device_csr(load_device_csr(make_csr(key, "ignored")), client_id)
    assert _cn(cert) == client_id
    cert.verify_directly_issued_by(cas.device_ca_certificate)
    assert cert.public_key() == key.public_key()
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=364) < lifetime < dt.timedelta(days=366)
    other = cas.sign_device_csr(load_device_csr(make_csr(key)), client_id)
    assert other.serial_number != cert.serial_number


def test_device_cert_lifetime_is_configurable(tmp_path: Path) -> None:
    cas = CertificateAuthorities(tmp_path / "ca", device_cert_days=7)
    cas.ensure()
    cert = cas.sign_device_csr(load_device_csr(make_csr(make_key())), new_client_id())
    assert cert.not_valid_after_utc - cert.not_valid_before_utc < dt.timedelta(days=8)


@pytest.mark.parametrize(
    ("pem", "reason"),
    [
        ("", "non-empty"),
        ("hello", "PEM"),
        (
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "cannot be parsed",
        ),
        ("x" * 70000, "longer than"),
    ],
)
def test_unparseable_csrs(pem: str, reason: str) -> None:
    with pytest.raises(CsrError, match=reason):
        load_device_csr(pem)


@pytest.mark.parametrize(
    ("key_type", "reason"),
    [
        ("rsa1024", "1024 bits is too small"),
        ("ec-p521", "secp521r1 is not accepted"),
        ("ec-secp256k1", "secp256k1 is not accepted"),
        ("ed25519", "Ed25519 keys are not accepted"),
    ],
)
def test_refused_key_types(key_type: str, reason: str) -> None:
    with pytest.raises(CsrError, match=reason):
        load_device_csr(make_csr(make_key(key_type)))


@pytest.mark.parametrize("key_type", ["ec-p256", "rsa2048"])
def test_bad_signature(key_type: str) -> None:
    with pytest.raises(CsrError, match="signature"):
        load_device_csr(corrupt_csr_signature(make_csr(make_key(key_type))))


def _crls(path: Path) -> list[x509.CertificateRevocationList]:
    marker = b"-----END X509 CRL-----"
    parts = [p.strip() + b"\n" + marker for p in path.read_bytes().split(marker) if p.strip()]
    return [x509.load_pem_x509_crl(part + b"\n") for part in parts]


def test_revocation_and_crls(cas: CertificateAuthorities) -> None:
    crls = _crls(cas.crl_path)
    assert {crl.issuer for crl in crls} == {
        cas.device_ca_certificate.subject,
        cas.platform_ca_certificate.subject,
    }
    for crl in crls:
        assert len(crl) == 0
        assert crl.next_update_utc is not None
        assert crl.next_update_utc > dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=300)
    cert = cas.sign_device_csr(load_device_csr(make_csr(make_key())), new_client_id())
    cas.revoke(cert.serial_number)
    cas.revoke(cert.serial_number)
    assert cas.is_revoked(cert.serial_number)
    device_crl = next(
        c for c in _crls(cas.crl_path) if c.issuer == cas.device_ca_certificate.subject
    )
    ca_key = cas.device_ca_certificate.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    assert device_crl.is_signature_valid(ca_key)
    assert device_crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    assert len(device_crl) == 1
    # revocations survive a restart
    again = CertificateAuthorities(cas.ca_dir)
    again.ensure()
    assert again.is_revoked(cert.serial_number)


def test_device_certificates_name_the_served_crl(cas: CertificateAuthorities) -> None:
    """What ``iotref status`` reads: the certificate's CRL distribution point, and the
    device CA's CRL alone in DER at the path served, listing a revoked certificate."""
    plain = cas.sign_device_csr(load_device_csr(make_csr(make_key())), new_client_id())
    with pytest.raises(x509.ExtensionNotFound):
        plain.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    cas.device_crl_url = "http://127.0.0.1:8780" + DEVICE_CRL_PATH
    cert = cas.sign_device_csr(load_device_csr(make_csr(make_key())), new_client_id())
    points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [name.value for point in points for name in point.full_name or ()] == [
        "http://127.0.0.1:8780/ca/device.crl"
    ]
    cas.revoke(cert.serial_number)
    crl = x509.load_der_x509_crl(cas.device_crl_path.read_bytes())
    assert crl.issuer == cas.device_ca_certificate.subject
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    assert crl.get_revoked_certificate_by_serial_number(plain.serial_number) is None


def test_thing_registry(tmp_path: Path) -> None:
    db = Database(tmp_path / "db.sqlite")
    registry = ThingRegistry(db)
    client_id = new_client_id()
    assert is_client_id(client_id)
    assert not is_client_id("iotref-../#")
    not_after = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    thing = registry.register(
        client_id=client_id,
        org_id="o",
        site_id="s",
        certificate_pem="PEM",
        serial=2**150 + 7,
        not_after=not_after,
    )
    assert registry.get(client_id) == thing
    assert registry.list("o") == [thing]
    assert registry.list("other") == []
    revoked = registry.mark_revoked(client_id)
    assert revoked is not None
    assert revoked.revoked
    assert registry.mark_revoked("nope") is None
    assert ThingRegistry(db).get(client_id) == revoked
    assert revoked.to_json()["serial"] == format(2**150 + 7, "x")
    with pytest.raises(Exception, match="UNIQUE"):
        registry.register(
            client_id=client_id,
            org_id="o",
            site_id="s",
            certificate_pem="PEM",
            serial=1,
            not_after=not_after,
        )
    db.close()
