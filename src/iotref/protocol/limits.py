"""The platform's limits on one MQTT message, shared by the device and the sandbox.

The device refuses a message over :data:`MAX_PAYLOAD_BYTES` before queueing it, the
publisher never publishes one, and the sandbox's broker and shadow service refuse what is
larger, as the platform does.
"""

from __future__ import annotations

from typing import Final

MAX_PAYLOAD_BYTES: Final = 128 * 1024
"""The largest payload of one MQTT publish the platform accepts, in bytes (128 KB).

Source: AWS General Reference, "AWS IoT Core endpoints and quotas", section "Message
broker and protocol limits and quotas", quota "MQTT payload size": 128 KB per publish
request, not adjustable; AWS IoT Core rejects larger publish and connect requests
(https://docs.aws.amazon.com/general/latest/gr/iot-core.html#message-broker-limits)."""
