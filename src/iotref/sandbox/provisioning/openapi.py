"""The OpenAPI fragments of the provisioning service's routes: ``GET /v3/configuration`` and
``POST /v4/provisioning`` (contract section 4), and the thing admin API (admin token).
(The bulk route describes itself beside it, in :mod:`~iotref.sandbox.provisioning.bulk`.)"""

from __future__ import annotations

from typing import Any

from iotref.sandbox.openapi_fragment import (
    ADMIN_BEARER,
    DIRECTORY_BEARER,
    Fragment,
    error_response,
    json_content,
    json_response,
    merge,
    response_ref,
    schema_ref,
)
from iotref.sandbox.provisioning.certificate_authority import DEVICE_CRL_PATH
from iotref.sandbox.provisioning.things import CLIENT_ID_PATTERN

TAG_PROVISIONING = "Configuration and provisioning"
TAG_ADMIN = "Admin"


def provisioning_service_fragment() -> Fragment:
    """The provisioning component's routes: the two fragments below."""
    return merge([provisioning_fragment(), admin_fragment()])


def configuration_schema() -> dict[str, Any]:
    """``GET /v3/configuration``'s answer (also part of the bulk route's)."""
    return {
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
    }


def unknown_site_response() -> dict[str, Any]:
    """422: the site named is none of the directory's."""
    return error_response("The request names an unknown site.", "Error")


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
            DEVICE_CRL_PATH: {
                "get": {
                    "tags": [TAG_PROVISIONING],
                    "operationId": "deviceCrl",
                    "summary": "The device CA's certificate revocation list (sandbox only)",
                    "description": "DER (RFC 5280); every device certificate names this URL "
                    "as its CRL distribution point. AWS IoT Core's certificates name none.",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "The CRL.",
                            "content": {
                                "application/pkix-crl": {
                                    "schema": {"type": "string", "format": "binary"}
                                }
                            },
                        }
                    },
                }
            },
        },
        "components": {
            "responses": {"UnknownSite": unknown_site_response()},
            "schemas": {
                "Configuration": configuration_schema(),
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
            },
        },
    }


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
