"""Keys, CSRs and self-signed certificates of every kind the tests need, and files of a
device's credentials."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

KEY_TYPES = ("rsa2048", "rsa1024", "ec-p256", "ec-p384", "ec-p521", "ec-secp256k1", "ed25519")

AnyKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def make_key(key_type: str = "ec-p256") -> AnyKey:
    if key_type.startswith("rsa"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[3:]))
    curves: dict[str, ec.EllipticCurve] = {
        "ec-p256": ec.SECP256R1(),
        "ec-p384": ec.SECP384R1(),
        "ec-p521": ec.SECP521R1(),
        "ec-secp256k1": ec.SECP256K1(),
    }
    if key_type in curves:
        return ec.generate_private_key(curves[key_type])
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(key_type)


def make_csr(key: AnyKey, common_name: str = "my-press") -> str:
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, algorithm)
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def self_signed_pem(key: AnyKey, common_name: str, *, ca: bool = False, days: int = 1) -> bytes:
    """A certificate of ``key`` signed by itself, for ``common_name``, valid from five
    minutes ago for ``days`` (PEM)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(key, algorithm)
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def self_signed(directory: Path, name: str, *, ca: bool = False) -> tuple[Path, Path]:
    """A new EC P-256 key and its self-signed certificate for ``name``, as the files
    ``directory/name.pem`` and ``directory/name.key``; returns their paths."""
    key = make_key("ec-p256")
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(self_signed_pem(key, name, ca=ca))
    key_path.write_bytes(key_pem(key))
    return cert_path, key_path


def corrupt_csr_signature(pem: str) -> str:
    """The same CSR with one bit of its signature flipped."""
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01
    csr = x509.load_der_x509_csr(bytes(der))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def key_pem(key: AnyKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class DeviceFiles:
    client_id: str
    cert_path: Path
    key_path: Path
    cert_pem: str
    org_id: str = ""

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem.encode())


def write_device(
    directory: Path, client_id: str, key: AnyKey, cert_pem: str, org_id: str = ""
) -> DeviceFiles:
    directory.mkdir(parents=True, exist_ok=True)
    key_path = directory / f"{client_id}.key"
    cert_path = directory / f"{client_id}.pem"
    key_path.write_bytes(key_pem(key))
    key_path.chmod(0o600)
    cert_path.write_text(cert_pem)
    return DeviceFiles(client_id, cert_path, key_path, cert_pem, org_id)
