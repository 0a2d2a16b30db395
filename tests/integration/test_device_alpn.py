"""ALPN ``x-amzn-mqtt-ca``, as AWS IoT Core requires for MQTT with client certificates on
port 443: the device offers it when asked to, on whatever port it is given.

The test puts an ALPN-checking TCP front in front of the sandbox's broker, the way AWS's
port 443 routes by ALPN: it reads the TLS ClientHello, refuses a connection that does not
offer ``x-amzn-mqtt-ca``, and otherwise relays the bytes untouched to Mosquitto, so the
mutual-TLS session is end to end between the device and the broker."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from pathlib import Path

import pytest

from iotref.device.connection import Connection, ConnectionFailed, ConnectionSettings
from tests.support.device_keys import DeviceFiles
from tests.support.sandbox_process import SandboxProcess
from tests.support.tokens import provision_device

pytestmark = pytest.mark.integration

ALPN = b"x-amzn-mqtt-ca"


def offered_alpn(hello: bytes) -> list[bytes] | None:
    """The ALPN protocols of a TLS ClientHello record, [] if none, None if unparsable."""
    try:
        if hello[0] != 0x16 or hello[5] != 0x01:  # handshake record, ClientHello
            return None
        pos = 5 + 4 + 2 + 32  # record header, handshake header, version, random
        pos += 1 + hello[pos]  # session id
        pos += 2 + struct.unpack_from("!H", hello, pos)[0]  # cipher suites
        pos += 1 + hello[pos]  # compression methods
        end = pos + 2 + struct.unpack_from("!H", hello, pos)[0]
        pos += 2
        while pos + 4 <= end:
            kind, size = struct.unpack_from("!HH", hello, pos)
            pos += 4
            if kind == 16:  # application_layer_protocol_negotiation
                names, cursor = [], pos + 2
                while cursor < pos + size:
                    length = hello[cursor]
                    names.append(hello[cursor + 1 : cursor + 1 + length])
                    cursor += 1 + length
                return names
            pos += size
        return []
    except (IndexError, struct.error):
        return None


class AlpnFront:
    """Accepts TLS on a port of its own; relays to ``upstream`` only what offers ALPN."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.seen: list[list[bytes] | None] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> AlpnFront:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            header = await reader.readexactly(5)
            body = await reader.readexactly(struct.unpack_from("!H", header, 3)[0])
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        protocols = offered_alpn(header + body)
        self.seen.append(protocols)
        if not protocols or ALPN not in protocols:
            writer.close()  # as AWS IoT's 443 does for a client without the protocol
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        up_writer.write(header + body)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@pytest.fixture(scope="module")
def device(sandbox: SandboxProcess) -> DeviceFiles:
    return provision_device(sandbox)


def _settings(
    sandbox: SandboxProcess, dev: DeviceFiles, port: int, alpn: bool
) -> ConnectionSettings:
    return ConnectionSettings(
        endpoint=sandbox.info["mqtt_host"], port=port, client_id=dev.client_id,
        cert_path=dev.cert_path, key_path=dev.key_path, ca_path=Path(sandbox.info["ca_file"]),
        alpn=alpn, connect_timeout_s=5.0, min_backoff_s=0.1, max_backoff_s=1.0,
    )  # fmt: skip


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
            async with Connection(_settings(sandbox, device, front.port, alpn=True)) as conn:
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
            settings = _settings(sandbox, device, front.port, alpn=False)
            with pytest.raises(ConnectionFailed):
                await Connection(settings).start()
            assert front.seen
            assert all(not p for p in front.seen)

    asyncio.run(main())
