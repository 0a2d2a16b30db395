"""The sandbox's OpenAPI 3.0 description, served without authentication at ``GET /openapi.json``.

The description is assembled from *fragments*: partial OpenAPI documents with ``paths`` and
``components`` (``schemas``, ``responses``, ``securitySchemes``, ...), one per part of the
sandbox. :func:`builtin_fragments` holds the fragments of the HTTP endpoints in this package
(health, the OAuth device flow, the verification page, the directory's ``/api/v1``,
configuration and provisioning, the thing admin API and the shadow REST data plane). A
component may contribute its own fragment by defining ``openapi() -> dict`` (as it may define
``describe()`` for ``sandbox.json``); :func:`openapi_route` merges the built-in fragments with
those, refuses conflicting definitions, and keeps only the operations that the application
really routes, so an application built from some components describes exactly those.

The directory's success bodies use the component schemas of Zaikio's published description
(``openapi_data/zaikio-directory-v1.openapi.json``, the JSON form of
``zaikio-directory-v1.openapi.yaml``); the ``/api/v1`` operations are Zaikio's, moved under
``/api/v1`` and completed with the sandbox's error answers. Errors are documented as the
sandbox sends them: ``{"error", "error_description"}`` for the directory, configuration,
provisioning and admin endpoints, and AWS's error document ``{"code", "message",
"timestamp"}`` with an ``x-amzn-ErrorType`` header for the shadow data plane.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Sequence
from functools import cache
from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from iotref._version import __version__
from iotref.protocol import shadow_document as sd
from iotref.sandbox.directory.api import MAX_FIELD_LENGTH
from iotref.sandbox.provisioning.things import CLIENT_ID_PATTERN

Fragment = dict[str, Any]
"""A partial OpenAPI document: ``{"paths": {...}, "components": {...}}`` (both optional)."""

OPENAPI_PATH = "/openapi.json"
OPENAPI_VERSION = "3.0.3"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
ZAIKIO_DESCRIPTION = "zaikio-directory-v1.openapi.json"

# Security scheme names (also used by fragments that components contribute).
DIRECTORY_BEARER = "directoryBearer"
ADMIN_BEARER = "adminBearer"
AWS_SIGV4 = "awsSigV4"
DIRECTORY_SESSION = "directorySession"

# Tags.
TAG_HEALTH = "Sandbox"
TAG_OAUTH = "OAuth device flow"
TAG_PAGE = "Verification page"
TAG_DIRECTORY = "Directory API"
TAG_PROVISIONING = "Configuration and provisioning"
TAG_ADMIN = "Admin"
TAG_SHADOW = "Device Shadow REST"

_PARAM = re.compile(r"\{[^}]*\}")


class FragmentConflict(ValueError):
    """Two fragments define the same operation, or the same component differently."""


# --------------------------------------------------------------------------- helpers


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


def _error_schema(title: str, schema_name: str) -> dict[str, Any]:
    return json_response(title, schema_ref(schema_name))


def standard_error_responses() -> dict[str, Any]:
    """Reusable ``components.responses`` for the JSON errors of :mod:`http_errors`."""
    challenge = {
        "WWW-Authenticate": {
            "description": "The bearer challenge (RFC 6750).",
            "schema": {"type": "string"},
        }
    }
    return {
        "BadRequest": _error_schema("The request is malformed.", "Error"),
        "Unauthorized": {
            **_error_schema("No or no valid credentials.", "Error"),
            "headers": challenge,
        },
        "Forbidden": _error_schema("The credentials do not allow this.", "Error"),
        "NotFound": _error_schema("There is no such resource.", "Error"),
        "PayloadTooLarge": _error_schema("The request body is over 1 MiB.", "Error"),
        "ValidationFailed": _error_schema("Validation errors, field by field.", "ValidationErrors"),
        "UnknownSite": _error_schema("The request names an unknown site.", "Error"),
    }


# --------------------------------------------------------------------------- shared parts


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
                AWS_SIGV4: {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "AWS Signature Version 4 (``AWS4-HMAC-SHA256 Credential=..., "
                    "SignedHeaders=..., Signature=...``) with the access key in "
                    "``sandbox.json``, service ``iotdata``.",
                },
                DIRECTORY_SESSION: {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "iotref_directory_session",
                    "description": "The verification page's session cookie.",
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


def health_fragment() -> Fragment:
    return {
        "paths": {
            "/healthz": {
                "get": {
                    "tags": [TAG_HEALTH],
                    "operationId": "health",
                    "summary": "Whether the sandbox's HTTP server runs",
                    "security": [],
                    "responses": {
                        "200": json_response(
                            "Running.",
                            {
                                "type": "object",
                                "required": ["status", "version"],
                                "properties": {
                                    "status": {"type": "string", "enum": ["ok"]},
                                    "version": {"type": "string"},
                                    "sandbox_id": {
                                        "type": "string",
                                        "description": "This sandbox's id, as in its "
                                        "env.local (SANDBOX_ID); new with each data dir.",
                                    },
                                },
                                "additionalProperties": False,
                            },
                        )
                    },
                }
            },
            OPENAPI_PATH: {
                "get": {
                    "tags": [TAG_HEALTH],
                    "operationId": "openapi",
                    "summary": "This description",
                    "security": [],
                    "responses": {
                        "200": json_response(
                            "The OpenAPI 3.0 description of the sandbox's HTTP endpoints.",
                            {"type": "object", "required": ["openapi", "info", "paths"]},
                        )
                    },
                }
            },
        }
    }


# --------------------------------------------------------------------------- OAuth


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
            "401": _error_schema("Unknown client, or a code of another client.", "Error"),
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
                        "401": _error_schema("Unknown client_id.", "Error"),
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


# --------------------------------------------------------------------------- verification page


def verification_page_fragment() -> Fragment:
    """The HTML pages of ``/oauth/device``."""
    session: list[dict[str, list[str]]] = [{}, {DIRECTORY_SESSION: []}]
    csrf_refused = _error_schema("No session, or a wrong CSRF token.", "Error")
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
        }
    }


# --------------------------------------------------------------------------- directory /api/v1


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
            responses["403"] = _error_schema(
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


# --------------------------------------------------------------------------- provisioning


def provisioning_fragment() -> Fragment:
    """``GET /v3/configuration`` and ``POST /v4/provisioning`` (contract section 4)."""
    bearer: list[dict[str, list[str]]] = [{DIRECTORY_BEARER: []}]
    return {
        "paths": {
            "/v3/configuration": {
                "get": {
                    "tags": [TAG_PROVISIONING],
                    "operationId": "configuration",
                    "summary": "Where and how devices connect",
                    "security": bearer,
                    "responses": {
                        "200": json_response("The configuration.", schema_ref("Configuration")),
                        "401": response_ref("Unauthorized"),
                    },
                }
            },
            "/v4/provisioning": {
                "post": {
                    "tags": [TAG_PROVISIONING],
                    "operationId": "provision",
                    "summary": "Certify a device key: one new thing per call",
                    "description": "Needs an Organization token with "
                    "``Org.prinect.onprem.rw``; the site must belong to that organization.",
                    "security": bearer,
                    "requestBody": {
                        "required": True,
                        "content": json_content(schema_ref("ProvisioningRequest")),
                    },
                    "responses": {
                        "200": json_response("Provisioned.", schema_ref("ProvisioningResult")),
                        "400": response_ref("BadRequest"),
                        "401": response_ref("Unauthorized"),
                        "403": response_ref("Forbidden"),
                        "413": response_ref("PayloadTooLarge"),
                        "422": response_ref("UnknownSite"),
                    },
                }
            },
        },
        "components": {
            "schemas": {
                "Configuration": {
                    "type": "object",
                    "required": ["connectivity", "provisioning"],
                    "properties": {
                        "connectivity": {
                            "type": "object",
                            "required": [
                                "serverRootCA",
                                "mqttEndPoint",
                                "mqttPort",
                                "machineRegion",
                            ],
                            "properties": {
                                "serverRootCA": {
                                    "type": "string",
                                    "pattern": "^-----BEGIN CERTIFICATE-----",
                                },
                                "mqttEndPoint": {"type": "string", "minLength": 1},
                                "mqttPort": {"type": "integer", "minimum": 1, "maximum": 65535},
                                "machineRegion": {"type": "string"},
                            },
                        },
                        "provisioning": {
                            "type": "object",
                            "required": ["telemetryTopic"],
                            "properties": {"telemetryTopic": {"type": "string", "minLength": 1}},
                        },
                    },
                },
                "ProvisioningRequest": {
                    "type": "object",
                    "required": ["certificateSigningRequest", "siteId"],
                    "properties": {
                        "certificateSigningRequest": {
                            "type": "string",
                            "pattern": "\\S",
                            "description": "A PEM certificate signing request.",
                        },
                        "siteId": {"type": "string", "format": "uuid"},
                    },
                },
                "ProvisioningResult": {
                    "type": "object",
                    "required": ["deviceCert", "clientId", "orgId"],
                    "properties": {
                        "deviceCert": {
                            "type": "string",
                            "pattern": "^-----BEGIN CERTIFICATE-----",
                        },
                        "clientId": {"type": "string", "pattern": "^iotref-[0-9a-f]{20}$"},
                        "orgId": {"type": "string"},
                    },
                    "additionalProperties": False,
                },
            }
        },
    }


# --------------------------------------------------------------------------- admin


def admin_fragment() -> Fragment:
    """The thing admin API of the provisioning component (admin token)."""
    admin: list[dict[str, list[str]]] = [{ADMIN_BEARER: []}]
    client_id = {
        "in": "path",
        "name": "clientId",
        "required": True,
        "description": "Any other form is no thing (404).",
        "schema": {"type": "string", "pattern": f"^{CLIENT_ID_PATTERN}$"},
        "example": "iotref-0123456789abcdef0123",
    }
    return {
        "paths": {
            "/admin/things": {
                "get": {
                    "tags": [TAG_ADMIN],
                    "operationId": "listThings",
                    "summary": "Every provisioned thing, oldest first",
                    "security": admin,
                    "parameters": [
                        {
                            "in": "query",
                            "name": "orgId",
                            "description": "Only the things of this organization.",
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": json_response(
                            "The things.",
                            {
                                "type": "object",
                                "required": ["things"],
                                "properties": {
                                    "things": {"type": "array", "items": schema_ref("Thing")}
                                },
                                "additionalProperties": False,
                            },
                        ),
                        "401": response_ref("Unauthorized"),
                    },
                }
            },
            "/admin/things/{clientId}": {
                "get": {
                    "tags": [TAG_ADMIN],
                    "operationId": "getThing",
                    "summary": "One thing, with its certificate",
                    "security": admin,
                    "parameters": [client_id],
                    "responses": {
                        "200": json_response(
                            "The thing.",
                            {
                                "allOf": [
                                    schema_ref("Thing"),
                                    {
                                        "type": "object",
                                        "required": ["certificatePem"],
                                        "properties": {"certificatePem": {"type": "string"}},
                                    },
                                ]
                            },
                        ),
                        "401": response_ref("Unauthorized"),
                        "404": response_ref("NotFound"),
                    },
                }
            },
            "/admin/things/{clientId}/revoke": {
                "post": {
                    "tags": [TAG_ADMIN],
                    "operationId": "revokeThing",
                    "summary": "Revoke the thing's certificate (the broker drops the device)",
                    "security": admin,
                    "parameters": [client_id],
                    "responses": {
                        "200": json_response(
                            "Revoked (now or before).",
                            {
                                "allOf": [
                                    schema_ref("Thing"),
                                    {
                                        "type": "object",
                                        "required": ["alreadyRevoked"],
                                        "properties": {"alreadyRevoked": {"type": "boolean"}},
                                    },
                                ]
                            },
                        ),
                        "401": response_ref("Unauthorized"),
                        "404": response_ref("NotFound"),
                        "413": response_ref("PayloadTooLarge"),
                    },
                }
            },
        },
        "components": {
            "schemas": {
                "Thing": {
                    "type": "object",
                    "required": [
                        "clientId",
                        "orgId",
                        "siteId",
                        "machineId",
                        "serial",
                        "notAfter",
                        "createdAt",
                        "revokedAt",
                    ],
                    "properties": {
                        "clientId": {"type": "string"},
                        "orgId": {"type": "string"},
                        "siteId": {"type": "string"},
                        "machineId": {"type": "string", "nullable": True},
                        "serial": {"type": "string", "pattern": "^[0-9a-f]+$"},
                        "notAfter": {"type": "string", "format": "date-time"},
                        "createdAt": {"type": "string", "format": "date-time"},
                        "revokedAt": {"type": "string", "format": "date-time", "nullable": True},
                    },
                }
            }
        },
    }


# --------------------------------------------------------------------------- shadow REST

TOPIC_PATTERN = "^[^\\x00-\\x1f\\x7f-\\x9f+#\\ufdd0-\\ufdef\\ufffe\\uffff]+$"
"""What the Publish route takes as a topic (MQTT's and Mosquitto's rules). The route also
refuses the non-characters beyond the first plane (U+1FFFE and so on), which a pattern
cannot name portably (JSON Schema's regex dialects differ above U+FFFF)."""
_THING_NAME = sd.THING_NAME_PATTERN.pattern
_SHADOW_NAME = sd.SHADOW_NAME_PATTERN.pattern


def shadow_fragment() -> Fragment:
    """The AWS IoT data-plane REST API (``iot-data``) of the shadow service."""
    security: list[dict[str, list[str]]] = [{ADMIN_BEARER: []}, {AWS_SIGV4: []}]
    thing = {
        "in": "path",
        "name": "thingName",
        "required": True,
        "schema": {"type": "string", "pattern": _THING_NAME},
    }
    shadow_name = {
        "in": "query",
        "name": "name",
        "description": "A named shadow; without it the classic shadow.",
        "schema": {"type": "string", "pattern": _SHADOW_NAME},
    }
    errors = {
        "400": response_ref("AwsBadRequest"),
        "403": response_ref("AwsForbidden"),
        "404": response_ref("AwsNotFound"),
    }
    shadow_errors = {**errors, "429": response_ref("AwsThrottled")}
    return {
        "paths": {
            "/things/{thingName}/shadow": {
                "get": {
                    "tags": [TAG_SHADOW],
                    "operationId": "GetThingShadow",
                    "summary": "The shadow document",
                    "security": security,
                    "parameters": [thing, shadow_name],
                    "responses": {
                        "200": json_response("The shadow.", schema_ref("ShadowDocument")),
                        **shadow_errors,
                    },
                },
                "post": {
                    "tags": [TAG_SHADOW],
                    "operationId": "UpdateThingShadow",
                    "summary": "Update the shadow (merge; null removes)",
                    "description": "The body is read as bytes whatever its content type: "
                    "not UTF-8 is 415, not JSON 400, over 8 KB of state (desired and "
                    "reported together, after the merge) or 128 KB of payload 413, a version "
                    "mismatch 409, a ``clientToken`` over 64 bytes 400. Nesting deeper than "
                    "the schema's 6 levels is 400. These are AWS's limits, the sandbox's "
                    "defaults (``sandbox up --shadow-max-bytes``, ``--shadow-max-depth``).",
                    "security": security,
                    "parameters": [thing, shadow_name],
                    "requestBody": {
                        "required": True,
                        "content": json_content(schema_ref("ShadowUpdate")),
                    },
                    "responses": {
                        "200": json_response("Accepted.", schema_ref("ShadowUpdateAccepted")),
                        **shadow_errors,
                        "409": response_ref("AwsConflict"),
                        "413": response_ref("AwsTooLarge"),
                        "415": response_ref("AwsUnsupportedEncoding"),
                    },
                },
                "delete": {
                    "tags": [TAG_SHADOW],
                    "operationId": "DeleteThingShadow",
                    "summary": "Delete the shadow",
                    "security": security,
                    "parameters": [thing, shadow_name],
                    "responses": {
                        "200": json_response("Deleted.", schema_ref("ShadowDeleted")),
                        **shadow_errors,
                    },
                },
            },
            "/api/things/shadow/ListNamedShadowsForThing/{thingName}": {
                "get": {
                    "tags": [TAG_SHADOW],
                    "operationId": "ListNamedShadowsForThing",
                    "summary": "The names of the thing's named shadows, a page at a time",
                    "security": security,
                    "parameters": [
                        thing,
                        {
                            "in": "query",
                            "name": "nextToken",
                            "description": "The ``nextToken`` of the previous page.",
                            "schema": {"type": "string", "pattern": _SHADOW_NAME},
                        },
                        {
                            "in": "query",
                            "name": "pageSize",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 100},
                        },
                    ],
                    "responses": {
                        "200": json_response("A page of names.", schema_ref("NamedShadowList")),
                        **errors,
                    },
                }
            },
            "/topics/{topic}": {
                "post": {
                    "tags": [TAG_SHADOW],
                    "operationId": "Publish",
                    "summary": "Publish a message through the platform's MQTT connection",
                    "description": "The topic may contain ``/`` (percent-encoded or not).",
                    "security": security,
                    "parameters": [
                        {
                            "in": "path",
                            "name": "topic",
                            "required": True,
                            "description": "At most 256 bytes of UTF-8; no wildcards, control "
                            "characters or non-characters.",
                            "schema": {
                                "type": "string",
                                "minLength": 1,
                                "maxLength": 256,
                                "pattern": TOPIC_PATTERN,
                            },
                        },
                        {
                            "in": "query",
                            "name": "qos",
                            "schema": {"type": "integer", "enum": [0, 1]},
                        },
                        {
                            "in": "query",
                            "name": "retain",
                            "schema": {"type": "boolean"},
                        },
                    ],
                    "requestBody": {
                        "required": False,
                        "content": {
                            "application/octet-stream": {
                                "schema": {"type": "string", "format": "binary"}
                            }
                        },
                    },
                    "responses": {
                        "200": json_response(
                            "Published.",
                            {
                                "type": "object",
                                "required": ["message"],
                                "properties": {"message": {"type": "string", "enum": ["OK"]}},
                                "additionalProperties": False,
                            },
                        ),
                        **errors,
                        "413": response_ref("AwsTooLarge"),
                        "503": response_ref("AwsUnavailable"),
                    },
                }
            },
        },
        "components": {
            "schemas": _shadow_schemas(),
            "headers": {
                "ErrorType": {
                    "description": "AWS's error type, e.g. ``ResourceNotFoundException:``.",
                    "schema": {"type": "string", "pattern": "^[A-Za-z]+Exception:"},
                }
            },
            "responses": _aws_error_responses(),
        },
    }


