"""The OpenAPI fragment of the shadow service's REST data plane (AWS IoT's ``iot-data``):
GetThingShadow, UpdateThingShadow, DeleteThingShadow, ListNamedShadowsForThing and
Publish, with AWS's error document ``{"code", "message", "timestamp"}`` and its
``x-amzn-ErrorType`` header."""

from __future__ import annotations

from typing import Any

from iotref.protocol import shadow_document as sd
from iotref.sandbox.openapi_fragment import (
    ADMIN_BEARER,
    Fragment,
    json_content,
    json_response,
    ref,
    response_ref,
    schema_ref,
)

AWS_SIGV4 = "awsSigV4"
TAG_SHADOW = "Device Shadow REST"
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
            "securitySchemes": {
                AWS_SIGV4: {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "AWS Signature Version 4 (``AWS4-HMAC-SHA256 Credential=..., "
                    "SignedHeaders=..., Signature=...``) with the access key in "
                    "``sandbox.json``, service ``iotdata``.",
                }
            },
            "schemas": shadow_schemas(),
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


def shadow_schemas() -> dict[str, Any]:
    """The shadow documents and error of the data plane (``components.schemas``)."""
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
