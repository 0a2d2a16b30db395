"""What the sandbox's OpenAPI fragments are made of, and how they combine.

A *fragment* is a partial OpenAPI 3.0 document, ``{"paths": {...}, "components": {...}}``:
each service writes the fragment of its routes beside them and its component returns it
from ``openapi()``; :mod:`iotref.sandbox.openapi` assembles them. Here: the building blocks
(references, JSON and HTML answers), the parts every fragment may use (the admin and
directory bearer schemes, the sandbox's JSON error and its reusable answers, in
:func:`common_fragment`) and :func:`merge`, which refuses conflicting definitions.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

Fragment = dict[str, Any]
"""A partial OpenAPI document: ``{"paths": {...}, "components": {...}}`` (both optional)."""

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

# Security scheme names that several services' fragments use.
DIRECTORY_BEARER = "directoryBearer"
ADMIN_BEARER = "adminBearer"

TAG_SANDBOX = "Sandbox"
"""The tag of the sandbox's own routes (``/healthz``, ``/openapi.json``)."""


class FragmentConflict(ValueError):
    """Two fragments define the same operation, or the same component differently."""


def ref(kind: str, name: str) -> dict[str, str]:
    """``{"$ref": "#/components/<kind>/<name>"}``."""
    return {"$ref": f"#/components/{kind}/{name}"}


def schema_ref(name: str) -> dict[str, str]:
    return ref("schemas", name)


def response_ref(name: str) -> dict[str, str]:
    return ref("responses", name)


def json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def json_response(description: str, schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": json_content(schema), **extra}


def html_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/html": {"schema": {"type": "string"}}}}


def error_response(description: str, schema_name: str) -> dict[str, Any]:
    """A JSON answer whose body is the component schema ``schema_name``."""
    return json_response(description, schema_ref(schema_name))


def standard_error_responses() -> dict[str, Any]:
    """Reusable ``components.responses`` for the JSON errors of :mod:`http_errors`."""
    challenge = {
        "WWW-Authenticate": {
            "description": "The bearer challenge (RFC 6750).",
            "schema": {"type": "string"},
        }
    }
    return {
        "BadRequest": error_response("The request is malformed.", "Error"),
        "Unauthorized": {
            **error_response("No or no valid credentials.", "Error"),
            "headers": challenge,
        },
        "Forbidden": error_response("The credentials do not allow this.", "Error"),
        "NotFound": error_response("There is no such resource.", "Error"),
        "PayloadTooLarge": error_response("The request body is over 1 MiB.", "Error"),
    }


def common_fragment() -> Fragment:
    """Security schemes, the error schema and reusable error responses."""
    return {
        "components": {
            "securitySchemes": {
                DIRECTORY_BEARER: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An access token from the directory's device flow "
                    "(``POST /oauth/access_token``).",
                },
                ADMIN_BEARER: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The sandbox's admin token (``admin_token`` in "
                    "``sandbox.json``).",
                },
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "description": "The sandbox's JSON error (OAuth 2.0 style).",
                    "required": ["error"],
                    "properties": {
                        "error": {"type": "string", "example": "invalid_request"},
                        "error_description": {"type": "string"},
                    },
                    "additionalProperties": False,
                },
            },
            "responses": standard_error_responses(),
        }
    }


def merge(fragments: Iterable[Fragment]) -> dict[str, Any]:
    """``paths`` and ``components`` of all fragments; an operation defined twice, or a
    component defined twice differently, raises :class:`FragmentConflict`."""
    paths: dict[str, dict[str, Any]] = {}
    components: dict[str, dict[str, Any]] = {}
    for fragment in fragments:
        unknown = set(fragment) - {"paths", "components"}
        if unknown:
            raise FragmentConflict(f"a fragment may hold paths and components, not {unknown}")
        for path, item in fragment.get("paths", {}).items():
            target = paths.setdefault(path, {})
            for key, value in item.items():
                if key in target and target[key] != value:
                    raise FragmentConflict(f"{key.upper()} {path} is defined twice")
                target[key] = copy.deepcopy(value)
        for kind, entries in fragment.get("components", {}).items():
            target = components.setdefault(kind, {})
            for name, value in entries.items():
                if name in target and target[name] != value:
                    raise FragmentConflict(f"components/{kind}/{name} is defined twice")
                target[name] = copy.deepcopy(value)
    return {
        "paths": dict(sorted(paths.items())),
        "components": {kind: dict(sorted(v.items())) for kind, v in sorted(components.items())},
    }
