"""The OpenAPI fragment of the monitor's routes: their paths and the monitor's security
schemes (the session cookie, the CSRF header, the token in the link)."""

from __future__ import annotations

from typing import Any

from iotref.sandbox.monitor.access import COOKIE_NAME
from iotref.sandbox.monitor.params import CLIENT_ID, MAX_LIMIT, SQLITE_MAX_INT
from iotref.sandbox.monitor.schemas import monitor_schemas, object_schema
from iotref.sandbox.openapi_fragment import (
    ADMIN_BEARER,
    html_response,
    json_content,
    json_response,
    response_ref,
    schema_ref,
)
from iotref.sandbox.shadow.openapi import shadow_schemas, shadow_state_schemas

TAG_MONITOR = "Monitor"
MONITOR_SESSION = "monitorSession"
MONITOR_CSRF = "monitorCsrf"
MONITOR_LINK = "monitorLink"


def _security_schemes() -> dict[str, Any]:
    return {
        MONITOR_SESSION: {
            "type": "apiKey",
            "in": "cookie",
            "name": COOKIE_NAME,
            "description": "The monitor's session cookie, set by ``GET /monitor?token=`` "
            "(HttpOnly, SameSite=Strict, path ``/monitor``).",
        },
        MONITOR_CSRF: {
            "type": "apiKey",
            "in": "header",
            "name": "X-CSRF-Token",
            "description": 'The page\'s CSRF token (``<meta name="csrf-token">``), needed '
            "with the session cookie on POSTs; a browser's ``Origin`` must also match.",
        },
        MONITOR_LINK: {
            "type": "apiKey",
            "in": "query",
            "name": "token",
            "description": "The admin token in the monitor link: answered with a redirect "
            "that sets the session cookie.",
        },
    }


def shadow_schemas_used() -> dict[str, Any]:
    """The shadow service's schemas that the monitor's answers refer to."""
    return {
        **shadow_state_schemas(),
        "ShadowUpdateAccepted": shadow_schemas()["ShadowUpdateAccepted"],
    }


def _client_id_parameter() -> dict[str, Any]:
    return {
        "in": "path",
        "name": "client_id",
        "required": True,
        "schema": {"type": "string", "pattern": CLIENT_ID.pattern},
        "example": "iotref-0123456789abcdef0123",
    }