def _aws_error_responses() -> dict[str, Any]:
    def aws(description: str, *, generic: bool = False) -> dict[str, Any]:
        schema: dict[str, Any] = schema_ref("ShadowError")
        if generic:
            # Answered by the HTTP layer before the data plane: unknown paths (a thing
            # name with "/") and bodies over 1 MiB carry the sandbox's generic error.
            schema = {"anyOf": [schema_ref("ShadowError"), schema_ref("Error")]}
        return {
            "description": description,
            "headers": {"x-amzn-ErrorType": ref("headers", "ErrorType")},
            "content": json_content(schema),
        }

    return {
        "AwsBadRequest": aws("InvalidRequestException: the request is not valid."),
        "AwsForbidden": aws("ForbiddenException: no, or wrong, credentials or signature."),
        "AwsNotFound": aws("ResourceNotFoundException: no such shadow.", generic=True),
        "AwsConflict": aws("ConflictException: Version conflict."),
        "AwsTooLarge": aws("RequestEntityTooLargeException.", generic=True),
        "AwsUnsupportedEncoding": aws("UnsupportedDocumentEncodingException: not UTF-8."),
        "AwsUnavailable": aws("ServiceUnavailableException: the broker is not reachable."),
        "AwsThrottled": aws(
            "ThrottlingException: over the thing's shadow requests a second (``sandbox up "
            "--shadow-rate-limit``, AWS: 20)."
        ),
    }


