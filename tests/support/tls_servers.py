"""TLS servers that a device must refuse, and the certificates they present: an impostor
with a certificate from another CA, a server whose certificate (from the right CA) names
another host, and a server that speaks nothing newer than TLS 1.1.

Each :class:`TlsServer` records what happened on its side: handshakes completed and
failed, and application bytes received (an MQTT CONNECT would be the first), so a test can
prove that the device refused before it said anything.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class ServerIdentity:
    """A server certificate and key as files."""

    cert_path: Path
    key_path: Path


def issue_server_cert(
    ca_cert_path: Path,
    ca_key_path: Path,
    directory: Path,
    host: str,
    *,
    days: int = 30,
) -> ServerIdentity:
    """A TLS server certificate for ``host`` (CN and DNS SAN) signed by the given CA."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    names: list[x509.GeneralName] = [x509.DNSName(host)]
    with contextlib.suppress(ValueError):
        names = [x509.IPAddress(ipaddress.ip_address(host))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / f"{host}.pem"
    key_path = directory / f"{host}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return ServerIdentity(cert_path, key_path)


class TlsServer:
    """A TLS server on 127.0.0.1 in a thread: handshakes, then reads and counts what the
    client sends (it never answers). ``client_ca``: ask for a client certificate issued by
    it. ``max_version`` limits the protocol it speaks."""

    def __init__(
        self,
        identity: ServerIdentity,
        *,
        client_ca: Path | None = None,
        max_version: ssl.TLSVersion | None = None,
    ) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if client_ca is not None:
            # Ask for the device certificate like the platform does: awscrt (s2n) with a
            # client certificate fails a handshake with a server that does not ask.
            context.load_verify_locations(client_ca)
            context.verify_mode = ssl.CERT_OPTIONAL
        if max_version is not None:
            # Old protocols need the lowest security level of this OpenSSL build.
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = max_version
        context.load_cert_chain(identity.cert_path, identity.key_path)
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.handshakes_ok = 0
        self.handshakes_failed = 0
        self.app_bytes = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="tls-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                raw, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(raw,), daemon=True).start()

    def _handle(self, raw: socket.socket) -> None:
        raw.settimeout(5)
        try:
            with self.context.wrap_socket(raw, server_side=True) as tls:
                self.handshakes_ok += 1
                with contextlib.suppress(OSError):
                    while data := tls.recv(4096):
                        self.app_bytes += len(data)
        except (OSError, ssl.SSLError) as exc:
            self.handshakes_failed += 1
            self.errors.append(str(exc))
        finally:
            raw.close()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._thread.join(2)

    def __enter__(self) -> TlsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tls11_handshake_possible(port: int, ca_file: Path) -> bool:
    """Whether a client that allows TLS 1.1 completes a handshake with ``port`` (a control:
    the TLS 1.1 server really speaks TLS 1.1 on this machine's OpenSSL)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.load_verify_locations(ca_file)
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            return tls.version() in ("TLSv1.1", "TLSv1")
    except (OSError, ssl.SSLError):
        return False
