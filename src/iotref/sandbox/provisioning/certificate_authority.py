"""The sandbox's certificate authorities and the files they keep under ``ca_dir``.

Owns: the server root CA (the sandbox's stand-in for "Amazon Root CA 1") and the broker's
TLS server certificate it signs; the device CA that signs device certificates from CSRs;
the platform CA that signs the sandbox's own service identity (``iotref-platform``) and
the operator identity (``iotref-operator``); the list of revoked device certificates and
the CRLs the broker checks. Also the checks a device CSR must pass before it is signed.

Everything is made on the first :meth:`CertificateAuthorities.ensure` and reused after
that; private keys are written atomically, mode 0600, in a 0700 directory.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from iotref.device.files import (
    PRIVATE_FILE_MODE,
    PUBLIC_FILE_MODE,
    ensure_private_dir,
    write_atomic,
)

log = logging.getLogger(__name__)

PLATFORM_IDENTITY = "iotref-platform"
OPERATOR_IDENTITY = "iotref-operator"
DEFAULT_DEVICE_CERT_DAYS = 365
CA_DAYS = 20 * 365
SERVICE_CERT_DAYS = 5 * 365
CRL_DAYS = 365
#: The HTTP path of the device CA's CRL (DER), named in device certificates.
DEVICE_CRL_PATH = "/ca/device.crl"
RENEW_BEFORE = dt.timedelta(days=30)
CLOCK_SKEW = dt.timedelta(minutes=5)
MAX_CSR_CHARS = 64 * 1024
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
ACCEPTED_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}
ACCEPTED_CSR_HASHES = ("sha256", "sha384", "sha512")

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class CsrError(ValueError):
    """A certificate signing request the device CA will not sign; ``str()`` says why."""


def load_device_csr(pem: str) -> x509.CertificateSigningRequest:
    """Parse a PEM CSR and check it: valid self-signature, an accepted key and hash.

    Accepted keys: RSA of at least 2048 bits, EC on P-256 or P-384 (what AWS IoT Core
    accepts for device certificates). Raises :class:`CsrError` with a readable reason.
    """
    if not isinstance(pem, str) or not pem.strip():
        raise CsrError("certificateSigningRequest must be a non-empty PEM string")
    if len(pem) > MAX_CSR_CHARS:
        raise CsrError(f"certificateSigningRequest is longer than {MAX_CSR_CHARS} characters")
    if "-----BEGIN CERTIFICATE REQUEST-----" not in pem:
        raise CsrError("certificateSigningRequest is not a PEM 'CERTIFICATE REQUEST'")
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
    except (ValueError, UnicodeEncodeError) as exc:
        raise CsrError("certificateSigningRequest cannot be parsed as a PEM CSR") from exc
    check_device_public_key(csr)
    try:
        valid = csr.is_signature_valid
    except Exception as exc:  # unsupported algorithms raise here
        raise CsrError("the CSR's signature cannot be checked") from exc
    if not valid:
        raise CsrError("the CSR's signature does not match its public key")
    hash_algorithm = csr.signature_hash_algorithm
    if hash_algorithm is None or hash_algorithm.name not in ACCEPTED_CSR_HASHES:
        name = hash_algorithm.name if hash_algorithm is not None else "none"
        raise CsrError(f"the CSR is signed with {name}; use SHA-256, SHA-384 or SHA-512")
    return csr


def check_device_public_key(csr: x509.CertificateSigningRequest) -> None:
    """Raise :class:`CsrError` unless the CSR's key is RSA >= 2048 or EC P-256/P-384."""
    try:
        key = csr.public_key()
    except Exception as exc:  # an unknown key algorithm or curve
        raise CsrError(
            "the CSR's public key type is not supported; use RSA (2048 bits or more) "
            "or EC P-256 / P-384"
        ) from exc
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise CsrError(
                f"RSA key of {key.key_size} bits is too small; at least {MIN_RSA_BITS} bits"
            )
        if key.key_size > MAX_RSA_BITS:
            raise CsrError(f"RSA key of {key.key_size} bits is over {MAX_RSA_BITS} bits")
        return
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ACCEPTED_CURVES:
            raise CsrError(
                f"EC curve {key.curve.name} is not accepted; use P-256 (secp256r1) "
                "or P-384 (secp384r1)"
            )
        return
    kind = type(key).__name__.removesuffix("PublicKey").lstrip("_") or "unknown"
    raise CsrError(f"{kind} keys are not accepted; use RSA (2048 bits or more) or EC P-256 / P-384")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "iotref sandbox"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _random_serial() -> int:
    return x509.random_serial_number()