def shadow_state_schemas(max_depth: int = sd.MAX_DEPTH) -> dict[str, Any]:
    """``ShadowState1`` .. ``ShadowStateN``: a ``desired`` or ``reported`` section as the
    shadow service takes it, level by level down to ``max_depth`` levels of nesting; in
    objects a ``null`` removes the key, in arrays it is refused."""
    scalars: list[dict[str, Any]] = [
        {"type": "string"},
        {"type": "number"},
        {"type": "boolean"},
    ]
    removal = {"type": "object", "nullable": True, "enum": [None]}
    schemas: dict[str, Any] = {}
    for level in range(1, max_depth + 1):
        deeper = []
        if level < max_depth:
            deeper = [schema_ref(f"ShadowState{level + 1}"), schema_ref(f"ShadowList{level + 1}")]
        schemas[f"ShadowState{level}"] = {
            "type": "object",
            "additionalProperties": {"anyOf": [*scalars, removal, *deeper]},
        }
        if level > 1:
            schemas[f"ShadowList{level}"] = {
                "type": "array",
                "items": {"anyOf": [*scalars, *deeper]},
            }
    schemas["ShadowState1"]["description"] = (
        f"A desired or reported section: at most {max_depth} levels of nesting, no null in arrays."
    )
    return schemas


