"""AWS IoT Core's documented limits that the platform applies to one device, one constant
per limit, each with the page that documents it.

The sandbox enforces or measures them (its ``sandbox up`` options default to these
values); the device library stays inside them. docs/configuration.md lists them all, with
how the sandbox models each.
"""

from __future__ import annotations

from typing import Final

QUOTAS_PAGE: Final = "https://docs.aws.amazon.com/general/latest/gr/iot-core.html"
"""AWS General Reference, "AWS IoT Core endpoints and quotas"."""
SHADOW_ERRORS_PAGE: Final = (
    "https://docs.aws.amazon.com/iot/latest/developerguide/device-shadow-error-messages.html"
)
"""AWS IoT developer guide, "Device Shadow error messages"."""
SHADOW_DIAGNOSIS_PAGE: Final = (
    "https://docs.aws.amazon.com/iot/latest/developerguide/diagnosing-shadows.html"
)
"""AWS IoT developer guide, "Diagnosing problems with shadows"."""

# --------------------------------------------------------------------------- message broker

# QUOTAS_PAGE, message broker: "Publish requests per second per connection", 100, not
# adjustable. AWS's own device SDK (aws-c-mqtt, under awscrt) models it as a token bucket
# of 100 tokens refilled at 100 per second.
PUBLISH_REQUESTS_PER_SECOND_PER_CONNECTION: Final = 100

# QUOTAS_PAGE, message broker: "Throughput per connection", 512 KiB of inbound and
# outbound data per second on one client connection; above it the data is throttled.
THROUGHPUT_BYTES_PER_SECOND_PER_CONNECTION: Final = 512 * 1024

# QUOTAS_PAGE, message broker: "Message size", 128 KB payload per PUBLISH; a larger one
# is refused. The shadow service refuses larger requests with 413 (SHADOW_ERRORS_PAGE).
MESSAGE_PAYLOAD_MAX_BYTES: Final = 128 * 1024

# --------------------------------------------------------------------------- device shadow

# QUOTAS_PAGE, Device Shadow: "Maximum size of a JSON state document", 8 KB. Only the
# desired and reported state counts toward it, metadata does not (SHADOW_DIAGNOSIS_PAGE:
# "The device's shadow supports 8 KB of data only ... Only the data for desired and
# reported state inside the state document ... counts toward the limit"): the two
# sections together. Over it: 413 "The payload exceeds the maximum size allowed".
SHADOW_STATE_MAX_BYTES: Final = 8 * 1024

# SHADOW_ERRORS_PAGE, 400: "JSON contains too many levels of nesting; maximum is 6",
# levels inside desired or reported. QUOTAS_PAGE's table has given other figures over
# time (5, and 8 in its current revision as quoted elsewhere); the sandbox keeps the
# strictest documented one, so a document it accepts fits every revision.
SHADOW_MAX_DEPTH: Final = 6

# QUOTAS_PAGE, Device Shadow: "Requests per second per thing", 20 shadow requests a
# second for one thing; more are refused with 429 "Too Many Requests".
SHADOW_REQUESTS_PER_SECOND_PER_THING: Final = 20

# QUOTAS_PAGE, Device Shadow: "Maximum number of in-flight, unacknowledged messages per
# thing", 10; SHADOW_ERRORS_PAGE, 429: generated "when there are more than 10 in-flight
# requests on a single connection" (started, not yet completed).
SHADOW_IN_FLIGHT_REQUESTS_PER_THING: Final = 10

# QUOTAS_PAGE, Device Shadow: "Maximum size of a shadow name", 64 bytes (UTF-8), and the
# iot-data API reference's pattern [a-zA-Z0-9:_-].
SHADOW_NAME_MAX_BYTES: Final = 64

# QUOTAS_PAGE, things and Device Shadow: "Maximum size of a thing name", 128 bytes (UTF-8).
THING_NAME_MAX_BYTES: Final = 128

# SHADOW_ERRORS_PAGE, 400 "Invalid clientToken": "A client token that is longer than 64
# bytes will cause this response."
SHADOW_CLIENT_TOKEN_MAX_BYTES: Final = 64
