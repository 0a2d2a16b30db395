"""The OpenAPI fragments of the directory's routes: the OAuth device flow, the verification
page and the ``/api/v1`` API.

The ``/api/v1`` operations are Zaikio's (its published description,
``openapi_data/zaikio-directory-v1.openapi.json``, the JSON form of
``zaikio-directory-v1.openapi.yaml``), moved under ``/api/v1``, their success bodies kept
with Zaikio's component schemas and completed with the sandbox's error answers
(``{"error", "error_description"}``).
"""

from __future__ import annotations

import copy
import json
import re
from functools import cache
from importlib import resources
from typing import Any

from iotref.sandbox.directory.api import MAX_FIELD_LENGTH
from iotref.sandbox.directory.verification_page import DEMO_ACCOUNT_PATH, SESSION_COOKIE
from iotref.sandbox.openapi_fragment import (
    DIRECTORY_BEARER,
    HTTP_METHODS,
    Fragment,
    error_response,
    html_response,
    json_content,
    json_response,
    merge,
    response_ref,
    schema_ref,
)

ZAIKIO_DESCRIPTION = "zaikio-directory-v1.openapi.json"
DIRECTORY_SESSION = "directorySession"
TAG_OAUTH = "OAuth device flow"
TAG_PAGE = "Verification page"
TAG_DIRECTORY = "Directory API"


def directory_fragment() -> Fragment:
    """The directory component's routes: the three fragments below."""
    return merge([oauth_fragment(), verification_page_fragment(), directory_api_fragment()])


def _form_or_json(schema: dict[str, Any], required: bool = True) -> dict[str, Any]:
    return {
        "required": required,
        "content": {
            "application/x-www-form-urlencoded": {"schema": schema},
            "application/json": {"schema": schema},
        },
    }


def oauth_fragment() -> Fragment:
    """``POST /oauth/device_authorizations/authorize`` and the token endpoint."""
    text = {"type": "string", "minLength": 1}
    token_request = {
        "oneOf": [
            {
                "type": "object",
                "description": "Polling with the device code (RFC 8628 §3.4).",
                "required": ["grant_type", "client_id", "device_code"],
                "properties": {
                    "grant_type": {
                        "type": "string",
                        "enum": ["urn:ietf:params:oauth:grant-type:device_code"],
                    },
                    "client_id": text,
                    "device_code": text,
                },
            },
            {
                "type": "object",
                "description": "A refresh (RFC 6749 §6); ``client_id`` is optional.",
                "required": ["grant_type", "refresh_token"],
                "properties": {
                    "grant_type": {"type": "string", "enum": ["refresh_token"]},
                    "client_id": text,
                    "refresh_token": text,
                },
            },
        ]
    }
    token_operation = {
        "tags": [TAG_OAUTH],
        "summary": "Poll with a device code, or refresh a token (RFC 8628 §3.4, RFC 6749 §6)",
        "description": "Errors while polling: ``authorization_pending``, ``slow_down``, "
        "``access_denied``, ``expired_token`` (400). Parameters may also come from the "
        "query string.",
        "security": [],
        "requestBody": _form_or_json(token_request),
        "responses": {
            "200": json_response("Granted.", schema_ref("AccessToken")),
            "400": response_ref("BadRequest"),
            "401": error_response("Unknown client, or a code of another client.", "Error"),
            "413": response_ref("PayloadTooLarge"),
        },
    }
    return {
        "paths": {
            "/oauth/device_authorizations/authorize": {
                "post": {
                    "tags": [TAG_OAUTH],
                    "operationId": "authorizeDevice",
                    "summary": "Start a device authorization (RFC 8628 §3.1, Zaikio flavour)",
                    "description": "Parameters may also come from the query string; scopes "
                    "are comma or space separated.",
                    "security": [],
                    "requestBody": _form_or_json(
                        {
                            "type": "object",
                            "required": ["client_id", "scope"],
                            "properties": {
                                "client_id": {"type": "string", "minLength": 1},
                                "scope": {
                                    "type": "string",
                                    "minLength": 1,
                                    "example": "Org.prinect.onprem.rw,Org.directory.machines.rw",
                                },
                            },
                        }
                    ),
                    "responses": {
                        "200": json_response("Started.", schema_ref("DeviceAuthorization")),
                        "400": response_ref("BadRequest"),
                        "401": error_response("Unknown client_id.", "Error"),
                        "413": response_ref("PayloadTooLarge"),
                    },
                }
            },
            "/oauth/access_token": {"post": {**token_operation, "operationId": "accessToken"}},
            "/oauth/access_token.json": {
                "post": {**token_operation, "operationId": "accessTokenJson"}
            },
        },
        "components": {
            "schemas": {
                "DeviceAuthorization": {
                    "type": "object",
                    "required": [
                        "device_code",
                        "user_code",
                        "verification_uri",
                        "verification_uri_complete",
                        "expires_in",
                        "interval",
                    ],
                    "properties": {
                        "device_code": {"type": "string"},
                        "user_code": {"type": "string", "pattern": "^[0-9]{8}$"},
                        "verification_uri": {"type": "string"},
                        "verification_uri_complete": {"type": "string"},
                        "expires_in": {"type": "integer", "minimum": 1},
                        "interval": {"type": "integer", "minimum": 0},
                    },
                    "additionalProperties": False,
                },
                "AccessToken": {
                    "type": "object",
                    "required": [
                        "access_token",
                        "refresh_token",
                        "token_type",
                        "scope",
                        "audiences",
                        "bearer",
                        "expires_in",
                    ],
                    "properties": {
                        "access_token": {"type": "string"},
                        "refresh_token": {"type": "string"},
                        "token_type": {"type": "string", "enum": ["bearer"]},
                        "scope": {"type": "string"},
                        "audiences": {"type": "array", "items": {"type": "string"}},
                        "bearer": {
                            "type": "object",
                            "required": ["id", "type"],
                            "properties": {
                                "id": {"type": "string"},
                                "type": {"type": "string", "enum": ["Organization", "Person"]},
                            },
                        },
                        "expires_in": {
                            "description": "Zaikio sends the expiry as an ISO-8601 "
                            "timestamp; RFC 6749 as seconds.",
                            "oneOf": [
                                {"type": "string", "format": "date-time"},
                                {"type": "integer"},
                            ],
                        },
                    },
                },
            }
        },
    }