def _shadow_schemas() -> dict[str, Any]:
    # (nullable next to a $ref is ignored by OpenAPI 3.0 tools: null spelled out)
    section = {
        "anyOf": [schema_ref("ShadowState1"), {"type": "object", "nullable": True, "enum": [None]}],
        "description": "null removes the section.",
    }
    timestamp = {"type": "integer", "description": "Epoch seconds."}
    client_token = {"type": "string", "maxLength": 64}
    return {
        **shadow_state_schemas(),
        "ShadowError": {
            "type": "object",
            "description": "AWS IoT's error response document.",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "integer"},
                "message": {"type": "string"},
                "timestamp": timestamp,
                "clientToken": client_token,
            },
            "additionalProperties": False,
        },
        "ShadowUpdate": {
            "type": "object",
            "required": ["state"],
            "properties": {
                "state": {
                    "type": "object",
                    "nullable": True,
                    "properties": {"desired": section, "reported": section},
                    "additionalProperties": False,
                },
                "version": {"type": "integer"},
                "clientToken": client_token,
            },
        },
        "ShadowDocument": {
            "type": "object",
            "required": ["state", "metadata", "version", "timestamp"],
            "properties": {
                "state": {
                    "type": "object",
                    "properties": {
                        "desired": {"type": "object"},
                        "reported": {"type": "object"},
                        "delta": {"type": "object"},
                    },
                    "additionalProperties": False,
                },
                "metadata": {
                    "type": "object",
                    "properties": {
                        "desired": {"type": "object"},
                        "reported": {"type": "object"},
                    },
                    "additionalProperties": False,
                },
                "version": {"type": "integer", "minimum": 1},
                "timestamp": timestamp,
                "clientToken": client_token,
            },
            "additionalProperties": False,
        },
        "ShadowUpdateAccepted": {
            "type": "object",
            "required": ["state", "metadata", "version", "timestamp"],
            "properties": {
                "state": {"type": "object", "nullable": True},
                "metadata": {"type": "object"},
                "version": {"type": "integer", "minimum": 1},
                "timestamp": timestamp,
                "clientToken": client_token,
            },
            "additionalProperties": False,
        },
        "ShadowDeleted": {
            "type": "object",
            "required": ["version", "timestamp"],
            "properties": {
                "version": {"type": "integer"},
                "timestamp": timestamp,
                "clientToken": client_token,
            },
            "additionalProperties": False,
        },
        "NamedShadowList": {
            "type": "object",
            "required": ["results", "timestamp"],
            "properties": {
                "results": {
                    "type": "array",
                    "items": {"type": "string", "pattern": _SHADOW_NAME},
                },
                "nextToken": {"type": "string", "pattern": _SHADOW_NAME},
                "timestamp": timestamp,
            },
            "additionalProperties": False,
        },
    }


