"""An ALPN-checking TCP front for the sandbox's broker, the way AWS IoT Core's port 443
routes by ALPN: it reads the TLS ClientHello, refuses a connection that does not offer
``x-amzn-mqtt-ca``, and otherwise relays the bytes untouched to Mosquitto, so the
mutual-TLS session is end to end between the device and the broker.

:class:`AlpnFront` runs on the caller's event loop (``async with``);
:class:`ThreadedAlpnFront` runs one in a daemon thread of its own, for tests that drive a
subprocess (``with``)."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading

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
    """Accepts TLS on a port of its own; relays to ``upstream`` only what offers ALPN.
    ``seen`` lists the protocols each connection offered."""

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


class ThreadedAlpnFront:
    """An :class:`AlpnFront` on an event loop in a daemon thread: ``with
    ThreadedAlpnFront(broker_port) as front: ... front.port ... front.seen``."""

    def __init__(self, upstream: int) -> None:
        self.front = AlpnFront(upstream)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="alpn-front", daemon=True
        )

    @property
    def port(self) -> int:
        return self.front.port

    @property
    def seen(self) -> list[list[bytes] | None]:
        return list(self.front.seen)

    def __enter__(self) -> ThreadedAlpnFront:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.front.__aenter__(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.front.__aexit__(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