def verification_page_fragment() -> Fragment:
    """The HTML pages of ``/oauth/device``."""
    session: list[dict[str, list[str]]] = [{}, {DIRECTORY_SESSION: []}]
    csrf_refused = error_response("No session, or a wrong CSRF token.", "Error")
    redirect = {
        "description": "Done; go to the verification page.",
        "headers": {"Location": {"schema": {"type": "string"}}},
    }
    form = {
        "application/x-www-form-urlencoded": {
            "schema": {
                "type": "object",
                "required": ["csrf_token"],
                "properties": {"csrf_token": {"type": "string"}},
            }
        }
    }
    return {
        "paths": {
            "/oauth/device": {
                "get": {
                    "tags": [TAG_PAGE],
                    "operationId": "verificationPage",
                    "summary": "Sign in, enter the code, or approve the device (HTML)",
                    "security": session,
                    "parameters": [
                        {
                            "in": "query",
                            "name": "user_code",
                            "schema": {"type": "string"},
                            "example": "12345678",
                        }
                    ],
                    "responses": {
                        "200": html_response("The page for where the person is."),
                        "400": html_response("The code is wrong, expired or used."),
                    },
                },
                "post": {
                    "tags": [TAG_PAGE],
                    "operationId": "decide",
                    "summary": "Approve or deny the device",
                    "security": session,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/x-www-form-urlencoded": {
                                "schema": {
                                    "type": "object",
                                    "required": ["csrf_token", "user_code", "decision"],
                                    "properties": {
                                        "csrf_token": {"type": "string"},
                                        "user_code": {"type": "string"},
                                        "decision": {
                                            "type": "string",
                                            "enum": ["approve", "deny"],
                                        },
                                        "organization_id": {"type": "string"},
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": html_response("Approved or denied."),
                        "400": {
                            "description": "Wrong code or organization (HTML), or a malformed "
                            "form (JSON).",
                            "content": {
                                "text/html": {"schema": {"type": "string"}},
                                **json_content(schema_ref("Error")),
                            },
                        },
                        "401": html_response("Not signed in."),
                        "403": csrf_refused,
                        "413": response_ref("PayloadTooLarge"),
                    },
                },
            },
            "/oauth/device/sign_in": {
                "post": {
                    "tags": [TAG_PAGE],
                    "operationId": "signIn",
                    "summary": "Sign in to the directory",
                    "security": session,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/x-www-form-urlencoded": {
                                "schema": {
                                    "type": "object",
                                    "required": ["csrf_token", "email", "password"],
                                    "properties": {
                                        "csrf_token": {"type": "string"},
                                        "email": {"type": "string"},
                                        "password": {"type": "string"},
                                        "user_code": {"type": "string"},
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "303": redirect,
                        "400": response_ref("BadRequest"),
                        "401": html_response("Wrong email or password."),
                        "403": csrf_refused,
                        "413": response_ref("PayloadTooLarge"),
                    },
                }
            },
            DEMO_ACCOUNT_PATH: {
                "get": {
                    "tags": [TAG_PAGE],
                    "operationId": "demoAccount",
                    "summary": "The sandbox's seeded demo account, to sign in with (sandbox only)",
                    "security": [],
                    "responses": {
                        "200": json_response(
                            "The demo person's email and password.",
                            {
                                "type": "object",
                                "required": ["email", "password"],
                                "properties": {
                                    "email": {"type": "string"},
                                    "password": {"type": "string"},
                                },
                                "additionalProperties": False,
                            },
                        )
                    },
                }
            },
            "/oauth/device/sign_out": {
                "post": {
                    "tags": [TAG_PAGE],
                    "operationId": "signOut",
                    "summary": "Sign out",
                    "security": session,
                    "requestBody": {"required": True, "content": form},
                    "responses": {
                        "303": redirect,
                        "400": response_ref("BadRequest"),
                        "403": csrf_refused,
                        "413": response_ref("PayloadTooLarge"),
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                DIRECTORY_SESSION: {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": SESSION_COOKIE,
                    "description": "The verification page's session cookie.",
                }
            }
        },
    }


@cache
def zaikio_description() -> dict[str, Any]:
    """Zaikio's published description of the directory API (v1), as shipped."""
    text = (resources.files(__package__) / "openapi_data" / ZAIKIO_DESCRIPTION).read_text()
    document: dict[str, Any] = json.loads(text)
    return document


# Zaikio's paths that the sandbox serves (under /api/v1), and what its answers add.
_DIRECTORY_PATHS = (
    "/person",
    "/person/organization_memberships",
    "/organization",
    "/sites",
    "/machines",
    "/machines/{machineId}",
    "/machines/{machineId}/machine_ownership",
)
_WRITES = {("/machines", "post"), ("/machines/{machineId}/machine_ownership", "post")}
_REQUIRED_MACHINE_FIELDS = ("machine[name]", "machine[manufacturer]", "machine[serial_number]")


def directory_api_fragment() -> Fragment:
    """Zaikio's ``/api/v1`` operations with the sandbox's security and error answers; the
    success bodies keep Zaikio's component schemas."""
    zaikio = zaikio_description()
    paths: dict[str, Any] = {}
    for path in _DIRECTORY_PATHS:
        for method, operation in zaikio["paths"][path].items():
            if method not in HTTP_METHODS:
                continue
            op = copy.deepcopy(operation)
            op["tags"] = [TAG_DIRECTORY]
            op["security"] = [{DIRECTORY_BEARER: []}]
            op.setdefault("operationId", _operation_id(method, path))
            responses: dict[str, Any] = {
                code: answer
                for code, answer in op["responses"].items()
                if code.startswith("2") or "content" in answer
            }
            responses["401"] = response_ref("Unauthorized")
            responses["403"] = error_response(
                "The bearer type or the token's scopes do not allow this.", "Error"
            )
            responses["404"] = response_ref("NotFound")
            if (path, method) in _WRITES:
                responses["400"] = response_ref("BadRequest")
                responses["413"] = response_ref("PayloadTooLarge")
                responses["422"] = response_ref("ValidationFailed")
            op["responses"] = dict(sorted(responses.items()))
            paths.setdefault("/api/v1" + path, {})[method] = op
    for parameter in paths["/api/v1/machines"]["post"]["parameters"]:
        name, schema = parameter["name"], parameter["schema"]
        if name in _REQUIRED_MACHINE_FIELDS:
            # What the sandbox checks: not blank, at most MAX_FIELD_LENGTH characters.
            parameter["schema"] = {**schema, "pattern": "\\S", "maxLength": MAX_FIELD_LENGTH}
        elif name == "machine[kind]":
            parameter["schema"] = {**schema, "enum": [*schema["enum"], ""]}
        elif name == "machine[site_id]":
            parameter["schema"] = _or_empty(schema)
    ownership = paths["/api/v1/machines/{machineId}/machine_ownership"]["post"]
    ownership["parameters"].append(
        {
            "in": "query",
            "name": "site_id",
            "description": "A site of the organization that takes ownership (sandbox).",
            "schema": _or_empty({"type": "string", "format": "uuid"}),
        }
    )
    return {
        "paths": paths,
        "components": {
            "schemas": copy.deepcopy(zaikio["components"]["schemas"]),
            "examples": copy.deepcopy(zaikio["components"]["examples"]),
            "responses": {
                "ValidationFailed": error_response(
                    "Validation errors, field by field.", "ValidationErrors"
                )
            },
        },
    }


def _or_empty(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema``, or the empty string of a form field left empty (the same as none)."""
    return {
        "anyOf": [schema, {"type": "string", "enum": [""]}],
        "description": "Empty: not given.",
    }


def _operation_id(method: str, path: str) -> str:
    words = [w for w in re.split(r"[/_{}]+", path) if w]
    return method + "".join(w[:1].upper() + w[1:] for w in words)