# --------------------------------------------------------------------------- assembly


def builtin_fragments() -> list[Fragment]:
    """The fragments of every HTTP endpoint this package serves, except the monitor's
    (the monitor component contributes its own through ``openapi()``)."""
    return [
        common_fragment(),
        health_fragment(),
        oauth_fragment(),
        verification_page_fragment(),
        directory_api_fragment(),
        provisioning_fragment(),
        admin_fragment(),
        shadow_fragment(),
    ]


def component_fragments(components: Iterable[object]) -> list[Fragment]:
    """The fragments that components contribute through an ``openapi()`` method."""
    fragments: list[Fragment] = []
    for component in components:
        contribute = getattr(component, "openapi", None)
        if callable(contribute):
            fragment = contribute()
            if not isinstance(fragment, dict):
                raise TypeError(f"{type(component).__name__}.openapi() must return a dict")
            fragments.append(fragment)
    return fragments


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


def path_shape(path: str) -> str:
    """A path with every parameter replaced by ``{}`` (``/a/{x:path}`` → ``/a/{}``)."""
    return _PARAM.sub("{}", path)


def served_operations(routes: Sequence[BaseRoute]) -> set[tuple[str, str]]:
    """``(path shape, lower-case method)`` of every plain route (HEAD implied by GET)."""
    served: set[tuple[str, str]] = set()
    for route in routes:
        if isinstance(route, Route):
            for method in route.methods or ():
                if method != "HEAD":
                    served.add((path_shape(route.path), method.lower()))
    return served


