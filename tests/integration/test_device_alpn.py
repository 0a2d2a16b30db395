"""ALPN ``x-amzn-mqtt-ca``, as AWS IoT Core requires for MQTT with client certificates on
port 443: the device offers it when asked to, on whatever port it is given.

The test puts an ALPN-checking TCP front (:mod:`tests.support.alpn_front`) in front of the
sandbox's broker, the way AWS's port 443 routes by ALPN; ``iotref run --port --alpn`` is
tested the same way in ``test_run_command.py``."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from iotref.device.connection.connection import Connection
from iotref.device.connection.errors import ConnectionFailed
from tests.support.alpn_front import ALPN, AlpnFront, offered_alpn
from tests.support.device_connection import QUICK_RETRY, device_settings
from tests.support.device_keys import DeviceFiles
from tests.support.sandbox_process import SandboxProcess

pytestmark = pytest.mark.integration


def test_client_hello_parser_reads_alpn() -> None:
    import ssl

    context = ssl.create_default_context()
    context.set_alpn_protocols(["x-amzn-mqtt-ca", "h2"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    assert offered_alpn(outgoing.read()) == [b"x-amzn-mqtt-ca", b"h2"]
    assert offered_alpn(b"\x17\x03\x03\x00\x01x") is None


def test_alpn_connection_works_end_to_end_on_its_own_port(
    sandbox: SandboxProcess, device: DeviceFiles
) -> None:
    async def main() -> None:
        async with AlpnFront(sandbox.mqtt_port) as front:
            async with Connection(
                device_settings(sandbox.info, device, QUICK_RETRY, port=front.port, alpn=True)
            ) as conn:
                got: asyncio.Queue[bytes] = asyncio.Queue()
                topic = f"$aws/things/{device.client_id}/shadow/get/accepted"
                await conn.subscribe(topic, lambda m: got.put_nowait(m.payload))
                await conn.publish(f"$aws/things/{device.client_id}/shadow/get", b"{}")
                # The shadow answers (accepted or, without a shadow, rejected) prove the
                # round trip through the ALPN front; accepted exists after provisioning.
                payload = await asyncio.wait_for(got.get(), 10)
                assert b"state" in payload
            assert front.seen
            assert all(p is not None and ALPN in p for p in front.seen)

    asyncio.run(main())


def test_without_alpn_the_front_refuses(sandbox: SandboxProcess, device: DeviceFiles) -> None:
    async def main() -> None:
        async with AlpnFront(sandbox.mqtt_port) as front:
            settings = device_settings(
                sandbox.info, device, QUICK_RETRY, port=front.port, alpn=False
            )
            with pytest.raises(ConnectionFailed):
                await Connection(settings).start()
            assert front.seen
            assert all(not p for p in front.seen)

    asyncio.run(main())
