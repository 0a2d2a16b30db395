"""The ``iotref sandbox up`` options that set the AWS IoT Core limits the sandbox applies
(:class:`iotref.sandbox.limits.SandboxLimits`), AWS's values by default."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from iotref.sandbox.limits import SandboxLimits

F = TypeVar("F", bound=Callable[..., Any])

_DEFAULTS = SandboxLimits()

# (option, SandboxLimits field, minimum, help)
LIMIT_OPTIONS: tuple[tuple[str, str, int, str], ...] = (
    (
        "--publish-rate-limit",
        "publish_rate",
        0,
        "Publish requests a second per device connection (AWS IoT Core: 100). Measured: "
        "the monitor counts what AWS would have throttled. 0: not measured.",
    ),
    (
        "--throughput-limit",
        "throughput",
        0,
        "Bytes a second per device connection (AWS IoT Core: 512 KiB). Measured like "
        "--publish-rate-limit. 0: not measured.",
    ),
    (
        "--shadow-rate-limit",
        "shadow_rate",
        0,
        "Shadow requests a second per thing; more are answered 429 (AWS: 20). 0: no limit.",
    ),
    (
        "--shadow-in-flight-limit",
        "shadow_in_flight",
        0,
        "Shadow requests per thing in flight over MQTT; more are answered 429 (AWS: 10). "
        "0: no limit.",
    ),
    (
        "--shadow-max-bytes",
        "shadow_state_bytes",
        1,
        "Bytes of a shadow's desired and reported state together; more is answered 413 "
        "(AWS: 8 KB).",
    ),
    (
        "--shadow-max-depth",
        "shadow_depth",
        1,
        "Levels of nesting in a shadow's desired or reported; deeper is answered 400 (AWS: 6).",
    ),
)


def limit_options(command: F) -> F:
    """Add the limit options to a click command (they arrive as ``limit_<field>``)."""
    for option, name, minimum, text in reversed(LIMIT_OPTIONS):
        command = click.option(
            option,
            f"limit_{name}",
            type=click.IntRange(minimum),
            default=getattr(_DEFAULTS, name),
            show_default=True,
            help=text,
        )(command)
    return command


def limits_from(options: dict[str, Any]) -> SandboxLimits:
    """The :class:`SandboxLimits` of the ``limit_<field>`` values a command received."""
    return SandboxLimits(**{name: options[f"limit_{name}"] for _, name, _, _ in LIMIT_OPTIONS})