def described_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (path_shape(path), method)
        for path, item in document.get("paths", {}).items()
        for method in item
        if method in HTTP_METHODS
    }


def build_description(
    fragments: Iterable[Fragment], served: set[tuple[str, str]] | None = None
) -> dict[str, Any]:
    """The whole OpenAPI document; with ``served``, only the operations routed."""
    merged = merge(fragments)
    paths: dict[str, Any] = {}
    for path, item in merged["paths"].items():
        kept = {
            key: value
            for key, value in item.items()
            if key not in HTTP_METHODS or served is None or (path_shape(path), key) in served
        }
        if any(key in HTTP_METHODS for key in kept):
            paths[path] = kept
    tags = sorted(
        {tag for item in paths.values() for op in _operations(item) for tag in op.get("tags", ())}
    )
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "iotref sandbox",
            "version": __version__,
            "description": "A local copy of the Zaikio directory and the connectprint IoT "
            "platform: the OAuth device flow and its verification page, the directory API "
            "(v1), configuration and provisioning, the thing admin API and AWS IoT's "
            "Device Shadow REST API.",
        },
        "tags": [{"name": tag} for tag in tags],
        "paths": paths,
        "components": merged["components"],
    }


def _operations(item: dict[str, Any]) -> list[dict[str, Any]]:
    return [value for key, value in item.items() if key in HTTP_METHODS]


def describe_app(routes: Sequence[BaseRoute], components: Iterable[object]) -> dict[str, Any]:
    """The description an application of ``routes`` built from ``components`` serves:
    the built-in fragments plus the components' own, cut down to what is routed."""
    served = served_operations(routes) | {(OPENAPI_PATH, "get")}
    return build_description([*builtin_fragments(), *component_fragments(components)], served)


def openapi_route(routes: Sequence[BaseRoute], components: Iterable[object]) -> Route:
    """``GET /openapi.json`` describing ``routes`` (plus itself), built once."""
    document = describe_app(routes, components)

    async def serve(request: Request) -> Response:
        base = str(request.base_url).rstrip("/")
        return JSONResponse({**document, "servers": [{"url": base}]})

    return Route(OPENAPI_PATH, serve, methods=["GET"])
