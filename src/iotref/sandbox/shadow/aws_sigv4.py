"""Verification of AWS Signature Version 4 (``Authorization: AWS4-HMAC-SHA256 ...``).

Just enough of the SigV4 specification for AWS's own clients (boto3's ``iot-data``) to talk
to the sandbox's REST data plane with the credentials the sandbox issues: canonical request
(URI normalized and encoded again, sorted query, signed headers, payload hash), string to
sign, derived signing key, constant-time comparison and a clock-skew window.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import quote, unquote

ALGORITHM = "AWS4-HMAC-SHA256"
MAX_CLOCK_SKEW = dt.timedelta(minutes=15)
_AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256\s+Credential=(?P<credential>[^,\s]+)\s*,\s*"
    r"SignedHeaders=(?P<signed>[^,\s]+)\s*,\s*Signature=(?P<signature>[0-9a-fA-F]+)\s*$"
)


class SignatureError(Exception):
    """The request is not signed correctly; the message is safe to show to the caller."""


@dataclass(frozen=True)
class SignedRequest:
    """What a signature covers."""

    method: str
    raw_path: str
    """The path exactly as sent, still percent-encoded."""
    query: Iterable[tuple[str, str]]
    """Decoded query parameters."""
    headers: Mapping[str, list[str]]
    """Lower-case header names to their values."""
    body: bytes


def is_sigv4(authorization: str | None) -> bool:
    return bool(authorization) and str(authorization).startswith(ALGORITHM + " ")


def _remove_dot_segments(path: str) -> str:
    if not path:
        return "/"
    out: list[str] = []
    for segment in path.split("/"):
        if segment == ".":
            continue
        if segment == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    result = "/".join(out)
    if not result.startswith("/"):
        result = "/" + result
    if path.endswith(("/", "/.", "/..")) and not result.endswith("/"):
        result += "/"
    return result


def canonical_uri(raw_path: str) -> str:
    """The path normalized, then URI-encoded once more (the rule for non-S3 services)."""
    return quote(_remove_dot_segments(raw_path), safe="/~")


def canonical_query(query: Iterable[tuple[str, str]]) -> str:
    pairs = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in query)
    return "&".join(f"{k}={v}" for k, v in pairs)


def _trim(value: str) -> str:
    return " ".join(value.split())


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = hmac.new(f"AWS4{secret}".encode(), date.encode(), hashlib.sha256).digest()
    for part in (region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def verify(
    request: SignedRequest,
    authorization: str,
    *,
    access_key_id: str,
    secret_access_key: str,
    region: str,
    service: str,
    now: dt.datetime | None = None,
) -> None:
    """Raise :class:`SignatureError` unless ``authorization`` is a valid signature of
    ``request`` by ``access_key_id`` for ``region`` and ``service``."""
    match = _AUTH_RE.match(authorization.strip())
    if match is None:
        raise SignatureError("Authorization header is not a valid AWS4-HMAC-SHA256 header")
    parts = match["credential"].split("/")
    if len(parts) != 5 or parts[4] != "aws4_request":
        raise SignatureError("Credential is not of the form KEY/DATE/REGION/SERVICE/aws4_request")
    key_id, date, cred_region, cred_service, _ = parts
    if not hmac.compare_digest(key_id.encode(), access_key_id.encode()):
        raise SignatureError("The security token included in the request is invalid")
    if cred_region != region:
        raise SignatureError(f"Credential should be scoped to a valid region, not '{cred_region}'")
    if cred_service != service:
        raise SignatureError(f"Credential should be scoped to correct service: '{service}'")
    amz_dates = request.headers.get("x-amz-date")
    if not amz_dates:
        raise SignatureError("Missing X-Amz-Date header")
    amz_date = amz_dates[0].strip()
    try:
        when = dt.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        raise SignatureError("X-Amz-Date is not of the form YYYYMMDD'T'HHMMSS'Z'") from None
    if amz_date[:8] != date:
        raise SignatureError("Credential date does not match X-Amz-Date")
    current = now or dt.datetime.now(dt.timezone.utc)
    if abs(current - when) > MAX_CLOCK_SKEW:
        raise SignatureError("Signature expired: the request time is too far from now")
    signed = match["signed"].lower().split(";")
    if "host" not in signed:
        raise SignatureError("The host header must be signed")
    header_lines = []
    for name in signed:
        values = request.headers.get(name)
        if values is None:
            raise SignatureError(f"Signed header '{name}' is missing from the request")
        header_lines.append(f"{name}:{','.join(_trim(v) for v in values)}")
    content_sha = request.headers.get("x-amz-content-sha256")
    payload_hash = (
        content_sha[0].strip() if content_sha else hashlib.sha256(request.body).hexdigest()
    )
    if payload_hash != "UNSIGNED-PAYLOAD" and not hmac.compare_digest(
        payload_hash, hashlib.sha256(request.body).hexdigest()
    ):
        raise SignatureError("The provided x-amz-content-sha256 does not match the body")
    canonical = "\n".join(
        [
            request.method.upper(),
            canonical_uri(request.raw_path),
            canonical_query(request.query),
            "\n".join(header_lines) + "\n",
            ";".join(signed),
            payload_hash,
        ]
    )
    scope = f"{date}/{cred_region}/{cred_service}/aws4_request"
    string_to_sign = "\n".join(
        [ALGORITHM, amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    expected = hmac.new(
        signing_key(secret_access_key, date, cred_region, cred_service),
        string_to_sign.encode(),
        hashlib.sha256,
    ).hexdigest()
    if not hmac.compare_digest(expected, match["signature"].lower()):
        raise SignatureError(
            "The request signature we calculated does not match the signature you provided"
        )


def decode_query(raw_query: bytes | str) -> list[tuple[str, str]]:
    """Split a raw query string into decoded pairs, keeping blanks and order."""
    text = raw_query.decode("latin-1") if isinstance(raw_query, bytes) else raw_query
    pairs = []
    for item in text.split("&"):
        if not item:
            continue
        key, _, value = item.partition("=")
        pairs.append((unquote(key.replace("+", " ")), unquote(value.replace("+", " "))))
    return pairs
