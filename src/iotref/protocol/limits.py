"""The platform's limits on one device, shared by the device and the sandbox.

The device refuses a message over :data:`MAX_PAYLOAD_BYTES` before queueing it, the
publisher never publishes one, and the sandbox's broker and shadow service refuse what is
larger, as the platform does.

The other figures are AWS IoT Core's message broker and protocol quotas and its Device
Shadow service's, each with its source. Which of them the sandbox enforces or measures,
and how, is listed in docs/configuration.md ("Platform limits").
"""

from __future__ import annotations

from typing import Final

MAX_PAYLOAD_BYTES: Final = 128 * 1024
"""The largest payload of one MQTT publish the platform accepts, in bytes (128 KB).

Source: AWS General Reference, "AWS IoT Core endpoints and quotas", section "Message
broker and protocol limits and quotas", quota "MQTT payload size": 128 KB per publish
request, not adjustable; AWS IoT Core rejects larger publish and connect requests
(https://docs.aws.amazon.com/general/latest/gr/iot-core.html#message-broker-limits)."""

MAX_CLIENT_ID_BYTES: Final = 128
"""Longest MQTT client id, in bytes of UTF-8 (quota "Client ID size"; same source)."""

MAX_TOPIC_BYTES: Final = 256
"""Longest topic of a publish, in bytes of UTF-8 (quota "Topic size"; same source)."""

MAX_TOPIC_SLASHES: Final = 7
"""Most forward slashes in a topic or topic filter, i.e. at most 8 levels (quota "Maximum
number of slashes in topic and topic filter"; same source). The ``$aws/rules/<rule>/``
prefix of Basic Ingest and the two slashes of ``$share/<group>/`` are not counted."""

MAX_SUBSCRIPTIONS_PER_CONNECTION: Final = 50
"""Topic filters one connection may hold (quota "Subscriptions per connection"; same
source). AWS IoT Core may refuse more and close the connection."""

MAX_TOPIC_FILTERS_PER_SUBSCRIBE: Final = 8
"""Topic filters in one SUBSCRIBE packet (same source; "Maximum subscriptions per subscribe
request" in the Developer Guide's former "AWS IoT Limits" page)."""

MIN_KEEPALIVE_SECONDS: Final = 30
MAX_KEEPALIVE_SECONDS: Final = 1200
"""The keep-alive range AWS IoT Core honours (same source; the rules are spelled out in the
AWS IoT Developer Guide's former "AWS IoT Limits" page, "Connection inactivity (keep-alive
interval)", https://github.com/awsdocs/aws-iot-docs/blob/master/doc_source/limits-iot.md):
a client asking for 0 or for more than 1200 s gets 1200 s (MQTT 5: the Server Keep Alive
of the CONNACK says so); one asking for 1..29 s is treated as if it asked for 30 s."""

DEFAULT_SESSION_EXPIRY_SECONDS: Final = 3600
MAX_SESSION_EXPIRY_SECONDS: Final = 7 * 24 * 3600
"""How long a persistent session outlives its connection: 1 hour by default, adjustable per
account up to 7 days; a longer Session Expiry Interval is lowered to the account's value
(quota "Persistent session expiry period", same source; AWS IoT Developer Guide, "MQTT 5
properties", Session Expiry Interval,
https://docs.aws.amazon.com/iot/latest/developerguide/mqtt.html)."""

PUBLISH_REQUESTS_PER_SECOND_PER_CONNECTION: Final = 100
"""Inbound and outbound publishes per second on one connection, not adjustable; the rest
is throttled (quota "Publish requests per second per connection"; same source)."""

THROUGHPUT_BYTES_PER_SECOND_PER_CONNECTION: Final = 512 * 1024
"""Bytes per second received or sent on one connection, not adjustable; more is delayed
(quota "Throughput per second per connection"; same source)."""

CONNECT_REQUESTS_PER_SECOND_PER_CLIENT_ID: Final = 1
"""CONNECT requests per second with one client id, not adjustable (quota "Connect requests
per second per client ID"; same source)."""

# --------------------------------------------------------------------------- device shadow
# Sources: the General Reference page above, section "Device Shadow"; the AWS IoT Developer
# Guide's "Device Shadow error messages"
# (https://docs.aws.amazon.com/iot/latest/developerguide/device-shadow-error-messages.html)
# and "Diagnosing problems with shadows"
# (https://docs.aws.amazon.com/iot/latest/developerguide/diagnosing-shadows.html).

SHADOW_STATE_MAX_BYTES: Final = 8 * 1024
"""Bytes of a shadow's state (quota "Maximum size of a JSON state document", 8 KB). Only
desired and reported count, together; metadata does not ("Diagnosing problems with
shadows": the shadow supports 8 KB of data, only the desired and reported state counts
toward it). Over it: 413 "The payload exceeds the maximum size allowed"."""

SHADOW_MAX_DEPTH: Final = 6
"""Levels of nesting in desired or reported, in the 400 answer's own words: "JSON contains
too many levels of nesting; maximum is 6" ("Device Shadow error messages"). Where AWS's
pages differ on this figure, the strictest one is kept (see docs/configuration.md)."""

SHADOW_REQUESTS_PER_SECOND_PER_THING: Final = 20
"""Shadow requests a second for one thing (General Reference, Device Shadow: 20 requests
per second per thing); more are answered 429 "Too Many Requests"."""

SHADOW_IN_FLIGHT_REQUESTS_PER_THING: Final = 10
"""Shadow requests of one thing started and not yet completed (quota "Maximum number of
in-flight, unacknowledged messages per thing", 10; "Device Shadow error messages", 429:
"more than 10 in-flight requests on a single connection")."""

SHADOW_NAME_MAX_BYTES: Final = 64
"""Longest shadow name, bytes of UTF-8 (quota "Maximum size of a shadow name"); the
``iot-data`` API reference's pattern is ``[$a-zA-Z0-9:_-]+``."""

THING_NAME_MAX_BYTES: Final = 128
"""Longest thing name, bytes of UTF-8 (quota "Maximum size of a thing name"); the API
reference's pattern is ``[a-zA-Z0-9:_-]+``."""

SHADOW_CLIENT_TOKEN_MAX_BYTES: Final = 64
"""Longest ``clientToken`` of a shadow request, bytes ("Device Shadow error messages", 400
"Invalid clientToken": "A client token that is longer than 64 bytes will cause this
response")."""
