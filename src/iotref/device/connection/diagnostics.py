"""Why a connection failed, in words: awscrt's error names and CONNACK codes described
(:func:`describe_failure`), a TLS probe with Python's own ``ssl`` that names what awscrt
reports generically (:func:`diagnose_tls`), a revoked device certificate, and the first
connect of a start that fails fast on what retrying cannot fix (:func:`wait_first_connect`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable

from awscrt import mqtt5

from iotref.device import stdlib_compat
from iotref.device.connection.errors import ConnectionFailed, MqttError
from iotref.device.connection.settings import ALPN_PROTOCOL, ConnectionSettings
from iotref.device.connection.takeover import HANGUP_ERRORS
from iotref.device.onboarding.next_steps import run

FATAL_CONNACK_CODES = frozenset(
    {
        mqtt5.ConnectReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
        mqtt5.ConnectReasonCode.BAD_USERNAME_OR_PASSWORD,
        mqtt5.ConnectReasonCode.NOT_AUTHORIZED,
        mqtt5.ConnectReasonCode.BANNED,
        mqtt5.ConnectReasonCode.BAD_AUTHENTICATION_METHOD,
        mqtt5.ConnectReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
    }
)
"""CONNACK reason codes that no retry can change."""

log = logging.getLogger("iotref.connection")


_CRT_ERROR_NAME = re.compile(r"\((AWS_ERROR_[A-Z0-9_]+)\)")


def crt_error_name(exc: BaseException | None) -> str | None:
    """awscrt's error name of ``exc`` (an ``AwsCrtError``'s ``name``, or the name in the
    ``RuntimeError`` that awscrt raises at once, "5143 (AWS_ERROR_...): ..."), else the
    exception's type."""
    if exc is None:
        return None
    name = getattr(exc, "name", None)
    if name:
        return str(name)
    found = _CRT_ERROR_NAME.search(str(exc)) if isinstance(exc, RuntimeError) else None
    return found.group(1) if found else type(exc).__name__


def describe_failure(
    settings: ConnectionSettings, error_name: str | None, connack_code: int | None
) -> ConnectionFailed:
    """A :class:`ConnectionFailed` that says in words why a connection attempt failed."""
    where = settings.where()
    if connack_code is not None and connack_code >= 0x80:
        try:
            label = mqtt5.ConnectReasonCode(connack_code).name
        except ValueError:
            label = "unknown"
        return ConnectionFailed(
            f"the broker at {where} refused the connection of client id "
            f"{settings.client_id!r}: {label} (0x{connack_code:02X})",
            "check that the certificate belongs to this client id and is not revoked",
            kind="refused",
            error_name=error_name,
        )
    name = error_name or "unknown error"
    if name.startswith("AWS_IO_TLS"):
        return ConnectionFailed(
            f"the TLS handshake with {where} failed ({name})",
            "check that the CA file holds the server's root CA, that the endpoint name "
            "matches the server certificate, and that the device certificate and key "
            "belong together and are accepted by the platform",
            kind="tls",
            error_name=error_name,
        )
    if name in HANGUP_ERRORS:
        return ConnectionFailed(
            f"{where} closed the connection during the handshake ({name})",
            "the broker probably did not accept the device certificate",
            kind="refused",
            error_name=error_name,
        )
    if name.startswith(("AWS_IO_SOCKET", "AWS_IO_DNS")) or "TIMEOUT" in name:
        return ConnectionFailed(
            f"{where} is unreachable ({name})",
            "check the endpoint, the port and the network",
            kind="unreachable",
            error_name=error_name,
        )
    return ConnectionFailed(
        f"connecting to {where} failed ({name})", kind="other", error_name=error_name
    )


