"""Which failed publishes retrying cannot fix.

A QoS 1 publish of telemetry fails for one of two kinds of reasons:

* something about the connection or the broker's state at that moment: the connection
  was lost or stopped, the broker is over a quota, it gave no reason, it had an internal
  error. A later attempt may succeed, so the publisher keeps the message first in line and
  tries again (after a growing pause when the connection is up).
* something about this message itself: the broker refuses it for good, or the MQTT
  library refuses to send it. Every attempt meets the same answer, so the publisher moves
  the message out of the queue into the outbox's kept table of refused messages
  (:meth:`iotref.device.telemetry.outbox.Outbox.refuse`) and goes on with the next ones, in order.

The decision follows the MQTT 5 meaning of the PUBACK reason codes (OASIS MQTT 5.0,
section 3.4.2.1) and the errors awscrt reports before sending:

========  ==========================  ===================================================
code      name                        decision
========  ==========================  ===================================================
0x87      Not authorized              refused for good: the thing's policy does not let it
                                      publish there; the same message meets the same
                                      policy on every attempt
0x90      Topic Name invalid          refused for good: the topic is part of the message
0x95      Packet too large            refused for good: the message does not shrink
0x99      Payload format invalid      refused for good: the payload does not change
0x80      Unspecified error           retried: no reason given, so nothing says that this
                                      message is at fault; dropping it on a broker's
                                      passing trouble would lose data
0x83      Implementation specific     retried, for the same reason (AWS IoT Core and other
                                      brokers use it for their own internal failures)
0x91      Packet Identifier in use    retried: a session-state mismatch, gone on the next
                                      attempt with a new packet identifier
0x97      Quota exceeded              retried: a rate or size quota of the moment
========  ==========================  ===================================================

awscrt errors refused for good: ``AWS_ERROR_MQTT5_PACKET_VALIDATION`` (the publish breaks a
limit the broker announced in its CONNACK, such as its maximum packet size) and
``AWS_ERROR_MQTT5_PUBLISH_OPTIONS_VALIDATION`` (an invalid topic, e.g. with a wildcard).
Every other failure, including all those without a reason code (connection lost, client
stopped, offline queue policy, timeouts), is retried.
"""

from __future__ import annotations

from typing import Final

PERMANENT_PUBACK_CODES: Final[dict[int, str]] = {
    0x87: "not authorized",
    0x90: "topic name invalid",
    0x95: "packet too large",
    0x99: "payload format invalid",
}
"""PUBACK reason codes that refuse a message for good, with their MQTT 5 names."""

PERMANENT_CRT_ERRORS: Final[frozenset[str]] = frozenset(
    {"AWS_ERROR_MQTT5_PACKET_VALIDATION", "AWS_ERROR_MQTT5_PUBLISH_OPTIONS_VALIDATION"}
)
"""awscrt error names that refuse a publish for good (it is never sent)."""


def permanent_refusal(exc: BaseException) -> str | None:
    """Why ``exc`` (a failed publish) refuses the message for good, in a few words, or
    None if another attempt may succeed. Reads the ``reason_code`` and ``error_name``
    attributes of :class:`iotref.device.connection.errors.PublishFailed`; anything without them
    is taken as retryable."""
    code = getattr(exc, "reason_code", None)
    if isinstance(code, int) and code in PERMANENT_PUBACK_CODES:
        return f"the broker refused it: {PERMANENT_PUBACK_CODES[code]} (0x{code:02X})"
    name = getattr(exc, "error_name", None)
    if isinstance(name, str) and name in PERMANENT_CRT_ERRORS:
        return f"the MQTT library refused to send it: {name}"
    return None
