"""The device's private key and its certificate signing request.

The key is made on the device and never leaves it (contract section 4): only the CSR,
which carries the public key, is sent. Key types are the ones AWS IoT Core and the
sandbox accept: EC P-256 / P-384 and RSA 2048 / 3072.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from iotref.device.stdlib_compat import StrEnum

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class KeyType(StrEnum):
    """``--key-type`` values."""

    EC256 = "ec256"
    EC384 = "ec384"
    RSA2048 = "rsa2048"
    RSA3072 = "rsa3072"


DEFAULT_KEY_TYPE = KeyType.EC256


def generate_private_key(key_type: KeyType | str = DEFAULT_KEY_TYPE) -> PrivateKey:
    """A new private key of ``key_type``."""
    kind = KeyType(key_type)
    if kind is KeyType.EC256:
        return ec.generate_private_key(ec.SECP256R1())
    if kind is KeyType.EC384:
        return ec.generate_private_key(ec.SECP384R1())
    size = 2048 if kind is KeyType.RSA2048 else 3072
    return rsa.generate_private_key(public_exponent=65537, key_size=size)


def private_key_pem(key: PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted: the store protects it with file modes, as the platform's
    reference client and the AWS IoT device SDKs expect a plain PEM key file."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(pem: bytes) -> PrivateKey:
    """A PEM private key of a supported type; ``ValueError`` otherwise (the message never
    contains key material)."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        kind = "encrypted" if isinstance(exc, TypeError) else "not a readable PEM private key"
        raise ValueError(kind) from None
    except Exception:  # cryptography raises UnsupportedAlgorithm and friends
        raise ValueError("not a readable PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"unsupported key type {type(key).__name__}")
    return key


def describe_key(key: PrivateKey | PublicKey) -> str:
    """``EC P-256``, ``RSA 3072``..."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        names = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
        return f"EC {names.get(key.curve.name, key.curve.name)}"
    return f"RSA {key.key_size}"


def _hash_for(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def build_csr(key: PrivateKey, common_name: str, organization: str | None = None) -> bytes:
    """A PEM PKCS#10 request for ``key`` with subject ``CN=common_name`` (the platform
    chooses the certificate's real subject; the CN only helps people reading it)."""
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64] or "iotref device")]
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization[:64]))
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(attributes))
        .sign(key, _hash_for(key))
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def public_key_der(key: PrivateKey | PublicKey) -> bytes:
    public = (
        key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) else key
    )
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_matches_certificate(key: PrivateKey, certificate: x509.Certificate) -> bool:
    """Whether ``certificate`` certifies ``key``'s public key."""
    return public_key_der(key) == certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
