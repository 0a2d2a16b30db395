"""The fault proxy of the reliability tests, against a local echo server: plain relaying,
latency, throttling, cuts, a closed door, half-open stalls and retargeting."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.support.fault_proxy import FaultProxy


class EchoServer:
    """A threaded TCP echo server that remembers whether its connections were closed."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.closed_by_peer = threading.Event()
        self.connections = 0
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    self.closed_by_peer.set()
                    return
                try:
                    conn.sendall(data)
                except OSError:
                    return

    def close(self) -> None:
        self._stop = True
        self.listener.close()
        self._thread.join(2)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy(echo.port) as p:
        yield p


def dial(proxy: FaultProxy, timeout: float = 5) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def receive(sock: socket.socket, size: int) -> bytes:
    out = b""
    while len(out) < size:
        chunk = sock.recv(65536)
        if not chunk:
            break
        out += chunk
    return out


def round_trip(sock: socket.socket, payload: bytes) -> float:
    started = time.monotonic()
    sock.sendall(payload)
    assert receive(sock, len(payload)) == payload
    return time.monotonic() - started


def closed(sock: socket.socket, within: float = 3) -> bool:
    """Whether the peer closed or reset ``sock`` within the time."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_relays_both_ways_and_counts_bytes(proxy: FaultProxy) -> None:
    with dial(proxy) as sock:
        round_trip(sock, b"hello" * 1000)
    stats = proxy.stats()
    assert stats.accepted == 1
    assert stats.bytes_up == stats.bytes_down == 5000


def test_latency_delays_each_direction(proxy: FaultProxy) -> None:
    with dial(proxy) as sock:
        assert round_trip(sock, b"x") < 0.2
        proxy.set_latency(0.15)
        assert 0.3 <= round_trip(sock, b"y") < 1.0
        proxy.set_latency(0)
        assert round_trip(sock, b"z") < 0.2


def test_latency_with_jitter_keeps_order(proxy: FaultProxy) -> None:
    proxy.set_latency(0.01, jitter=0.05)
    with dial(proxy) as sock:
        for i in range(30):
            sock.sendall(f"{i:03d}".encode())
            time.sleep(0.002)
        assert receive(sock, 90) == b"".join(f"{i:03d}".encode() for i in range(30))


def test_bandwidth_throttles(proxy: FaultProxy) -> None:
    proxy.set_bandwidth(40_000)
    with dial(proxy, timeout=10) as sock:
        took = round_trip(sock, b"a" * 20_000)  # 0.5 s each way, the two overlap
    assert 0.45 <= took < 3.0
    proxy.set_bandwidth(None)
    with dial(proxy) as sock:
        assert round_trip(sock, b"a" * 20_000) < 0.5


def test_cut_resets_open_connections_only(proxy: FaultProxy, echo: EchoServer) -> None:
    with dial(proxy) as first:
        round_trip(first, b"1")
        assert proxy.cut() == 1
        assert closed(first)
        assert echo.closed_by_peer.wait(3)
        with dial(proxy) as second:  # new connections still work
            round_trip(second, b"2")
    assert proxy.stats().cuts == 1 and proxy.stats().connections_cut == 1


def test_refuse_closes_new_connections_until_admitted(proxy: FaultProxy) -> None:
    with dial(proxy) as kept:
        round_trip(kept, b"through")  # relayed before the door closes
        proxy.refuse()
        with dial(proxy) as refused:
            assert closed(refused)
        round_trip(kept, b"still here")  # open connections are not touched
        proxy.admit()
        with dial(proxy) as again:
            round_trip(again, b"in")
    assert proxy.stats().refused == 1


def test_stall_holds_data_without_closing_and_resume_delivers(proxy: FaultProxy) -> None:
    with dial(proxy) as sock:
        round_trip(sock, b"before")
        proxy.stall()
        assert proxy.stalled
        sock.sendall(b"held")
        assert not closed(sock, within=0.5)  # no data, no close: half-open
        proxy.resume()
        sock.settimeout(3)
        assert receive(sock, 4) == b"held"


def test_close_during_a_stall_is_not_propagated_until_resume(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    sock = dial(proxy)
    round_trip(sock, b"x")
    proxy.stall()
    sock.close()
    assert not echo.closed_by_peer.wait(0.5)  # the server does not learn of it
    proxy.resume()
    assert echo.closed_by_peer.wait(3)


def test_connections_made_during_a_stall_are_stalled(proxy: FaultProxy) -> None:
    proxy.stall()
    with dial(proxy) as sock:
        sock.sendall(b"early")
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(5)
        proxy.resume()
        sock.settimeout(3)
        assert receive(sock, 5) == b"early"


def test_retarget_sends_new_connections_elsewhere(proxy: FaultProxy, echo: EchoServer) -> None:
    other = EchoServer()
    try:
        proxy.retarget(other.port)
        with dial(proxy) as sock:
            round_trip(sock, b"there")
        assert other.connections == 1 and echo.connections == 0
    finally:
        other.close()


def test_unreachable_target_closes_the_client(echo: EchoServer) -> None:
    with socket.create_server(("127.0.0.1", 0)) as spare:
        dead_port = spare.getsockname()[1]
    with FaultProxy(dead_port) as proxy, dial(proxy) as sock:
        assert closed(sock)
        assert proxy.stats().upstream_failures == 1


def test_clear_lifts_every_fault(proxy: FaultProxy) -> None:
    proxy.set_latency(1)
    proxy.set_bandwidth(10)
    proxy.refuse()
    proxy.stall()
    proxy.clear()
    with dial(proxy) as sock:
        assert round_trip(sock, b"ok" * 100) < 0.3
