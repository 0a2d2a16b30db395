"""Keys and CSRs made on the device."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from iotref.device.onboarding.keys import (
    KeyType,
    build_csr,
    describe_key,
    generate_private_key,
    key_matches_certificate,
    load_private_key,
    private_key_pem,
)
from tests.support.device_keys import self_signed_pem


@pytest.mark.parametrize(
    ("key_type", "description", "hash_name"),
    [
        (KeyType.EC256, "EC P-256", "sha256"),
        (KeyType.EC384, "EC P-384", "sha384"),
        (KeyType.RSA2048, "RSA 2048", "sha256"),
        (KeyType.RSA3072, "RSA 3072", "sha256"),
    ],
)
def test_key_and_csr(key_type: KeyType, description: str, hash_name: str) -> None:
    key = generate_private_key(key_type)
    assert describe_key(key) == description
    csr = x509.load_pem_x509_csr(build_csr(key, "machine-1", "ACME"))
    assert csr.is_signature_valid
    assert csr.signature_hash_algorithm is not None
    assert csr.signature_hash_algorithm.name == hash_name
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "machine-1"
    assert csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pem = private_key_pem(key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert describe_key(load_private_key(pem)) == description


def test_key_type_from_string() -> None:
    assert isinstance(generate_private_key("ec256"), ec.EllipticCurvePrivateKey)
    assert isinstance(generate_private_key("rsa2048"), rsa.RSAPrivateKey)
    with pytest.raises(ValueError):
        generate_private_key("dsa1024")


def test_load_private_key_errors_carry_no_key_material() -> None:
    with pytest.raises(ValueError, match="not a readable PEM private key") as info:
        load_private_key(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    assert "AAAA" not in str(info.value)
    encrypted = generate_private_key(KeyType.EC256).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    with pytest.raises(ValueError, match="encrypted"):
        load_private_key(encrypted)
    other = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValueError, match="unsupported key type"):
        load_private_key(other)


def test_key_matches_certificate() -> None:
    key = generate_private_key(KeyType.EC256)
    other = generate_private_key(KeyType.EC256)
    cert = x509.load_pem_x509_certificate(self_signed_pem(key, "t"))
    assert key_matches_certificate(key, cert)
    assert not key_matches_certificate(other, cert)