def diagnose_tls(settings: ConnectionSettings, timeout_s: float = 3.0) -> ConnectionFailed | None:
    """Probe ``settings`` with Python's own TLS (same files, same checks) and say what is
    wrong, or ``None`` if the TLS handshake works. Blocking; run it in a thread. Makes no
    MQTT connection, so it never takes a session over."""
    where = settings.where()
    try:
        context = ssl.create_default_context(cafile=str(settings.ca_path))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(settings.cert_path), str(settings.key_path))
        if settings.alpn:
            context.set_alpn_protocols([ALPN_PROTOCOL])
    except (OSError, ssl.SSLError, ValueError) as exc:
        return ConnectionFailed(
            f"cannot use the device certificate, key or CA file: {exc}",
            "check that the files are PEM and that the key belongs to the certificate",
            kind="config",
        )
    try:
        with (
            socket.create_connection((settings.endpoint, settings.port), timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=settings.endpoint) as tls,
        ):
            # A refused client certificate may only show on the first read (TLS 1.3).
            tls.settimeout(min(0.5, timeout_s))
            try:
                if tls.recv(1) == b"":
                    return ConnectionFailed(
                        f"{where} closed the connection right after the TLS handshake",
                        "the broker probably did not accept the device certificate",
                        kind="tls",
                    )
            except TimeoutError:
                return None  # the broker waits for CONNECT: TLS is fine
    except ssl.SSLCertVerificationError as exc:
        detail = exc.verify_message or str(exc)
        if "hostname" in detail.lower() or "match" in detail.lower():
            reason = f"the server certificate of {where} is not valid for {settings.endpoint!r}"
            step = "connect with the host name the platform gave you (mqtt_endpoint)"
        else:
            reason = f"the server certificate of {where} is not trusted: {detail}"
            step = f"check that {settings.ca_path} holds the platform's server root CA"
        return ConnectionFailed(reason, step, kind="tls")
    except ssl.SSLError as exc:
        text = (exc.reason or str(exc)).lower()
        if "revoked" in text:
            return revoked_failure(where, exc.reason or str(exc))
        if any(w in text for w in ("certificate", "unknown_ca", "unknown ca", "bad cert")):
            return ConnectionFailed(
                f"{where} did not accept the device certificate ({exc.reason or exc})",
                "check that the device certificate was issued by the platform for this "
                "environment and is not revoked",
                kind="tls",
            )
        return ConnectionFailed(
            f"the TLS handshake with {where} failed ({exc.reason or exc})", kind="tls"
        )
    except (ConnectionResetError, BrokenPipeError) as exc:
        return ConnectionFailed(
            f"{where} closed the connection during the TLS handshake ({exc})",
            "the broker probably did not accept the device certificate",
            kind="tls",
        )
    except OSError as exc:
        return ConnectionFailed(
            f"{where} is unreachable ({exc})",
            "check the endpoint, the port and the network",
            kind="unreachable",
        )
    return None


def is_fatal(failure: ConnectionFailed, connack_code: int | None) -> bool:
    """Whether retrying cannot fix ``failure`` (a TLS failure, or a CONNACK refusing this
    identity): the first connect with ``fail_fast`` gives up at once."""
    if failure.kind == "tls":
        return True
    return connack_code is not None and connack_code in FATAL_CONNACK_CODES


#: What to do about a revoked device certificate.
REVOKED_NEXT_STEP = run(
    "provision",
    "--renew",
    before="a revoked certificate is never accepted again:",
    then="for a new key and certificate",
)


def revoked_failure(where: str, detail: str) -> ConnectionFailed:
    """The broker refused the device certificate because it is revoked."""
    return ConnectionFailed(
        f"{where} refused the device certificate: it is revoked ({detail})",
        REVOKED_NEXT_STEP,
        kind="tls",
        revoked=True,
    )


def probe_tls_in_background(
    settings: ConnectionSettings, on_found: Callable[[ConnectionFailed], None]
) -> None:
    """Run :func:`diagnose_tls` on a daemon thread and call ``on_found`` (on that thread)
    with what is wrong, if anything."""

    def probe() -> None:
        try:
            found = diagnose_tls(settings, 3.0)
        except Exception:  # a probe only: never let it take anything down
            log.debug("connection: TLS probe failed", exc_info=True)
            return
        if found is not None:
            on_found(found)

    threading.Thread(target=probe, name="iotref-tls-probe", daemon=True).start()


async def wait_first_connect(
    waiter: asyncio.Future[None],
    settings: ConnectionSettings,
    last_failure: Callable[[], ConnectionFailed | None],
    stop: Callable[[], Awaitable[None]],
) -> None:
    """Wait for ``waiter`` (the first CONNECTED) at most ``connect_timeout_s``; on failure
    ``stop`` the connection and raise a :class:`ConnectionFailed` that says why (from
    ``last_failure``, the last attempt's, or a TLS probe). With ``fail_fast``, a TLS probe
    after a short wait gives up at once on a TLS or configuration error."""
    timeout = settings.connect_timeout_s
    try:
        async with stdlib_compat.timeout(timeout):
            if settings.fail_fast:
                # awscrt (s2n) reports TLS failures only after a "blinding" delay of
                # 10-30 s; a quick TLS probe tells at once what is wrong.
                done, _ = await asyncio.wait({waiter}, timeout=min(1.0, timeout / 4))
                if not done:
                    found = await asyncio.to_thread(diagnose_tls, settings, max(1.0, timeout / 2))
                    if found is not None and found.kind in ("tls", "config"):
                        if not waiter.done():
                            waiter.cancel()
                        raise found
            await waiter
    except TimeoutError:
        failure = last_failure()
        if failure is None:
            failure = await asyncio.to_thread(diagnose_tls, settings, 3.0)
        failure = failure or ConnectionFailed(
            f"no connection to {settings.where()} within {timeout:g} s",
            "check the endpoint, the port and the network",
            kind="unreachable",
        )
        await stop()
        raise failure.copy() from None
    except ConnectionFailed as exc:
        await stop()
        if exc.kind == "tls" and not exc.revoked:
            # awscrt's TLS errors are generic (AWS_IO_TLS_ERROR_READ_FAILURE); Python's
            # handshake names the cause, e.g. the broker's "certificate revoked" alert.
            found = await asyncio.to_thread(diagnose_tls, settings, 3.0)
            if found is not None and found.kind in ("tls", "config"):
                raise found from None
        raise
    except MqttError:
        await stop()
        raise