def monitor_fragment() -> dict[str, Any]:
    """The OpenAPI fragment of the monitor's routes (merged into ``/openapi.json``)."""
    read: list[dict[str, list[str]]] = [{ADMIN_BEARER: []}, {MONITOR_SESSION: []}]
    write: list[dict[str, list[str]]] = [
        {ADMIN_BEARER: []},
        {MONITOR_SESSION: [], MONITOR_CSRF: []},
    ]
    client_id = _client_id_parameter()
    not_ready = json_response("Ingestion has not started.", schema_ref("Error"))
    shadow_error = {"anyOf": [schema_ref("Error"), schema_ref("MonitorShadowError")]}
    csrf_refused = json_response(
        "Cookie authentication without the CSRF token, or from another origin.",
        schema_ref("Error"),
    )
    desired_body = {
        "required": True,
        "content": json_content(
            {
                "type": "object",
                "required": ["desired"],
                "properties": {
                    "desired": schema_ref("ShadowState1"),
                    "version": {
                        "type": "integer",
                        "description": "Only if the shadow has this version (as AWS's "
                        "``version``: 0 for a shadow that does not exist yet; no other "
                        "value below 1 can match, and gets 409).",
                    },
                },
            }
        ),
    }
    throttled = json_response(
        "Over the thing's shadow requests a second.", schema_ref("MonitorShadowError")
    )
    security_headers = {
        name: {"required": True, "schema": {"type": "string"}}
        for name in ("Content-Security-Policy", "X-Frame-Options", "Cache-Control")
    }
    page_refused = {**html_response("No or a wrong token."), "headers": security_headers}
    paths: dict[str, Any] = {
        "/monitor": {
            "get": {
                "tags": [TAG_MONITOR],
                "operationId": "monitorPage",
                "summary": "The monitor's page (HTML)",
                "description": "Opened through ``/monitor?token=ADMIN_TOKEN``: a 303 to "
                "``/monitor`` that sets the session cookie. Bearer tokens are not accepted "
                "here.",
                "security": [{MONITOR_SESSION: []}, {MONITOR_LINK: []}],
                "responses": {
                    "200": {**html_response("The page."), "headers": security_headers},
                    "303": {
                        "description": "The token is right: to ``/monitor``, with the cookie.",
                        "headers": {
                            "Location": {
                                "required": True,
                                "schema": {"type": "string", "enum": ["/monitor"]},
                            },
                            "Set-Cookie": {
                                "required": True,
                                "schema": {"type": "string", "pattern": f"^{COOKIE_NAME}="},
                            },
                        },
                    },
                    "401": page_refused,
                },
            }
        },
        "/monitor/assets/{name}": {
            "get": {
                "tags": [TAG_MONITOR],
                "operationId": "monitorAsset",
                "summary": "A static file of the page",
                "security": [],
                "parameters": [
                    {
                        "in": "path",
                        "name": "name",
                        "required": True,
                        "schema": {"type": "string", "pattern": "^[a-z0-9_-]+\\.(css|js|svg)$"},
                        "example": "monitor.css",
                    }
                ],
                "responses": {
                    "200": {
                        "description": "The file.",
                        "content": {
                            media: {"schema": {"type": "string"}}
                            for media in ("text/css", "text/javascript", "image/svg+xml")
                        },
                    },
                    "404": response_ref("NotFound"),
                },
            }
        },
        "/monitor/api/summary": {
            "get": {
                "tags": [TAG_MONITOR],
                "operationId": "monitorSummary",
                "summary": "Devices, totals, the message rate and pending approvals",
                "security": read,
                "responses": {
                    "200": json_response("The summary.", schema_ref("MonitorSummary")),
                    "401": response_ref("Unauthorized"),
                    "409": not_ready,
                },
            }
        },
        "/monitor/api/stream": {
            "get": {
                "tags": [TAG_MONITOR],
                "operationId": "monitorStream",
                "summary": "Live messages and statistics (server-sent events)",
                "description": "Events: ``message`` (one per message, as in the list), "
                "``stats`` (once a second unless ``stats=0``), ``dropped`` (a slow reader "
                "missed messages). The stream does not end.",
                "security": read,
                "parameters": [
                    {
                        "in": "query",
                        "name": "device",
                        "description": "Only this device's messages.",
                        "schema": {"type": "string", "pattern": client_id["schema"]["pattern"]},
                    },
                    {"in": "query", "name": "invalid_only", "schema": {"type": "boolean"}},
                    {
                        "in": "query",
                        "name": "stats",
                        "description": "``0``: no ``stats`` events.",
                        "schema": {"type": "string", "enum": ["0", "1"]},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "The event stream.",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "400": response_ref("BadRequest"),
                    "401": response_ref("Unauthorized"),
                    "409": not_ready,
                },
            }
        },
        "/monitor/api/messages/{message_id}": {
            "get": {
                "tags": [TAG_MONITOR],
                "operationId": "monitorMessage",
                "summary": "One stored message with its body",
                "security": read,
                "parameters": [
                    {
                        "in": "path",
                        "name": "message_id",
                        "required": True,
                        "schema": {"type": "integer", "minimum": 1},
                    }
                ],
                "responses": {
                    "200": json_response("The message.", schema_ref("MonitorStoredMessage")),
                    "401": response_ref("Unauthorized"),
                    "404": response_ref("NotFound"),
                    "409": not_ready,
                },
            }
        },
        "/monitor/api/devices/{client_id}": {
            "get": {
                "tags": [TAG_MONITOR],
                "operationId": "monitorDevice",
                "summary": "One device: counters, thing, shadow, rate, series, latest messages",
                "security": read,
                "parameters": [client_id],
                "responses": {
                    "200": json_response("The device.", schema_ref("MonitorDeviceDetail")),
                    "400": response_ref("BadRequest"),
                    "401": response_ref("Unauthorized"),
                    "404": response_ref("NotFound"),
                    "409": not_ready,
                },
            }
        },
        "/monitor/api/devices/{client_id}/messages": {
            "get": {
                "tags": [TAG_MONITOR],
                "operationId": "monitorDeviceMessages",
                "summary": "The device's stored messages, newest first",
                "security": read,
                "parameters": [
                    client_id,
                    {
                        "in": "query",
                        "name": "limit",
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
                    },
                    {
                        "in": "query",
                        "name": "before",
                        "description": "Only messages with a smaller id (paging).",
                        "schema": {"type": "integer", "minimum": 1, "maximum": SQLITE_MAX_INT},
                    },
                    {"in": "query", "name": "invalid", "schema": {"type": "boolean"}},
                ],
                "responses": {
                    "200": json_response(
                        "The messages.",
                        object_schema(
                            {"messages": {"type": "array", "items": schema_ref("MonitorMessage")}}
                        ),
                    ),
                    "400": response_ref("BadRequest"),
                    "401": response_ref("Unauthorized"),
                    "404": response_ref("NotFound"),
                    "409": not_ready,
                },
            }
        },
        "/monitor/api/devices/{client_id}/shadow": {
            "get": {
                "tags": [TAG_MONITOR],
                "operationId": "monitorShadow",
                "summary": "The provisioned device's shadow",
                "security": read,
                "parameters": [client_id],
                "responses": {
                    "200": json_response("The shadow.", schema_ref("MonitorShadow")),
                    "400": response_ref("BadRequest"),
                    "401": response_ref("Unauthorized"),
                    "404": response_ref("NotFound"),
                },
            },
            "post": {
                "tags": [TAG_MONITOR],
                "operationId": "monitorUpdateDesired",
                "summary": "Merge into the shadow's desired state",
                "description": "Through the shadow service's update path; ``version`` makes "
                "the update conditional.",
                "security": write,
                "parameters": [client_id],
                "requestBody": desired_body,
                "responses": {
                    "200": json_response("Updated.", schema_ref("MonitorShadowUpdated")),
                    "400": json_response("A malformed or refused update.", shadow_error),
                    "401": response_ref("Unauthorized"),
                    "403": csrf_refused,
                    "404": response_ref("NotFound"),
                    "409": json_response("A version conflict.", schema_ref("MonitorShadowError")),
                    "413": json_response("The body or the state is too large.", shadow_error),
                    "429": throttled,
                },
            },
        },
        "/monitor/api/devices/{client_id}/shadow/validate": {
            "post": {
                "tags": [TAG_MONITOR],
                "operationId": "monitorValidateDesired",
                "summary": "Check a desired update by the shadow service's rules, no update",
                "security": write,
                "parameters": [client_id],
                "requestBody": desired_body,
                "responses": {
                    "200": json_response(
                        "The update would be accepted.",
                        object_schema(
                            {
                                "ok": {"type": "boolean", "enum": [True]},
                                "update": {
                                    "type": "object",
                                    "required": ["state"],
                                    "properties": {
                                        "state": object_schema({"desired": {"type": "object"}}),
                                        "version": {"type": "integer"},
                                    },
                                    "additionalProperties": False,
                                },
                            }
                        ),
                    ),
                    "400": json_response("A malformed or refused update.", shadow_error),
                    "401": response_ref("Unauthorized"),
                    "403": csrf_refused,
                    "404": response_ref("NotFound"),
                    "413": json_response("The body or the state is too large.", shadow_error),
                },
            }
        },
        "/monitor/api/devices/{client_id}/send-telemetry": {
            "post": {
                "tags": [TAG_MONITOR],
                "operationId": "monitorSendTelemetry",
                "summary": "Set desired.sendTelemetryData",
                "security": write,
                "parameters": [client_id],
                "requestBody": {
                    "required": True,
                    "content": json_content(
                        {
                            "type": "object",
                            "required": ["enabled"],
                            "properties": {"enabled": {"type": "boolean"}},
                        }
                    ),
                },
                "responses": {
                    "200": json_response("Updated.", schema_ref("MonitorShadowUpdated")),
                    "400": json_response("A malformed body.", shadow_error),
                    "401": response_ref("Unauthorized"),
                    "403": csrf_refused,
                    "404": response_ref("NotFound"),
                    "409": json_response("A version conflict.", schema_ref("MonitorShadowError")),
                    "413": json_response("The body is too large.", shadow_error),
                    "429": throttled,
                },
            }
        },
    }
    return {
        "paths": paths,
        "components": {
            # The shadow schemas the answers name, so that the fragment stands on its own.
            "schemas": {**monitor_schemas(), **shadow_schemas_used()},
            "securitySchemes": _security_schemes(),
        },
    }
