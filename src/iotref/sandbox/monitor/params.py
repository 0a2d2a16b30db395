"""The monitor's request parameters, checked: a malformed one is a 400 JSON error."""

from __future__ import annotations

import re

from starlette.requests import Request

from iotref.sandbox.http_errors import ApiError

CLIENT_ID = re.compile(r"^[A-Za-z0-9:_.\-?]{1,128}$")
"""A client id as the monitor takes it in a path or a query."""
MAX_LIMIT = 500
"""Most messages in one page of a device's messages."""
SQLITE_MAX_INT = 2**63 - 1


def client_id_of(request: Request) -> str:
    """The ``client_id`` path parameter; 400 if it is malformed."""
    client_id = str(request.path_params["client_id"])
    if not CLIENT_ID.fullmatch(client_id):
        raise ApiError(400, "invalid_request", "malformed client id")
    return client_id


def int_param(request: Request, name: str, default: int | None, low: int, high: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    # ASCII digits only ("²".isdigit() is true, int("²") fails), and few enough for int().
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 20) or not low <= int(raw) <= high:
        raise ApiError(400, "invalid_request", f"{name} must be an integer from {low} to {high}")
    return int(raw)


def flag(request: Request, name: str) -> bool:
    raw = request.query_params.get(name, "").lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise ApiError(400, "invalid_request", f"{name} must be 1 or 0")