def _key_usage(*, ca: bool, key: object) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=(not ca) and isinstance(key, rsa.RSAPublicKey),
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass
class _Authority:
    """One CA: its certificate and key."""

    cert: x509.Certificate
    key: PrivateKey

    @property
    def name(self) -> x509.Name:
        return self.cert.subject


class CertificateAuthorities:
    """The sandbox's CAs and the certificates and CRLs they issue (files under ``ca_dir``)."""

    def __init__(self, ca_dir: Path, device_cert_days: int = DEFAULT_DEVICE_CERT_DAYS) -> None:
        self.ca_dir = ca_dir
        self.device_cert_days = device_cert_days
        self._server_root: _Authority | None = None
        self._device_ca: _Authority | None = None
        self._platform_ca: _Authority | None = None
        #: Where the device CA's CRL is served (``GET /ca/device.crl``), named in the device
        #: certificates issued from then on; None: not named.
        self.device_crl_url: str | None = None

    # --- file layout -----------------------------------------------------------------

    @property
    def server_root_ca_path(self) -> Path:
        return self.ca_dir / "server-root-ca.pem"

    @property
    def server_root_ca_key_path(self) -> Path:
        return self.ca_dir / "server-root-ca.key"

    @property
    def ca_bundle_path(self) -> Path:
        """What a client trusts to verify the broker (the server root CA)."""
        return self.ca_dir / "ca-bundle.pem"

    @property
    def broker_cert_path(self) -> Path:
        return self.ca_dir / "broker.pem"

    @property
    def broker_key_path(self) -> Path:
        return self.ca_dir / "broker.key"

    @property
    def device_ca_path(self) -> Path:
        return self.ca_dir / "device-ca.pem"

    @property
    def device_ca_key_path(self) -> Path:
        return self.ca_dir / "device-ca.key"

    @property
    def platform_ca_path(self) -> Path:
        return self.ca_dir / "platform-ca.pem"

    @property
    def platform_ca_key_path(self) -> Path:
        return self.ca_dir / "platform-ca.key"

    @property
    def client_ca_bundle_path(self) -> Path:
        """Device CA + platform CA: whom the device listener accepts as clients."""
        return self.ca_dir / "client-ca-bundle.pem"

    @property
    def platform_cert_path(self) -> Path:
        return self.ca_dir / "platform.pem"

    @property
    def platform_key_path(self) -> Path:
        return self.ca_dir / "platform.key"

    @property
    def operator_cert_path(self) -> Path:
        return self.ca_dir / "operator.pem"

    @property
    def operator_key_path(self) -> Path:
        return self.ca_dir / "operator.key"

    @property
    def revoked_path(self) -> Path:
        return self.ca_dir / "revoked.json"

    @property
    def crl_path(self) -> Path:
        """One PEM file with a CRL of the device CA and one of the platform CA."""
        return self.ca_dir / "crl.pem"

    @property
    def device_crl_path(self) -> Path:
        """The device CA's CRL alone, DER, as served at :data:`DEVICE_CRL_PATH`."""
        return self.ca_dir / "device.crl"

    # --- public API --------------------------------------------------------------------

    @property
    def server_root_ca_pem(self) -> str:
        return _cert_pem(self._server_root_ca().cert).decode()

    @property
    def device_ca_certificate(self) -> x509.Certificate:
        return self._device().cert

    @property
    def platform_ca_certificate(self) -> x509.Certificate:
        return self._platform().cert

    def ensure(self) -> None:
        """Create what is missing under ``ca_dir`` and load the rest; idempotent."""
        ensure_private_dir(self.ca_dir)
        self._server_root = self._ensure_ca(
            self.server_root_ca_path,
            self.server_root_ca_key_path,
            "iotref sandbox Root CA 1",
            rsa_bits=2048,
        )
        self._device_ca = self._ensure_ca(
            self.device_ca_path,
            self.device_ca_key_path,
            "iotref sandbox Device CA",
        )
        self._platform_ca = self._ensure_ca(
            self.platform_ca_path,
            self.platform_ca_key_path,
            "iotref sandbox Platform CA",
        )
        self._ensure_leaf(
            self._server_root,
            self.broker_cert_path,
            self.broker_key_path,
            "localhost",
            server=True,
            rsa_bits=2048,
        )
        self._ensure_leaf(
            self._platform_ca,
            self.platform_cert_path,
            self.platform_key_path,
            PLATFORM_IDENTITY,
            server=False,
        )
        self._ensure_leaf(
            self._platform_ca,
            self.operator_cert_path,
            self.operator_key_path,
            OPERATOR_IDENTITY,
            server=False,
        )
        self._write_if_changed(self.ca_bundle_path, _cert_pem(self._server_root.cert))
        self._write_if_changed(
            self.client_ca_bundle_path,
            _cert_pem(self._device_ca.cert) + _cert_pem(self._platform_ca.cert),
        )
        self.write_crl()

    def sign_device_csr(
        self, csr: x509.CertificateSigningRequest, client_id: str
    ) -> x509.Certificate:
        """A device certificate for the CSR's key: CN = ``client_id``, clientAuth only; it
        names :attr:`device_crl_url` as its CRL distribution point when that is set."""
        check_device_public_key(csr)
        ca = self._device()
        public_key = csr.public_key()
        assert isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, client_id)]))
            .issuer_name(ca.name)
            .public_key(public_key)
            .serial_number(_random_serial())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + dt.timedelta(days=self.device_cert_days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False, key=public_key), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                critical=False,
            )
        )
        if self.device_crl_url:
            point = x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(self.device_crl_url)],
                relative_name=None,
                reasons=None,
                crl_issuer=None,
            )
            builder = builder.add_extension(x509.CRLDistributionPoints([point]), critical=False)
        return builder.sign(ca.key, hashes.SHA256())

    def revoke(self, serial: int) -> None:
        """Revoke a device certificate by serial and rewrite the CRL file (idempotent)."""
        revoked = self.revoked_serials()
        if serial not in revoked:
            revoked[serial] = _now()
            data = {
                "device": [
                    {"serial": format(s, "x"), "revoked_at": when.isoformat()}
                    for s, when in sorted(revoked.items())
                ]
            }
            write_atomic(
                self.revoked_path, (json.dumps(data, indent=2) + "\n").encode(), PUBLIC_FILE_MODE
            )
            log.info("revoked device certificate serial %x", serial)
        self.write_crl()

    def is_revoked(self, serial: int) -> bool:
        return serial in self.revoked_serials()

    def revoked_serials(self) -> dict[int, dt.datetime]:
        """Revoked device certificate serials and when they were revoked."""
        try:
            raw = json.loads(self.revoked_path.read_text())
        except FileNotFoundError:
            return {}
        result: dict[int, dt.datetime] = {}
        for entry in raw.get("device", []):
            result[int(entry["serial"], 16)] = dt.datetime.fromisoformat(entry["revoked_at"])
        return result

    def write_crl(self) -> None:
        """Write fresh CRLs of the platform CA and the device CA into :attr:`crl_path`.

        OpenSSL's CRL check needs a CRL for the issuer of every client certificate, so both
        client CAs get one (the platform CA's is empty), in one PEM file.
        """
        platform = self._build_crl(self._platform(), {})
        device = self._build_crl(self._device(), self.revoked_serials())
        pem = platform.public_bytes(serialization.Encoding.PEM) + device.public_bytes(
            serialization.Encoding.PEM
        )
        write_atomic(self.crl_path, pem, PUBLIC_FILE_MODE)
        write_atomic(
            self.device_crl_path, device.public_bytes(serialization.Encoding.DER), PUBLIC_FILE_MODE
        )

    # --- internals ---------------------------------------------------------------------

    def _server_root_ca(self) -> _Authority:
        if self._server_root is None:
            raise RuntimeError("CertificateAuthorities.ensure() has not run")
        return self._server_root

    def _device(self) -> _Authority:
        if self._device_ca is None:
            raise RuntimeError("CertificateAuthorities.ensure() has not run")
        return self._device_ca

    def _platform(self) -> _Authority:
        if self._platform_ca is None:
            raise RuntimeError("CertificateAuthorities.ensure() has not run")
        return self._platform_ca

    @staticmethod
    def _new_key(rsa_bits: int | None) -> PrivateKey:
        if rsa_bits:
            return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
        return ec.generate_private_key(ec.SECP256R1())

    @staticmethod
    def _load(cert_path: Path, key_path: Path) -> _Authority | None:
        if not (cert_path.exists() and key_path.exists()):
            return None
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path}: unsupported key type")
        if os.stat(key_path).st_mode & 0o077:
            os.chmod(key_path, 0o600)
        return _Authority(cert, key)

    def _store(self, cert_path: Path, key_path: Path, authority: _Authority) -> None:
        write_atomic(key_path, _key_pem(authority.key), PRIVATE_FILE_MODE)
        write_atomic(cert_path, _cert_pem(authority.cert), PUBLIC_FILE_MODE)

    def _ensure_ca(
        self, cert_path: Path, key_path: Path, common_name: str, rsa_bits: int | None = None
    ) -> _Authority:
        existing = self._load(cert_path, key_path)
        if existing is not None:
            return existing
        key = self._new_key(rsa_bits)
        now = _now()
        name = _name(common_name)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(_random_serial())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True, key=key.public_key()), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        authority = _Authority(cert, key)
        self._store(cert_path, key_path, authority)
        log.info("created %s", common_name)
        return authority

    def _ensure_leaf(
        self,
        issuer: _Authority,
        cert_path: Path,
        key_path: Path,
        common_name: str,
        *,
        server: bool,
        rsa_bits: int | None = None,
    ) -> None:
        existing = self._load(cert_path, key_path)
        if existing is not None and self._leaf_usable(existing.cert, issuer):
            return
        key = existing.key if existing is not None else self._new_key(rsa_bits)
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(issuer.name)
            .public_key(key.public_key())
            .serial_number(_random_serial())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + dt.timedelta(days=SERVICE_CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False, key=key.public_key()), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.IPAddress(ipaddress.ip_address("::1")),
                    ]
                ),
                critical=False,
            )
        cert = builder.sign(issuer.key, hashes.SHA256())
        self._store(cert_path, key_path, _Authority(cert, key))
        log.info("issued certificate for %s", common_name)

    @staticmethod
    def _leaf_usable(cert: x509.Certificate, issuer: _Authority) -> bool:
        if cert.issuer != issuer.name:
            return False
        try:
            cert.verify_directly_issued_by(issuer.cert)
        except Exception:  # wrong key, bad signature: issue a new one
            return False
        return cert.not_valid_after_utc - _now() > RENEW_BEFORE

    def _build_crl(
        self, ca: _Authority, revoked: dict[int, dt.datetime]
    ) -> x509.CertificateRevocationList:
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca.name)
            .last_update(now - CLOCK_SKEW)
            .next_update(now + dt.timedelta(days=CRL_DAYS))
            .add_extension(x509.CRLNumber(time.time_ns() // 1000), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                critical=False,
            )
        )
        for serial, when in revoked.items():
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
            )
        return builder.sign(ca.key, hashes.SHA256())

    @staticmethod
    def _write_if_changed(path: Path, data: bytes) -> None:
        try:
            if path.read_bytes() == data:
                return
        except FileNotFoundError:
            pass
        write_atomic(path, data, PUBLIC_FILE_MODE)
