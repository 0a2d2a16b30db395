"""MQTT topic names of the platform (contract section 6): telemetry and device shadow."""

from __future__ import annotations

SHADOW_OPERATIONS = ("get", "update", "delete")
SHADOW_RESPONSE_SUFFIXES = (
    "get/accepted",
    "get/rejected",
    "update/accepted",
    "update/rejected",
    "update/delta",
    "update/documents",
    "delete/accepted",
    "delete/rejected",
)


def telemetry_topic(telemetry_prefix: str, org_id: str, client_id: str) -> str:
    """``{telemetry_topic}/{org_id}/{client_id}``."""
    return f"{telemetry_prefix.rstrip('/')}/{org_id}/{client_id}"


def shadow_prefix(thing_name: str, shadow_name: str | None = None) -> str:
    """The topic prefix of a classic (``shadow_name=None``) or named shadow."""
    if shadow_name is None:
        return f"$aws/things/{thing_name}/shadow"
    return f"$aws/things/{thing_name}/shadow/name/{shadow_name}"


def shadow_topic(thing_name: str, suffix: str, shadow_name: str | None = None) -> str:
    """A shadow topic such as ``$aws/things/T/shadow/update/accepted``."""
    return f"{shadow_prefix(thing_name, shadow_name)}/{suffix}"


def parse_shadow_topic(topic: str) -> tuple[str, str | None, str] | None:
    """Split a shadow topic into ``(thing_name, shadow_name, suffix)``, or ``None``.

    ``suffix`` is what follows the shadow prefix, e.g. ``update`` or ``get/accepted``.
    """
    parts = topic.split("/")
    if len(parts) < 5 or parts[0] != "$aws" or parts[1] != "things" or parts[3] != "shadow":
        return None
    thing = parts[2]
    rest = parts[4:]
    shadow_name: str | None = None
    if rest[0] == "name":
        if len(rest) < 3:
            return None
        shadow_name = rest[1]
        rest = rest[2:]
    suffix = "/".join(rest)
    if suffix in SHADOW_OPERATIONS or suffix in SHADOW_RESPONSE_SUFFIXES:
        return thing, shadow_name, suffix
    return None
