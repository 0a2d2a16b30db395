"""The systemd service notification protocol (``sd_notify(3)``) for a sender run as a
``Type=notify`` service: readiness, a status text, stopping, and watchdog keep-alives.

systemd passes the address of its notification socket in ``NOTIFY_SOCKET``: a file system
path (``/run/systemd/notify``) or, starting with ``@``, a name in Linux's abstract socket
namespace. A notification is one datagram on an ``AF_UNIX``/``SOCK_DGRAM`` socket with
newline-separated ``KEY=value`` assignments (``READY=1``, ``STATUS=...``, ``STOPPING=1``,
``WATCHDOG=1``); systemd learns the sender's PID from the kernel's credentials.

With ``WatchdogSec=`` systemd sets ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, the process
meant): that process must send ``WATCHDOG=1`` more often than every ``WATCHDOG_USEC``
microseconds, or systemd kills and (with ``Restart=``) restarts it. The usual pace, and
the one :attr:`SystemdNotifier.watchdog_interval_s` gives, is half of it.

Without ``NOTIFY_SOCKET`` (not run by systemd, or not ``Type=notify``), every call does
nothing. A notification that cannot be delivered is logged once (logger
``iotref.systemd``) and never raises: the service goes on.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Final

__all__ = ["SystemdNotifier", "notify_address"]

log = logging.getLogger("iotref.systemd")

NOTIFY_SOCKET_VAR: Final = "NOTIFY_SOCKET"
WATCHDOG_USEC_VAR: Final = "WATCHDOG_USEC"
WATCHDOG_PID_VAR: Final = "WATCHDOG_PID"
_SEND_TIMEOUT_S: Final = 1.0
_STATUS_MAX_CHARS: Final = 1000


def notify_address(value: str) -> str | bytes | None:
    """The socket address ``NOTIFY_SOCKET`` names: a path (``str``), an abstract name
    (``bytes`` starting with a NUL byte, for ``@name``), or None for an empty value or a
    kind this module does not speak (e.g. ``vsock:``)."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None


def _watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    usec = environ.get(WATCHDOG_USEC_VAR, "").strip()
    if not usec:
        return None
    watchdog_pid = environ.get(WATCHDOG_PID_VAR, "").strip()
    if watchdog_pid:
        if not watchdog_pid.isdigit():
            log.warning("ignoring %s=%r: not a process id", WATCHDOG_PID_VAR, watchdog_pid)
            return None
        if int(watchdog_pid) != pid:
            return None  # the watchdog is another process's (e.g. our parent's)
    if not usec.isdigit() or int(usec) == 0:
        log.warning("ignoring %s=%r: not a positive whole number", WATCHDOG_USEC_VAR, usec)
        return None
    return int(usec) / 1_000_000 / 2


class SystemdNotifier:
    """Sends notifications to systemd's socket at ``address`` (None: does nothing).

    ``watchdog_interval_s`` is how often :meth:`watchdog` is due (half of
    ``WATCHDOG_USEC``), None when systemd watches no watchdog of this process."""

    def __init__(
        self, address: str | bytes | None, *, watchdog_interval_s: float | None = None
    ) -> None:
        self.address = address
        self.watchdog_interval_s = watchdog_interval_s if address is not None else None
        self._socket: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None, *, pid: int | None = None
    ) -> SystemdNotifier:
        """The notifier systemd asked for in ``environ`` (default ``os.environ``):
        ``NOTIFY_SOCKET``, and ``WATCHDOG_USEC`` when ``WATCHDOG_PID`` is unset or is
        ``pid`` (default this process)."""
        env = os.environ if environ is None else environ
        raw = env.get(NOTIFY_SOCKET_VAR, "")
        address = notify_address(raw) if raw else None
        if raw and address is None:
            log.warning("%s=%r is not a socket address this program speaks", NOTIFY_SOCKET_VAR, raw)
        interval = _watchdog_interval(env, os.getpid() if pid is None else pid)
        return cls(address, watchdog_interval_s=interval)

    @property
    def enabled(self) -> bool:
        """Whether there is a socket to notify."""
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``assignments`` (``"READY=1"``, ...) as one datagram; True if sent."""
        if self.address is None or not assignments:
            return False
        data = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._socket is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.settimeout(_SEND_TIMEOUT_S)
                self._socket = sock
            self._socket.sendto(data, self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("cannot notify systemd at %r: %s", self.address, exc)
            return False
        if self._failed:
            self._failed = False
            log.info("notifying systemd works again")
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup is finished (``READY=1``), with a status text."""
        return self.notify("READY=1", *self._status(status))

    def status(self, text: str) -> bool:
        """The one-line status ``systemctl status`` shows (``STATUS=``)."""
        return self.notify(*self._status(text))

    def stopping(self, status: str | None = None) -> bool:
        """Shutting down (``STOPPING=1``), with a status text."""
        return self.notify("STOPPING=1", *self._status(status))

    def watchdog(self) -> bool:
        """Alive (``WATCHDOG=1``); sent only when systemd watches this process."""
        if self.watchdog_interval_s is None:
            return False
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    @staticmethod
    def _status(text: str | None) -> list[str]:
        if text is None:
            return []
        one_line = " ".join(text.split())[:_STATUS_MAX_CHARS]
        return [f"STATUS={one_line}"]
