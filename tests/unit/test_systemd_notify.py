"""The sd_notify protocol against real AF_UNIX datagram sockets bound by the test, at a
file system path and in the abstract namespace: what each call sends, the sender's
credentials the kernel passes on (systemd's check of the PID), the watchdog's interval and
WATCHDOG_PID, and a socket that is gone (logged once, never raised)."""

from __future__ import annotations

import logging
import os
import socket
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from iotref.device.systemd_notify import SystemdNotifier, notify_address


class NotifySocket:
    """A bound datagram socket as systemd has it (SO_PASSCRED on)."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(5)

    def receive(self) -> tuple[list[str], int]:
        """The next datagram's assignments and the sender's PID (SCM_CREDENTIALS)."""
        data, ancillary, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = -1
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _uid, _gid = struct.unpack("iII", value[:12])
        return data.decode().split("\n"), pid

    def nothing_more(self) -> bool:
        self.sock.settimeout(0.2)
        try:
            self.sock.recv(4096)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, NotifySocket]]:
    path = str(tmp_path / "notify")
    listener = NotifySocket(path)
    yield path, listener
    listener.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, NotifySocket]]:
    name = f"iotref-test-{uuid.uuid4().hex}"
    listener = NotifySocket(b"\0" + name.encode())
    yield f"@{name}", listener
    listener.close()


def test_addresses() -> None:
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@sd-notify") == b"\0sd-notify"
    assert notify_address("@") is None
    assert notify_address("vsock:2:1234") is None
    assert notify_address("relative/path") is None


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = SystemdNotifier.from_environment({})
    assert not notifier.enabled and notifier.watchdog_interval_s is None
    assert notifier.ready("up") is False
    assert notifier.watchdog() is False
    # WATCHDOG_USEC without a socket to send to: no watchdog either.
    assert (
        SystemdNotifier.from_environment({"WATCHDOG_USEC": "1000000"}).watchdog_interval_s is None
    )


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_notifications_arrive_with_the_senders_pid(
    kind: str,
    path_socket: tuple[str, NotifySocket],
    abstract_socket: tuple[str, NotifySocket],
) -> None:
    address, listener = path_socket if kind == "path" else abstract_socket
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": address})
    try:
        assert notifier.enabled
        assert notifier.ready("connected\n| permission yes")
        assert listener.receive() == (["READY=1", "STATUS=connected | permission yes"], os.getpid())
        assert notifier.status("accepted 10 | acked 9")
        assert listener.receive()[0] == ["STATUS=accepted 10 | acked 9"]
        assert notifier.stopping()
        assert listener.receive()[0] == ["STOPPING=1"]
        assert notifier.watchdog() is False  # no WATCHDOG_USEC: systemd watches nothing
        assert listener.nothing_more()
    finally:
        notifier.close()


def test_watchdog_interval_is_half_of_watchdog_usec(
    path_socket: tuple[str, NotifySocket],
) -> None:
    address, listener = path_socket
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "3000000"}
    notifier = SystemdNotifier.from_environment(env)
    try:
        assert notifier.watchdog_interval_s == 1.5
        assert notifier.watchdog()
        assert listener.receive()[0] == ["WATCHDOG=1"]
    finally:
        notifier.close()
    mine = SystemdNotifier.from_environment({**env, "WATCHDOG_PID": str(os.getpid())})
    assert mine.watchdog_interval_s == 1.5
    # The watchdog of another process (e.g. a shell that started this one): not ours.
    other = SystemdNotifier.from_environment({**env, "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_interval_s is None and other.watchdog() is False
    assert listener.nothing_more()


@pytest.mark.parametrize(
    "changes", [{"WATCHDOG_USEC": "soon"}, {"WATCHDOG_USEC": "0"}, {"WATCHDOG_PID": "me"}]
)
def test_unusable_watchdog_settings_are_ignored_with_a_warning(
    changes: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    env = {"NOTIFY_SOCKET": "/run/none", "WATCHDOG_USEC": "1000000", **changes}
    with caplog.at_level(logging.WARNING, "iotref.systemd"):
        assert SystemdNotifier.from_environment(env).watchdog_interval_s is None
    assert "ignoring" in caplog.text


def test_a_socket_that_is_gone_is_logged_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "gone")
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": path})
    try:
        with caplog.at_level(logging.WARNING, "iotref.systemd"):
            assert notifier.ready("up") is False
            assert notifier.status("still up") is False
        assert caplog.text.count("cannot notify systemd") == 1
        listener = NotifySocket(path)  # systemd is back
        try:
            assert notifier.status("up again")
            assert listener.receive()[0] == ["STATUS=up again"]
        finally:
            listener.close()
    finally:
        notifier.close()


def test_an_address_of_another_kind_is_refused_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, "iotref.systemd"):
        notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": "vsock:2:9999"})
    assert not notifier.enabled and "vsock:2:9999" in caplog.text
