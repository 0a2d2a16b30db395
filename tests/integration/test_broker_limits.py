"""AWS IoT Core's limits as the sandbox's broker enforces them, with the shipped defaults:
the payload size and the keep-alive range (see docs/configuration.md, "Platform limits",
for those Mosquitto cannot enforce)."""

from __future__ import annotations

import pytest

from iotref.protocol.limits import MAX_KEEPALIVE_SECONDS, MAX_PAYLOAD_BYTES
from iotref.sandbox.broker.config import PACKET_OVERHEAD_BYTES
from tests.support.mqtt_probe import device_probe, device_topic, operator_probe
from tests.support.sandbox_process import SandboxProcess
from tests.support.tokens import provision_device

pytestmark = pytest.mark.integration

PACKET_TOO_LARGE = 0x95


def test_the_largest_payload_passes_and_a_larger_packet_is_refused(
    sandbox: SandboxProcess,
) -> None:
    device = provision_device(sandbox)
    topic = device_topic(device)
    largest = b"x" * MAX_PAYLOAD_BYTES
    too_large = b"y" * (MAX_PAYLOAD_BYTES + PACKET_OVERHEAD_BYTES + 1)
    with operator_probe(sandbox) as operator, device_probe(sandbox, device) as dev:
        assert operator.subscribe(topic) == [1]
        props = dev.connack_properties
        assert props.MaximumPacketSize == MAX_PAYLOAD_BYTES + PACKET_OVERHEAD_BYTES
        assert dev.publish(topic, largest) == 0
        assert operator.wait_for(topic).payload == largest
        dev.client.reconnect_delay_set(60, 60)  # stay down once dropped
        dev.client.publish(topic, too_large, qos=1)
        assert dev.disconnected.wait(5)
        if dev.disconnect_reason.value != PACKET_TOO_LARGE:
            # The client may see the socket close before it reads the broker's DISCONNECT
            # (paho then reports 0x80, "connection lost"); the broker's log says why.
            refusal = f"Client {device.client_id} disconnected due to oversize packet."
            log = sandbox.data_dir / "logs" / "mosquitto.log"
            assert refusal in log.read_text(encoding="utf-8", errors="replace"), (
                dev.disconnect_reason
            )
        assert operator.received_on(topic, within=0.5) == []


@pytest.mark.parametrize(
    ("asked", "granted"),
    [
        (0, MAX_KEEPALIVE_SECONDS),  # "no keep-alive": the platform's default
        (MAX_KEEPALIVE_SECONDS + 1, MAX_KEEPALIVE_SECONDS),
        (65535, MAX_KEEPALIVE_SECONDS),
        (MAX_KEEPALIVE_SECONDS, None),  # within the range: kept, no Server Keep Alive
        (60, None),
    ],
)
def test_keepalive_above_the_range_is_lowered_in_the_connack(
    sandbox: SandboxProcess, asked: int, granted: int | None
) -> None:
    device = provision_device(sandbox)
    with device_probe(sandbox, device, keepalive=asked) as probe:
        assert getattr(probe.connack_properties, "ServerKeepAlive", None) == granted
