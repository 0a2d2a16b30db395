"""Local TCP ports: one nothing listens on, and whether something accepts on one."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A local TCP port nothing listens on (bound to 127.0.0.1 and let go)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a TCP connection to ``host:port`` is accepted (within half a second)."""
    try:
        socket.create_connection((host, port), timeout=0.5).close()
    except OSError:
        return False
    return True
