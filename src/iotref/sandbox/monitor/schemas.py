"""The OpenAPI schemas of the monitor's answers (``components.schemas``, all ``Monitor*``)."""

from __future__ import annotations

from typing import Any

from iotref.sandbox.openapi_fragment import schema_ref


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` or null (``nullable`` next to a ``$ref`` would be ignored in 3.0)."""
    if "$ref" in schema:
        return {"allOf": [schema], "nullable": True}
    return {**schema, "nullable": True}


def object_schema(properties: dict[str, Any], *, closed: bool = True) -> dict[str, Any]:
    """An object whose every property is required."""
    schema: dict[str, Any] = {
        "type": "object",
        "required": list(properties),
        "properties": properties,
    }
    if closed:
        schema["additionalProperties"] = False
    return schema


def _message_properties() -> dict[str, Any]:
    text = nullable({"type": "string"})
    number = nullable({"type": "number"})
    return {
        "id": {"type": "integer", "minimum": 1},
        "received_at": {"type": "number", "description": "Epoch seconds."},
        "topic": {"type": "string"},
        "client_id": {"type": "string"},
        "org_id": text,
        "topic_problem": text,
        "sendereventuuid": text,
        "valid": {"type": "boolean"},
        "errors": {"type": "array", "items": schema_ref("MonitorIssue")},
        "eventtype": text,
        "eventsubtype": text,
        "payloadversion": nullable({"type": "integer"}),
        "assetid": text,
        "assettimestamp": text,
        "status": text,
        "speed": number,
        "productioncounter": number,
        "totalproductioncounter": number,
    }


def monitor_schemas() -> dict[str, Any]:
    text = nullable({"type": "string"})
    number = nullable({"type": "number"})
    count = {"type": "integer", "minimum": 0}
    counters = {"received": count, "valid": count, "invalid": count, "duplicates": count}
    any_value = {"description": "Any JSON value; null when not set."}
    thing_fields = ["org_id", "site_id", "machine_id", "revoked", "provisioned_at"]
    stored = object_schema(
        {
            **_message_properties(),
            "body": {"type": "string", "description": "The payload, when it is UTF-8."},
            "body_base64": {"type": "string", "format": "byte", "description": "Otherwise."},
        }
    )
    stored["required"] = [k for k in stored["required"] if not k.startswith("body")]
    stored["oneOf"] = [{"required": ["body"]}, {"required": ["body_base64"]}]
    return {
        "MonitorIssue": {
            "type": "object",
            "description": "Why a message is invalid: where (a JSON path) and why.",
            "required": ["path", "reason"],
            "properties": {"path": {"type": "string"}, "reason": {"type": "string"}},
        },
        "MonitorMessage": {
            **object_schema(_message_properties()),
            "description": "A stored telemetry message, without its body.",
        },
        "MonitorStoredMessage": {
            **stored,
            "description": "A stored telemetry message with its body (``body`` if the "
            "payload is UTF-8, ``body_base64`` if not).",
        },
        "MonitorTotals": object_schema({"stored": count, **counters}),
        "MonitorRate": {
            "type": "array",
            "description": "Messages per second, oldest second first: ``[epoch second, "
            "count]`` pairs.",
            "items": {
                "type": "array",
                "items": {"type": "integer"},
                "minItems": 2,
                "maxItems": 2,
            },
        },
        "MonitorPermission": {
            "type": "object",
            "description": "``sendTelemetryData`` in the device's shadow (``version`` when "
            "the device has a shadow).",
            "required": ["shadow", "desired", "reported"],
            "properties": {
                "shadow": {"type": "boolean"},
                "desired": any_value,
                "reported": any_value,
                "version": {"type": "integer", "minimum": 1},
            },
            "additionalProperties": False,
        },
        "MonitorQuota": {
            **object_schema(
                {
                    "publish_limit": {
                        **count,
                        "description": "Publish requests a second per connection (0: not "
                        "measured).",
                    },
                    "throughput_limit": {
                        **count,
                        "description": "Bytes a second per connection (0: not measured).",
                    },
                    "messages": {
                        **count,
                        "description": "Publishes counted (telemetry and shadow requests).",
                    },
                    "bytes": {**count, "description": "Their topics and payloads, bytes."},
                    "rate": {**count, "description": "Publishes in the last complete second."},
                    "bytes_rate": {**count, "description": "Bytes in the last complete second."},
                    "peak_rate": {**count, "description": "The busiest second's publishes."},
                    "peak_bytes_rate": {**count, "description": "The busiest second's bytes."},
                    "seconds_over": {
                        **count,
                        "description": "Seconds with more publishes or bytes than the quota.",
                    },
                    "throttled": {
                        **count,
                        "description": "Publishes AWS IoT Core would have throttled (token "
                        "bucket of one second's quota, refilled at the quota's rate).",
                    },
                    "throttled_bytes": {**count, "description": "Their bytes."},
                }
            ),
            "description": "The connection's publishes against AWS IoT Core's per-connection "
            "quotas, as the platform received them (measured, not enforced).",
        },
        "MonitorDevice": {
            "type": "object",
            "description": "A device: provisioned (``known``) or only seen in telemetry, "
            "with its counters; the thing's fields when it is known.",
            "required": [
                "client_id",
                *counters,
                "last_seen",
                "known",
                "online",
                "send_telemetry",
                "quota",
            ],
            "properties": {
                "client_id": {"type": "string"},
                **counters,
                "org_id": text,
                "topic_problem": text,
                "first_seen": number,
                "last_seen": number,
                "last_status": text,
                "last_speed": number,
                "last_productioncounter": number,
                "last_totalproductioncounter": number,
                "last_assettimestamp": text,
                "known": {"type": "boolean"},
                "site_id": {"type": "string"},
                "machine_id": text,
                "revoked": {"type": "boolean"},
                "provisioned_at": {"type": "string", "format": "date-time"},
                "online": {"type": "boolean"},
                "send_telemetry": nullable(schema_ref("MonitorPermission")),
                "quota": schema_ref("MonitorQuota"),
            },
            "oneOf": [
                {
                    "properties": {"known": {"type": "boolean", "enum": [True]}},
                    "required": thing_fields,
                },
                {
                    "properties": {
                        "known": {"type": "boolean", "enum": [False]},
                        "send_telemetry": {"type": "object", "nullable": True, "enum": [None]},
                    },
                    "not": {"anyOf": [{"required": [name]} for name in thing_fields[1:]]},
                },
            ],
        },
        "MonitorShadow": object_schema(
            {
                "desired": nullable({"type": "object"}),
                "reported": nullable({"type": "object"}),
                "delta": nullable({"type": "object"}),
                "version": {"type": "integer", "minimum": 1},
                "metadata": {
                    "type": "object",
                    "properties": {
                        "desired": {"type": "object"},
                        "reported": {"type": "object"},
                    },
                    "additionalProperties": False,
                },
                "timestamp": {"type": "integer", "description": "Epoch seconds."},
            }
        ),
        "MonitorShadowUpdated": object_schema(
            {
                "accepted": schema_ref("ShadowUpdateAccepted"),
                "shadow": nullable(schema_ref("MonitorShadow")),
            }
        ),
        "MonitorShadowError": {
            **object_schema(
                {
                    "error": {
                        "type": "string",
                        "enum": ["invalid_shadow_update", "shadow_update_rejected"],
                    },
                    "code": {"type": "integer"},
                    "message": {"type": "string"},
                }
            ),
            "description": "The shadow service refused the update: its error code and message.",
        },
        "MonitorSummary": object_schema(
            {
                "now": {"type": "number", "description": "Epoch seconds."},
                "online_window": {"type": "number"},
                "limits": {
                    **object_schema(
                        {
                            "publish_rate": count,
                            "throughput": count,
                            "shadow_rate": count,
                            "shadow_in_flight": count,
                            "shadow_state_bytes": {"type": "integer", "minimum": 1},
                            "shadow_depth": {"type": "integer", "minimum": 1},
                        }
                    ),
                    "description": "The AWS IoT Core limits this sandbox applies (``sandbox "
                    "up`` options; 0: off).",
                },
                "ingestion": {
                    "type": "object",
                    "description": "The ingestion's state and its totals.",
                    "required": ["subscribed", "connections", "topic_filter"],
                    "properties": {
                        "subscribed": {"type": "boolean"},
                        "connections": {"type": "integer", "minimum": 1},
                        "topic_filter": {"type": "string"},
                        "batches": {
                            **count,
                            "description": "Transactions the ingestion has stored.",
                        },
                        "queued_chunks": {
                            **count,
                            "description": "No longer reported (nothing queues up in the "
                            "sandbox process any more); kept for older clients.",
                        },
                        "stored": count,
                        **counters,
                    },
                },
                "totals": schema_ref("MonitorTotals"),
                "retention": object_schema(
                    {
                        "max_messages": nullable({"type": "integer", "minimum": 1}),
                        "max_age_seconds": nullable({"type": "number", "minimum": 1}),
                        "pruned": {
                            **count,
                            "description": "Stored messages removed by the retention "
                            "policy (the totals still count them).",
                        },
                        "prune_passes": count,
                    }
                ),
                "rate": schema_ref("MonitorRate"),
                "devices": {"type": "array", "items": schema_ref("MonitorDevice")},
                "pending_authorizations": {
                    "type": "array",
                    "items": object_schema(
                        {
                            "user_code": {"type": "string"},
                            "created_at": {"type": "string", "format": "date-time"},
                            "expires_at": {"type": "string", "format": "date-time"},
                            "verification_uri_complete": {"type": "string"},
                        }
                    ),
                },
            }
        ),
        "MonitorDeviceDetail": {
            "allOf": [
                schema_ref("MonitorDevice"),
                {
                    "type": "object",
                    "required": ["shadow", "rate", "series", "messages"],
                    "properties": {
                        "shadow": nullable(schema_ref("MonitorShadow")),
                        "rate": schema_ref("MonitorRate"),
                        "series": {
                            "type": "array",
                            "items": object_schema(
                                {
                                    "id": {"type": "integer", "minimum": 1},
                                    "t": {"type": "number"},
                                    "assetid": text,
                                    "speed": number,
                                    "productioncounter": number,
                                    "totalproductioncounter": number,
                                }
                            ),
                        },
                        "messages": {"type": "array", "items": schema_ref("MonitorMessage")},
                    },
                },
            ]
        },
    }
