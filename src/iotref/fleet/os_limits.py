"""The limits a fleet run checks before it starts: this process's file descriptors, the
local port range and the sandbox's Mosquitto (``max_connections``, its file limit). A run
that cannot fit refuses up front with the numbers."""

from __future__ import annotations

import contextlib
import logging
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from iotref.fleet.errors import FleetLimitError
from iotref.fleet.target import SandboxInfo

log = logging.getLogger("iotref.fleet")

FD_RESERVE: Final = 256
"""Descriptors the simulator needs besides one socket per device (event loop, pipes,
HTTP, watchers, logs)."""
BROKER_RESERVE: Final = 16
"""Connections on the device listener left for others (tests, the operator)."""


@dataclass
class Limits:
    """What the run's limits are, and whether they hold the fleet."""

    nofile_soft_before: int
    nofile_soft: int
    nofile_hard: int
    needed_fds: int
    broker_max_connections: int | None = None
    broker_nofile: int | None = None
    ephemeral_ports: int | None = None
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "nofile_soft_before": self.nofile_soft_before,
            "nofile_soft": self.nofile_soft,
            "nofile_hard": self.nofile_hard,
            "needed_fds": self.needed_fds,
            "broker_max_connections": self.broker_max_connections,
            "broker_nofile": self.broker_nofile,
            "ephemeral_ports": self.ephemeral_ports,
            "problems": list(self.problems),
        }


def raise_nofile_limit() -> tuple[int, int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; ``(before, now, hard)``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise RLIMIT_NOFILE to %d: %s", target, exc)
    now, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return int(soft), int(now), int(hard)


def ephemeral_port_count() -> int | None:
    """Size of the local port range (Linux), or ``None`` if unknown."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(high) - int(low) + 1
    except (OSError, ValueError):
        return None


def broker_limits(sandbox: SandboxInfo) -> tuple[int | None, int | None]:
    """``(max_connections of the device listener, Mosquitto's RLIMIT_NOFILE)`` of a local
    sandbox, from its ``mosquitto.conf`` and ``/proc`` (``None`` where unknown)."""
    max_connections: int | None = None
    conf = sandbox.data_dir / "broker" / "mosquitto.conf"
    with contextlib.suppress(OSError, ValueError):
        listener_port: int | None = None
        for raw in conf.read_text().splitlines():
            words = raw.split()
            if len(words) >= 2 and words[0] == "listener":
                listener_port = int(words[1])
            elif (
                len(words) == 2
                and words[0] == "max_connections"
                and listener_port == sandbox.mqtt_port
            ):
                value = int(words[1])
                max_connections = value if max_connections is None else min(max_connections, value)
    nofile: int | None = None
    if sandbox.pid:
        for child in _children(sandbox.pid):
            try:
                comm = Path(f"/proc/{child}/comm").read_text().strip()
                if comm != "mosquitto":
                    continue
                for line in Path(f"/proc/{child}/limits").read_text().splitlines():
                    if line.startswith("Max open files"):
                        nofile = int(line.split()[3])
            except (OSError, ValueError, IndexError):
                continue
    return max_connections, nofile


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                found += [int(p) for p in (task / "children").read_text().split()]
    return found


def check_limits(devices: int, fleet_devices: int, sandbox: SandboxInfo | None) -> Limits:
    """Raise the descriptor limit and check that the machine and the broker can hold
    ``devices`` connections here (``fleet_devices`` in all shards); raise
    :class:`FleetLimitError` with the numbers if not."""
    before, soft, hard = raise_nofile_limit()
    needed = devices + FD_RESERVE
    limits = Limits(before, soft, hard, needed, ephemeral_ports=ephemeral_port_count())
    if soft < needed:
        limits.problems.append(
            f"this process may open {soft} files (hard limit {hard}) but {devices} devices "
            f"need about {needed}: raise the hard limit (ulimit -Hn, LimitNOFILE=) or run "
            f"fewer devices per process with --shard"
        )
    if limits.ephemeral_ports is not None and devices > limits.ephemeral_ports - 1000:
        limits.problems.append(
            f"the local port range has {limits.ephemeral_ports} ports, too few for "
            f"{devices} connections to one broker port: widen net.ipv4.ip_local_port_range "
            "or shard over several machines"
        )
    if sandbox is not None:
        limits.broker_max_connections, limits.broker_nofile = broker_limits(sandbox)
        cap = limits.broker_max_connections
        if cap is not None and fleet_devices > cap - BROKER_RESERVE:
            limits.problems.append(
                f"the sandbox's Mosquitto accepts at most {cap} device connections "
                f"(max_connections, from its file limit {limits.broker_nofile or '?'}) but "
                f"the fleet has {fleet_devices} devices: raise the hard file limit of the "
                "shell that runs 'iotref sandbox up' and restart it"
            )
    if limits.problems:
        raise FleetLimitError("; ".join(limits.problems))
    return limits
