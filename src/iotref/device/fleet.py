"""The fleet simulator: thousands of machines, each with its own key and certificate, against
the sandbox or a real platform (``iotref fleet``).

One process simulates a whole shop floor (or one shard of a customer base): it provisions
the devices it does not have yet, connects them all with a bounded number of handshakes in
flight, runs each device's shadow sync and sends simulated ``generic.signal``/``Status``
telemetry at a fixed rate per device, then reports what happened.

Per device it runs the real library: a :class:`~iotref.device.connection.Connection`
(awscrt MQTT 5, mutual TLS with the device's own certificate), a
:class:`~iotref.device.shadow.ShadowSync` and a :class:`~iotref.device.telemetry.Telemetry`
gated by the shadow's ``sendTelemetryData``. What it shares, because per-device copies
would not fit a small machine:

* one awscrt event-loop group: :class:`Connection` passes no bootstrap to awscrt, which
  then uses its process-wide static default ``ClientBootstrap``, whose event-loop group
  has one thread per core. Every connection of the fleet runs on those threads.
* one validator for every message (the packaged schemas, compiled once).
* no per-device SQLite outbox: a durable outbox per device would be thousands of database
  files and file descriptors and a write per message. The simulator's messages are
  synthetic and a crashed run is repeated, not resumed, so each device gets a
  :class:`MemoryOutbox`, the same ordered, acknowledge-to-remove queue in memory, and
  the fleet keeps one set of totals (depth, acknowledged) for the progress display.

Measuring. Connect time is the time from a device's first attempt to its CONNACK. The
publish-to-platform latency is measured by independent subscribers (``--watchers``), each a
separate process with the sandbox's operator identity on the platform listener, which
receive every telemetry message and compare its ``sendertimestamp`` (set when the message
is built, before it is validated, queued and published) with its arrival. Messages lost
are counted twice: by those subscribers (unique ``sendereventuuid`` per device) and, when
the sandbox has a monitor, by its per-device counts of what it stored. Latencies and
connect times are kept as mergeable histograms (:class:`Histogram`), so shard reports can
be merged (:func:`merge_reports`) with percentiles recomputed from the merged counts.

Each device sends exactly ``round(rate * duration)`` messages (at least one), the first at
a random phase after its first shadow sync and then every ``1 / rate`` seconds, so the
totals of a run are known in advance and a sharded run sends exactly what a single run
sends.

Limits are checked before anything starts: the soft ``RLIMIT_NOFILE`` is raised to the
hard limit, and if the hard limit, Mosquitto's ``max_connections`` (from the sandbox's
``mosquitto.conf``) or the ephemeral port range cannot hold the devices, the run refuses
with the numbers (:class:`FleetLimitError`) instead of failing half-way.

This module is device side: it never imports :mod:`iotref.sandbox`; it speaks to the
sandbox only over HTTP (bulk provisioning, monitor counts) and MQTT.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import hashlib
import heapq
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import resource
import secrets
import sys
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import orjson
from awscrt import io, mqtt5

from iotref.device import stdlib_compat
from iotref.device.connection import (
    Connection,
    ConnectionEvent,
    ConnectionFailed,
    ConnectionSettings,
    ConnectionState,
    MqttError,
    build_client_options,
    build_tls_context,
)
from iotref.device.errors import IotrefError
from iotref.device.messages import (
    Asset,
    AssetType,
    DeviceStatusV2,
    Sender,
    SenderType,
    StatusV2,
    build_message,
)
from iotref.device.onboarding.certificate_store import (
    CERTIFICATE_FILE,
    PRIVATE_KEY_FILE,
    PROPERTIES_FILE,
    ROOT_CA_FILE,
    CertificateStore,
    DeviceProperties,
    Progress,
    ProgressState,
)
from iotref.device.onboarding.directory_client import MachineSpec
from iotref.device.onboarding.environment import Environment
from iotref.device.onboarding.http_client import create_http_client
from iotref.device.onboarding.keys import KeyType, build_csr, generate_private_key, private_key_pem
from iotref.device.onboarding.next_steps import shell_word
from iotref.device.onboarding.store_checks import issuer_fingerprint
from iotref.device.outbox import (
    AppendResult,
    Durability,
    Outbox,
    OutboxEntry,
    OutboxRecord,
    OutboxStats,
    OverflowPolicy,
)
from iotref.device.rate_limit import ConnectGate
from iotref.device.shadow import ShadowError, ShadowSync
from iotref.device.telemetry import MessageValidatorLike, ShadowPermission, Telemetry
from iotref.protocol import limits
from iotref.protocol.topics import telemetry_topic

log = logging.getLogger("iotref.fleet")

REPORT_FORMAT: Final = "iotref-fleet-report/1"
DEVICE_PREFIX: Final = "fleet"
FLEET_FILE: Final = "fleet.json"
MANUFACTURER: Final = "iotref fleet"
SOFTWARE_VERSION: Final = "1.0"
BULK_PATH: Final = "/admin/things/bulk"
BULK_BATCH: Final = 500
MONITOR_SUMMARY_PATH: Final = "/monitor/api/summary"
FD_RESERVE: Final = 256
"""Descriptors the simulator needs besides one socket per device (event loop, pipes,
HTTP, watchers, logs)."""
BROKER_RESERVE: Final = 16
"""Connections on the device listener left for others (tests, the operator)."""
DEFAULT_CONNECT_CONCURRENCY: Final = 100
DEFAULT_CONNECT_RATE: Final = 100.0
"""Connection attempts a second of the whole run (first connects and reconnects), under
the account-level quota of AWS IoT Core ("Connect requests per second per account": 500,
adjustable, lower in some regions), leaving the rest of it to the account's other devices
and to other shards run at the same time; docs/fleet.md."""
DEFAULT_CONNECT_TIMEOUT_S: Final = 60.0
DEFAULT_SYNC_TIMEOUT_S: Final = 60.0
DEFAULT_DRAIN_TIMEOUT_S: Final = 60.0
PROVISION_WORKERS: Final = 8
PLATFORM_PROVISION_CONCURRENCY: Final = 4
TELEMETRY_WINDOW: Final = 32
STOP_WORKER_THREADS: Final = 32
"""Threads for ``Connection.stop()``, which waits for awscrt on a thread."""
STOP_CONCURRENCY: Final = 2 * STOP_WORKER_THREADS
"""Devices stopping at the same time: more than the threads would only queue."""
SCHEDULER_TICK_S: Final = 0.02


class FleetError(IotrefError):
    """A fleet run cannot start or went wrong as a whole."""


class FleetLimitError(FleetError):
    """The machine's or the broker's limits cannot hold the fleet; the message has the
    numbers."""


# --------------------------------------------------------------------------- names, shards


def device_name(index: int) -> str:
    """The deterministic name of device ``index``: ``fleet-000042``. It names the
    device's store folder and its machine."""
    return f"{DEVICE_PREFIX}-{index:06d}"


@dataclass(frozen=True)
class Shard:
    """One slice of the fleet: the devices ``i`` with ``i % count == index``."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"invalid shard {self.index}/{self.count}: need 0 <= I < N")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` (e.g. ``"0/2"``)."""
        index, sep, count = text.partition("/")
        try:
            if not sep:
                raise ValueError
            return cls(int(index), int(count))
        except ValueError:
            raise ValueError(f"shard {text!r} is not I/N with 0 <= I < N") from None

    def indices(self, devices: int) -> list[int]:
        """The device indices of this shard in a fleet of ``devices``."""
        return list(range(self.index, devices, self.count))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def messages_per_device(rate: float, duration_s: float) -> int:
    """How many messages each device sends: ``round(rate * duration)``, at least one."""
    return max(1, round(rate * duration_s))


# --------------------------------------------------------------------------- histogram


class Histogram:
    """A mergeable log-linear histogram of non-negative integers (microseconds here).

    Values below 128 are counted exactly; above, each power of two is split into 64
    buckets, so a reported percentile is within 1.6 % of the true value. ``min``, ``max``,
    ``count`` and ``sum`` are exact. Shard reports store the buckets, so merged percentiles
    are as good as those of one big run.
    """

    SUB_BITS: Final = 7
    _HALF: Final = 1 << (SUB_BITS - 1)
    _FULL: Final = 1 << SUB_BITS

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.total = 0
        self.min: int | None = None
        self.max: int | None = None

    @classmethod
    def bucket_of(cls, value: int) -> int:
        """The bucket index of ``value`` (>= 0)."""
        if value < cls._FULL:
            return value
        shift = value.bit_length() - cls.SUB_BITS
        return shift * cls._HALF + (value >> shift)

    @classmethod
    def bucket_range(cls, index: int) -> tuple[int, int]:
        """The smallest and largest value of bucket ``index``."""
        if index < cls._FULL:
            return index, index
        shift = index // cls._HALF - 1
        mantissa = index - shift * cls._HALF
        return mantissa << shift, ((mantissa + 1) << shift) - 1

    def record(self, value: float, times: int = 1) -> None:
        """Count ``value`` (rounded; negative values count as 0) ``times`` times."""
        v = max(0, round(value))
        index = self.bucket_of(v)
        self.buckets[index] = self.buckets.get(index, 0) + times
        self.count += times
        self.total += v * times
        if self.min is None or v < self.min:
            self.min = v
        if self.max is None or v > self.max:
            self.max = v

    def merge(self, other: Histogram) -> None:
        """Add ``other``'s counts to this one."""
        for index, n in other.buckets.items():
            self.buckets[index] = self.buckets.get(index, 0) + n
        self.count += other.count
        self.total += other.total
        if other.min is not None and (self.min is None or other.min < self.min):
            self.min = other.min
        if other.max is not None and (self.max is None or other.max > self.max):
            self.max = other.max

    def percentile(self, q: float) -> float | None:
        """The ``q``-th percentile (0..100): the middle of the bucket holding the value of
        rank ``ceil(q/100 * count)``, clamped to the exact min and max. ``None`` if empty."""
        if self.count == 0 or self.min is None or self.max is None:
            return None
        rank = max(1, math.ceil(q * self.count / 100.0 - 1e-9))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                low, high = self.bucket_range(index)
                return float(min(max((low + high) / 2, self.min), self.max))
        return float(self.max)

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def to_json(self) -> dict[str, Any]:
        return {
            "sub_bucket_bits": self.SUB_BITS,
            "count": self.count,
            "sum": self.total,
            "min": self.min,
            "max": self.max,
            "buckets": [[i, n] for i, n in sorted(self.buckets.items())],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Histogram:
        hist = cls()
        if not data:
            return hist
        if data.get("sub_bucket_bits", cls.SUB_BITS) != cls.SUB_BITS:
            raise ValueError("histogram with another bucket layout")
        for index, n in data.get("buckets", []):
            hist.buckets[int(index)] = hist.buckets.get(int(index), 0) + int(n)
        hist.count = int(data.get("count", sum(hist.buckets.values())))
        hist.total = int(data.get("sum", 0))
        hist.min = None if data.get("min") is None else int(data["min"])
        hist.max = None if data.get("max") is None else int(data["max"])
        return hist

    def summary_ms(self) -> dict[str, float | None]:
        """p50 / p99 / max / mean in milliseconds (from microsecond values)."""

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value / 1000.0, 3)

        return {
            "p50_ms": ms(self.percentile(50)),
            "p99_ms": ms(self.percentile(99)),
            "max_ms": ms(None if self.max is None else float(self.max)),
            "mean_ms": ms(self.mean),
        }


# --------------------------------------------------------------------------- limits


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


# --------------------------------------------------------------------------- memory


MMAP_THRESHOLD_BYTES: Final = 6 * 1024
"""Allocations from this size on get pages of their own (glibc ``M_MMAP_THRESHOLD``)."""
MMAP_MAX: Final = 1 << 20
"""How many such allocations at most (glibc ``M_MMAP_MAX``; its default 65,536 would run
out at ~9,000 devices)."""
_M_TOP_PAD: Final = -2
_M_MMAP_THRESHOLD: Final = -3
_M_MMAP_MAX: Final = -4
_malloc_tuning: dict[str, Any] | None = None


def tune_malloc(threshold: int = MMAP_THRESHOLD_BYTES) -> dict[str, Any] | None:
    """Make glibc's malloc give allocations of ``threshold`` bytes or more pages of their
    own (``mmap``) instead of carving them out of a heap. Process-wide; for the fleet
    process, before it connects. Returns what was set (``None`` where this is not glibc).

    Why: per connection awscrt allocates a few blocks of 6-16 kB of which only the first
    page is ever written: the MQTT 5 client's four operation tables (6,224 bytes each,
    zeroed, indexed by packet id) and s2n's record buffers (16 kB in, 9 kB out). Cut out of
    a heap they occupy memory that earlier, freed allocations (the TLS handshakes) had
    already touched, and s2n wipes its buffers when a connection is freed, so stopping the
    fleet touched them all again. On pages of their own the untouched pages are never
    resident, and freeing them returns them at once.

    glibc only maps a block of its own when the heap's free end cannot hold it, so the
    heap is also no longer grown 128 kB ahead (``M_TOP_PAD`` 0): otherwise most of these
    blocks would still be cut from that reserve. Measured at 10,000 devices: peak RSS
    1,297 -> 1,020 MB, for ~9 % more CPU while connecting (each such block is an
    ``mmap``/``munmap`` of its own)."""
    global _malloc_tuning
    libc = _glibc()
    if libc is None:
        return None
    version = libc.gnu_get_libc_version().decode()
    ok = all(
        libc.mallopt(param, value)
        for param, value in (
            (_M_MMAP_THRESHOLD, threshold),
            (_M_MMAP_MAX, MMAP_MAX),
            (_M_TOP_PAD, 0),
        )
    )
    _malloc_tuning = {
        "glibc": version,
        "mmap_threshold": threshold,
        "mmap_max": MMAP_MAX,
        "top_pad": 0,
        "applied": ok,
        "max_map_count": max_map_count(),
    }
    return dict(_malloc_tuning)


def _glibc() -> Any | None:
    """The process's C library if it is glibc (for ``mallopt``/``malloc_trim``)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def trim_malloc() -> float | None:
    """Give the pages that glibc's heaps hold free back to the system (``malloc_trim``),
    in every heap, including those of threads that are done (provisioning, building TLS
    contexts). Returns the MB of RSS this released, ``None`` where this is not glibc."""
    libc = _glibc()
    if libc is None:
        return None
    before = rss_mb()
    libc.malloc_trim(0)
    return round(max(0.0, before - rss_mb()), 1)


def max_map_count() -> int | None:
    """The kernel's limit on memory mappings per process (``vm.max_map_count``)."""
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return None


def memory_map_count() -> int | None:
    """How many memory mappings this process has now (Linux)."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return None


# --------------------------------------------------------------------------- the target


@dataclass(frozen=True)
class SandboxInfo:
    """What ``sandbox.json`` of a running sandbox says (the parts the fleet uses)."""

    data_dir: Path
    http_url: str
    admin_token: str
    mqtt_host: str
    mqtt_port: int
    platform_mqtt_port: int
    ca_file: Path
    operator_cert: Path
    operator_key: Path
    pid: int | None = None

    @classmethod
    def load(cls, path: Path) -> SandboxInfo:
        """Read ``sandbox.json``; :class:`FleetError` if it is unusable."""
        try:
            data = json.loads(path.read_text())
            return cls(
                data_dir=Path(data.get("data_dir") or path.parent),
                http_url=str(data["http_url"]).rstrip("/"),
                admin_token=str(data["admin_token"]),
                mqtt_host=str(data["mqtt_host"]),
                mqtt_port=int(data["mqtt_port"]),
                platform_mqtt_port=int(data["platform_mqtt_port"]),
                ca_file=Path(data["ca_file"]),
                operator_cert=Path(data["operator_cert"]),
                operator_key=Path(data["operator_key"]),
                pid=int(data["pid"]) if data.get("pid") else None,
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            start = f"iotref sandbox up --data-dir {shell_word(str(path.parent))}"
            raise FleetError(
                f"cannot use {path}: {exc}", f"is the sandbox running? ('{start}')"
            ) from None


def find_sandbox(
    env: Environment, env_file: Path | None = None, sandbox_dir: Path | None = None
) -> SandboxInfo | None:
    """The sandbox behind ``env``: ``sandbox_dir/sandbox.json`` if given, else the
    ``sandbox.json`` next to ``env_file``, else ``.sandbox/sandbox.json`` when its HTTP
    address is the environment's. ``None``: a real platform."""
    if sandbox_dir is not None:
        path = sandbox_dir / "sandbox.json"
        if not path.exists():
            raise FleetError(f"no sandbox.json in {sandbox_dir}", "start the sandbox first")
        return SandboxInfo.load(path)
    candidates = []
    if env_file is not None:
        candidates.append(env_file.parent / "sandbox.json")
    candidates.append(Path(".sandbox") / "sandbox.json")
    for path in candidates:
        if path.exists():
            info = SandboxInfo.load(path)
            if info.http_url.rstrip("/") == env.base_url.rstrip("/"):
                return info
    return None


# --------------------------------------------------------------------------- stores


@dataclass(frozen=True)
class FleetDeviceIdentity:
    """A provisioned fleet device: index, name, store and properties."""

    index: int
    name: str
    store_path: Path
    properties: DeviceProperties

    @property
    def client_id(self) -> str:
        return self.properties.client_id


class FleetStores:
    """Per-device certificate stores under ``root/<environment>/<device name>``.

    Each is an ordinary certificate store (contract section 5), so one device of the fleet
    can also be used with ``iotref status --store``. ``fleet.json`` beside them records the
    fleet id (part of every machine serial number) and the platform's server root CA, to
    notice stores made against another sandbox.
    """

    def __init__(self, root: Path, env: Environment) -> None:
        self.env = env
        self.base = root / env.name
        self._meta: dict[str, Any] | None = None

    def path(self, index: int) -> Path:
        return self.base / device_name(index)

    def meta(self, server_root_ca: str | None = None) -> dict[str, Any]:
        """``fleet.json`` (made on first use). With ``server_root_ca``, refuse stores that
        were made against a platform with another root CA."""
        if self._meta is None:
            path = self.base / FLEET_FILE
            meta: dict[str, Any] = {}
            with contextlib.suppress(OSError, ValueError):
                meta = json.loads(path.read_text())
            if not isinstance(meta, dict) or "fleet_id" not in meta:
                meta = {
                    "fleet_id": secrets.token_hex(4),
                    "environment": self.env.identity.as_dict(),
                }
                self.base.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(meta, indent=2) + "\n")
            self._meta = meta
        if server_root_ca is not None:
            digest = hashlib.sha256(server_root_ca.strip().encode()).hexdigest()
            known = self._meta.get("server_root_ca_sha256")
            if known is None:
                self._meta["server_root_ca_sha256"] = digest
                (self.base / FLEET_FILE).write_text(json.dumps(self._meta, indent=2) + "\n")
            elif known != digest:
                raise FleetError(
                    f"the device stores in {self.base} were made for a platform with another "
                    "root CA (another sandbox data dir?)",
                    "pass another --store-root, or delete that folder",
                )
        return self._meta

    def load(self, index: int) -> FleetDeviceIdentity | None:
        """The device's identity if its store is complete, else ``None``."""
        store = CertificateStore(self.path(index))
        for name in (ROOT_CA_FILE, CERTIFICATE_FILE, PRIVATE_KEY_FILE):
            if not store.file(name).is_file():
                return None
        try:
            props = store.read_properties()
        except IotrefError:
            return None
        # One copy of what all devices share (endpoint, topic, organisation, site, region)
        # instead of one per device.
        props = dataclasses.replace(
            props,
            mqtt_endpoint=sys.intern(props.mqtt_endpoint),
            machine_region=sys.intern(props.machine_region),
            telemetry_topic=sys.intern(props.telemetry_topic),
            org_id=sys.intern(props.org_id),
            site_id=sys.intern(props.site_id),
        )
        return FleetDeviceIdentity(index, device_name(index), store.path, props)

    def machine(self, index: int) -> MachineSpec:
        fleet_id = str(self.meta()["fleet_id"])
        return MachineSpec(
            name=device_name(index),
            manufacturer=MANUFACTURER,
            serial_number=f"{fleet_id}-{index:06d}",
            kind="offset_press",
        )

    def commit(
        self,
        index: int,
        key_pem: bytes,
        cert_pem: str,
        root_ca: str,
        properties: DeviceProperties,
        organization_id: str,
    ) -> FleetDeviceIdentity:
        """Write a complete store for device ``index`` (atomically, as provisioning does)."""
        from cryptography import x509

        store = CertificateStore(self.path(index))
        certificate = x509.load_pem_x509_certificate(cert_pem.encode())
        issuer, key_id = issuer_fingerprint(certificate)
        progress = Progress(
            environment=self.env.identity,
            state=ProgressState.PROVISIONED,
            machine=self.machine(index),
            machine_id=properties.machine_id,
            site_id=properties.site_id,
            organization_id=organization_id,
            key_type=KeyType.EC256.value,
            issuer=issuer,
            authority_key_id=key_id,
        )
        with store.lock():
            store.commit(
                {
                    ROOT_CA_FILE: _pem(root_ca),
                    CERTIFICATE_FILE: _pem(cert_pem),
                    PRIVATE_KEY_FILE: key_pem,
                    PROPERTIES_FILE: json.dumps(properties.to_json(), indent=2).encode() + b"\n",
                },
                progress,
            )
        return FleetDeviceIdentity(index, device_name(index), store.path, properties)


def _pem(text: str) -> bytes:
    return text.strip().encode() + b"\n"


def _key_and_csr(name: str) -> tuple[bytes, str]:
    key = generate_private_key(KeyType.EC256)
    return private_key_pem(key), build_csr(key, common_name=name).decode()


async def provision_bulk(
    sandbox: SandboxInfo,
    stores: FleetStores,
    indices: Sequence[int],
    *,
    site_id: str | None = None,
    on_done: Callable[[int], None] | None = None,
) -> list[FleetDeviceIdentity]:
    """Provision ``indices`` through the sandbox's ``POST /admin/things/bulk``: keys and
    CSRs made here (the keys never leave this machine), certificates in batches."""
    if not indices:
        return []
    loop = asyncio.get_running_loop()
    out: list[FleetDeviceIdentity] = []
    with concurrent.futures.ThreadPoolExecutor(PROVISION_WORKERS) as pool:
        async with httpx.AsyncClient(base_url=sandbox.http_url, timeout=120) as http:
            for start in range(0, len(indices), BULK_BATCH):
                batch = list(indices[start : start + BULK_BATCH])
                keys = await asyncio.gather(
                    *(loop.run_in_executor(pool, _key_and_csr, device_name(i)) for i in batch)
                )
                body: dict[str, Any] = {
                    "devices": [
                        {"certificateSigningRequest": csr, "machineId": device_name(i)}
                        for i, (_, csr) in zip(batch, keys, strict=True)
                    ]
                }
                if site_id:
                    body["siteId"] = site_id
                answer = await http.post(
                    BULK_PATH,
                    json=body,
                    headers={"Authorization": f"Bearer {sandbox.admin_token}"},
                )
                if answer.status_code == 404:
                    raise FleetError(
                        "this sandbox has no bulk provisioning route",
                        "update the sandbox, or run against it as a platform (--no-bulk)",
                    )
                if answer.status_code != 200:
                    raise FleetError(
                        f"bulk provisioning failed: {answer.status_code} {answer.text[:300]}"
                    )
                data = answer.json()
                config = data["configuration"]
                connectivity = config["connectivity"]
                root_ca = str(connectivity["serverRootCA"])
                stores.meta(root_ca)
                things = data["things"]
                jobs = []
                for i, (key_pem, _), thing in zip(batch, keys, things, strict=True):
                    props = DeviceProperties(
                        mqtt_endpoint=str(connectivity["mqttEndPoint"]),
                        mqtt_port=int(connectivity["mqttPort"]),
                        machine_region=str(connectivity.get("machineRegion", "")),
                        telemetry_topic=str(config["provisioning"]["telemetryTopic"]),
                        client_id=str(thing["clientId"]),
                        org_id=str(data["orgId"]),
                        machine_id=device_name(i),
                        site_id=str(data["siteId"]),
                    )
                    jobs.append(
                        loop.run_in_executor(
                            pool,
                            stores.commit,
                            i,
                            key_pem,
                            str(thing["deviceCert"]),
                            root_ca,
                            props,
                            str(data["orgId"]),
                        )
                    )
                done = await asyncio.gather(*jobs)
                out.extend(done)
                if on_done is not None:
                    on_done(len(done))
    return out


async def provision_platform(
    env: Environment,
    stores: FleetStores,
    indices: Sequence[int],
    *,
    site: str | None = None,
    concurrency: int = PLATFORM_PROVISION_CONCURRENCY,
    on_done: Callable[[int], None] | None = None,
) -> list[FleetDeviceIdentity]:
    """Provision ``indices`` the normal way (needs ``iotref login`` for ``env`` first):
    per device a machine in the directory, its ownership, a key, a CSR and
    ``/v4/provisioning``, each into its own store (resumable, as ``iotref provision``)."""
    from iotref.device.onboarding.provisioning import ProvisionOptions
    from iotref.device.onboarding.service import Onboarding

    if not indices:
        return []
    stores.meta()
    limit = asyncio.Semaphore(max(1, concurrency))
    out: list[FleetDeviceIdentity] = []
    async with create_http_client() as http:

        async def one(index: int) -> None:
            async with (
                limit,
                Onboarding(env, store_path=stores.path(index), http=http) as onb,
            ):
                await onb.provision(ProvisionOptions(machine=stores.machine(index), site=site))
            identity = stores.load(index)
            if identity is None:
                raise FleetError(f"provisioning {device_name(index)} left an incomplete store")
            out.append(identity)
            if on_done is not None:
                on_done(1)

        await asyncio.gather(*(one(i) for i in indices))
    out.sort(key=lambda d: d.index)
    return out


# --------------------------------------------------------------------------- memory outbox


@dataclass
class OutboxTotals:
    """Fleet-wide counters of every :class:`MemoryOutbox` (for the progress display)."""

    depth: int = 0
    appended: int = 0
    acked: int = 0


class MemoryOutbox(Outbox):
    """The :class:`~iotref.device.outbox.Outbox` interface kept in memory: an ordered
    queue of unacknowledged messages, removed on acknowledgement. Not durable (see the
    module docstring for why the simulator uses it); unbounded."""

    # The same for every instance: on the class, not in each of thousands of instances.
    path = Path(":memory:")
    max_messages = 1 << 62
    max_bytes = 1 << 62
    overflow: OverflowPolicy = "reject_new"
    durability: Durability = "process"

    def __init__(self, totals: OutboxTotals | None = None) -> None:
        # The SQLite parent is deliberately not initialised: nothing of it is used.
        self._rows: dict[int, OutboxRecord] = {}
        self._last_seq = 0
        self._closed = False
        self._accepted = 0
        self._acked_count = 0
        self._refused_count = 0
        self._totals = totals if totals is not None else OutboxTotals()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True

    def append(self, topic: str, payload: bytes, message_id: str | None = None) -> AppendResult:
        seq = self._last_seq + 1
        self._last_seq = seq
        self._rows[seq] = OutboxRecord(seq, topic, payload, time.time(), 0, message_id)
        self._accepted += 1
        self._totals.depth += 1
        self._totals.appended += 1
        return AppendResult(seq, 0)

    def append_many(self, entries: Sequence[OutboxEntry]) -> list[AppendResult]:
        return [self.append(e.topic, e.payload, e.message_id) for e in entries]

    def read_batch(self, after_seq: int = 0, limit: int = 500) -> list[OutboxRecord]:
        out: list[OutboxRecord] = []
        for seq, record in self._rows.items():
            if seq > after_seq:
                out.append(record)
                if len(out) >= limit:
                    break
        return out

    def mark_attempted(self, first_seq: int, last_seq: int) -> None:
        return None

    def __len__(self) -> int:
        return len(self._rows)

    def ack(self, seq: int) -> None:
        if self._rows.pop(seq, None) is not None:
            self._acked_count += 1
            self._totals.depth -= 1
            self._totals.acked += 1

    def ack_many(self, seqs: Iterable[int]) -> None:
        for seq in seqs:
            self.ack(seq)

    def flush_acks(self) -> int:
        return 0

    def refuse(self, seq: int, reason: str) -> bool:
        """A message the platform refused for good leaves the queue (counted; the
        simulator keeps no table of them)."""
        if self._rows.pop(seq, None) is None:
            return False
        self._refused_count += 1
        self._totals.depth -= 1
        return True

    @property
    def pending_acks(self) -> int:
        return 0

    def stats(self) -> OutboxStats:
        oldest = next(iter(self._rows.values()), None)
        return OutboxStats(
            depth=len(self._rows),
            bytes=sum(len(r.payload) + len(r.topic) for r in self._rows.values()),
            oldest_age_s=None if oldest is None else max(0.0, time.time() - oldest.enqueued_at),
            oldest_seq=None if oldest is None else oldest.seq,
            max_messages=self.max_messages,
            max_bytes=self.max_bytes,
            overflow=self.overflow,
            durability=self.durability,
            accepted=self._accepted,
            acked=self._acked_count,
            dropped_overflow=0,
            rejected=0,
            ack_rate=0.0,
            refused=self._refused_count,
            refused_kept=0,
        )

    @property
    def depth(self) -> int:
        return len(self._rows)

    @property
    def last_seq(self) -> int:
        return self._last_seq


# --------------------------------------------------------------------------- telemetry content


class StatusGenerator:
    """Plausible ``Status`` v2 readings of one simulated press: production at a speed
    around its nominal one, with idle and non-productive phases in between; the counters
    grow. Deterministic per ``seed`` and small (no random generator object per device:
    thousands of them would cost megabytes)."""

    __slots__ = ("_state", "job", "nominal", "step", "total")

    _NOMINAL: Final = (10_000, 12_000, 15_000, 18_000)

    def __init__(self, seed: int) -> None:
        self._state = (seed * 2654435761 + 1) & 0xFFFFFFFF
        self.nominal = self._NOMINAL[self._next() % len(self._NOMINAL)]
        self.total = 1_000_000 + self._next() % 49_000_000
        self.job = 0
        self.step = self._next() % 8

    def _next(self) -> int:
        # xorshift32: good enough for plausible noise, and a few bytes of state.
        x = self._state
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        self._state = x
        return x

    def next(self) -> StatusV2:
        """The next reading."""
        self.step += 1
        phase = self.step % 8
        if phase < 6:
            status = DeviceStatusV2.PRODUCTION
            speed = float(round(self.nominal * (0.85 + 0.15 * (self._next() % 1000) / 1000)))
            made = int(speed / 360)  # sheets in ten seconds
            self.total += made
            self.job += made
        else:
            status = DeviceStatusV2.IDLE if phase == 6 else DeviceStatusV2.NON_PRODUCTIVE
            speed = 0.0
            if phase == 7:
                self.job = 0
        return StatusV2(
            status=status,
            speed=speed,
            totalproductioncounter=float(self.total),
            productioncounter=float(self.job),
            statusdetails="simulated by iotref fleet",
        )


# --------------------------------------------------------------------------- one device


# s2n makes every new TLS configuration load the system's CA bundle (aws-lc's default
# paths: 144 certificates here, ~3.7 ms), and aws-c-io throws it away again at once because a
# device trusts only its own CA file. While the fleet builds its contexts these variables
# point aws-lc's default paths at nothing.
_DEFAULT_TRUST_VARIABLES: Final = ("SSL_CERT_FILE", "SSL_CERT_DIR")


@contextlib.contextmanager
def without_system_trust_store() -> Iterator[None]:
    """Within: new awscrt TLS contexts do not load the system's CA bundle first.

    Only for contexts that replace the trust store anyway (as
    :func:`~iotref.device.connection.build_tls_context` does with ``ca_path``): a context
    that relies on the system's CAs built here would trust nothing. It changes this
    process's environment, so use it where nothing else is opening TLS connections.
    """
    saved = {name: os.environ.get(name) for name in _DEFAULT_TRUST_VARIABLES}
    for name in _DEFAULT_TRUST_VARIABLES:
        os.environ[name] = os.devnull
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def build_tls_contexts(devices: Sequence[FleetDevice], stop: threading.Event | None = None) -> int:
    """Build each device's TLS context (on a worker thread, before connecting), so the
    connect ramp only creates clients. A device whose files are unusable gets none, and
    :meth:`Connection.start` reports why as usual. Returns how many were built.

    awscrt keeps the GIL while it builds a context, so more than one worker thread would
    not build faster; what makes it cheap is skipping the system CA bundle."""
    built = 0
    with without_system_trust_store():
        for device in devices:
            if stop is not None and stop.is_set():
                break
            with contextlib.suppress(ConnectionFailed):
                device.tls_context = build_tls_context(device.settings())
                built += 1
    return built


class FleetDevice:
    """One simulated machine: its connection, shadow sync and telemetry."""

    __slots__ = (
        "_up_since",
        "asset",
        "connect_started",
        "connected_at",
        "connection",
        "ever_connected",
        "failed",
        "generated",
        "generator",
        "identity",
        "outbox",
        "run",
        "sender",
        "shadow",
        "synced_at",
        "telemetry",
        "tls_context",
    )

    def __init__(self, identity: FleetDeviceIdentity, run: FleetRun) -> None:
        self.identity = identity
        self.run = run
        self.tls_context: io.ClientTlsContext | None = None
        self.connection: Connection | None = None
        self.shadow: ShadowSync | None = None
        self.telemetry: Telemetry | None = None
        self.outbox = MemoryOutbox(run.outbox_totals)
        self.sender = Sender(
            SenderType.PRESS, identity.name, SOFTWARE_VERSION, identity.properties.site_id
        )
        self.asset = Asset(
            assetid=identity.properties.machine_id,
            assetserial=run.stores.machine(identity.index).serial_number,
            assettype=AssetType.SHEETFED_PRESS,
            assetname=identity.name,
            assetmanufacturername=MANUFACTURER,
        )
        self.generator = StatusGenerator(identity.index)
        self.connect_started: float | None = None
        self.connected_at: float | None = None
        self.synced_at: float | None = None
        self.generated = 0
        self.ever_connected = False
        self.failed: str | None = None
        self._up_since: float | None = None

    @property
    def client_id(self) -> str:
        return self.identity.client_id

    def settings(self) -> ConnectionSettings:
        props = self.identity.properties
        store = self.identity.store_path
        return ConnectionSettings(
            endpoint=props.mqtt_endpoint,
            port=props.mqtt_port,
            client_id=props.client_id,
            cert_path=store / CERTIFICATE_FILE,
            key_path=store / PRIVATE_KEY_FILE,
            ca_path=store / ROOT_CA_FILE,
            keepalive_s=self.run.options.keepalive_s,
            min_backoff_s=1.0,
            max_backoff_s=10.0,
            connect_timeout_s=self.run.options.connect_timeout_s,
            fail_fast=False,
            publish_rate_limit=self.run.options.publish_rate_limit,
            throughput_limit=self.run.options.throughput_limit,
        )

    async def connect(self) -> None:
        """Set up and connect; the shadow subscriptions ride on the first CONNACK."""
        run = self.run
        tls_context, self.tls_context = self.tls_context, None  # the client keeps it
        connection = Connection(
            self.settings(),
            on_event=self._on_event,
            tls_context=tls_context,
            connect_gate=run.connect_gate,
        )
        shadow = ShadowSync(connection, self.client_id, timeout_s=run.options.shadow_timeout_s)
        await shadow.client.subscribe()  # registered now, one SUBSCRIBE on connect
        await shadow.start(wait=False)
        props = self.identity.properties
        telemetry = Telemetry(
            connection,
            self.outbox,
            telemetry_topic(props.telemetry_topic, props.org_id, props.client_id),
            validator=run.validator,
            permission=ShadowPermission(shadow),
            window=TELEMETRY_WINDOW,
            batch=TELEMETRY_WINDOW,
        )
        await telemetry.start()
        self.connection, self.shadow, self.telemetry = connection, shadow, telemetry
        self.connect_started = time.monotonic()
        await connection.start()
        self.connected_at = time.monotonic()
        self.ever_connected = True

    async def wait_synced(self, timeout_s: float) -> None:
        assert self.shadow is not None
        await self.shadow.wait_synced(timeout_s)
        self.synced_at = time.monotonic()

    def _on_event(self, event: ConnectionEvent) -> None:
        run = self.run
        state = event.state
        if state is ConnectionState.CONNECTED:
            if self._up_since is not None or self.connected_at is not None:
                run.error("reconnected")
            if self._up_since is None:
                run.connected_now += 1
            self._up_since = event.at
            return
        if state is ConnectionState.DISCONNECTED:
            run.error("disconnected" if self._up_since is not None else "connect_attempt_failed")
        elif state is ConnectionState.TAKEN_OVER:
            run.error("taken_over")
        elif state is not ConnectionState.STOPPED:
            return
        if self._up_since is not None:
            run.connected_now -= 1
            self._up_since = None

    async def send_next(self) -> None:
        """Build, validate, queue and (by the drainer) publish one status message."""
        assert self.telemetry is not None
        message = build_message(self.sender, self.asset, self.generator.next())
        await self.telemetry.send(message)
        self.generated += 1

    async def stop(self) -> None:
        """Stop telemetry, shadow sync and the connection, then let them go: what the
        report needs (messages generated, connect and sync times) stays on the device, and
        the memory of a stopped device is reused by the next ones stopping."""
        with contextlib.suppress(Exception):
            if self.telemetry is not None:
                await self.telemetry.close(0.5)
        with contextlib.suppress(Exception):
            if self.shadow is not None:
                await self.shadow.stop()
        with contextlib.suppress(Exception):
            if self.connection is not None:
                await self.connection.stop()
        self.telemetry = self.shadow = self.connection = None
        self.tls_context = None


# --------------------------------------------------------------------------- watchers


@dataclass(frozen=True)
class WatcherSpec:
    """How a watcher process connects and what it listens to."""

    endpoint: str
    port: int
    ca_file: str
    cert_file: str
    key_file: str
    client_id: str
    topic_filter: str
    telemetry_prefix: str
    clients: tuple[str, ...]


def _uuid64(text: str) -> int:
    return int(text.replace("-", "")[:16], 16)


class _WatchState:
    """What one watcher saw; updated on awscrt's thread, read on the main thread."""

    def __init__(self, clients: Iterable[str]) -> None:
        self.lock = threading.Lock()
        self.per_client: dict[str, array[int]] = {c: array("Q") for c in clients}
        self.seen: set[int] = set()
        self.latency = Histogram()
        self.steady = Histogram()
        self.steady_from: float | None = None
        self.received = 0
        self.duplicates = 0
        self.foreign = 0
        self.invalid = 0
        self.disconnects = 0
        self.first: float | None = None
        self.last: float | None = None

    def on_publish(self, data: mqtt5.PublishReceivedData) -> None:
        now = time.time()
        packet = data.publish_packet
        client_id = str(packet.topic).rsplit("/", 1)[-1]
        with self.lock:
            self.received += 1
            self.first = self.first if self.first is not None else now
            self.last = now
            ids = self.per_client.get(client_id)
            if ids is None:
                self.foreign += 1
                return
            try:
                message = orjson.loads(packet.payload or b"")
                sent = stdlib_compat.fromisoformat(message["sendertimestamp"]).timestamp()
                key = _uuid64(message["sendereventuuid"])
            except (ValueError, KeyError, TypeError):
                self.invalid += 1
                return
            if key in self.seen:
                self.duplicates += 1
                return
            self.seen.add(key)
            ids.append(key)
            self.latency.record((now - sent) * 1_000_000)
            if self.steady_from is not None and sent >= self.steady_from:
                self.steady.record((now - sent) * 1_000_000)

    def progress(self) -> dict[str, Any]:
        with self.lock:
            return {"received": self.received, "unique": len(self.seen)}

    def result(self) -> dict[str, Any]:
        with self.lock:
            return {
                "received": self.received,
                "duplicates": self.duplicates,
                "foreign": self.foreign,
                "invalid": self.invalid,
                "disconnects": self.disconnects,
                "first": self.first,
                "last": self.last,
                "latency": self.latency.to_json(),
                "steady_latency": self.steady.to_json(),
                "per_client": {c: ids.tobytes() for c, ids in self.per_client.items() if ids},
            }


def watcher_main(pipe: multiprocessing.connection.Connection, spec: WatcherSpec) -> None:
    """Entry point of a watcher process: connect with the operator identity, subscribe
    at QoS 1, answer ``"progress"`` and ``"stop"`` requests on ``pipe``."""
    state = _WatchState(spec.clients)
    try:
        settings = ConnectionSettings(
            endpoint=spec.endpoint,
            port=spec.port,
            client_id=spec.client_id,
            cert_path=Path(spec.cert_file),
            key_path=Path(spec.key_file),
            ca_path=Path(spec.ca_file),
            session_expiry_s=0,
            keepalive_s=30,
        )
        options = build_client_options(settings)
        # Let the broker send without waiting for our PUBACKs: Mosquitto queues at most
        # 1000 messages per client beyond those in flight and drops the rest.
        options.connect_options.receive_maximum = 65535
        options.tls_ctx = build_tls_context(settings)
        connected = threading.Event()
        options.on_publish_callback_fn = state.on_publish
        options.on_lifecycle_event_connection_success_fn = lambda _: connected.set()

        def lost(_: Any) -> None:
            with state.lock:
                state.disconnects += 1

        options.on_lifecycle_event_disconnection_fn = lost
        client = mqtt5.Client(options)
        client.start()
        if not connected.wait(30):
            pipe.send(("error", f"watcher could not connect to {spec.endpoint}:{spec.port}"))
            client.stop()
            return
        packet = mqtt5.SubscribePacket(
            [mqtt5.Subscription(spec.topic_filter, mqtt5.QoS.AT_LEAST_ONCE)]
        )
        suback = client.subscribe(packet).result(30)
        codes = [int(c) for c in (suback.reason_codes or [])]
        if not codes or codes[0] >= 0x80:
            pipe.send(("error", f"watcher subscription refused: {codes}"))
            client.stop()
            return
        pipe.send(("ready", None))
        while True:
            command = pipe.recv()
            if command == "progress":
                pipe.send(("progress", state.progress()))
            elif isinstance(command, tuple) and command[0] == "steady":
                with state.lock:
                    state.steady_from = float(command[1])
            elif command == "stop":
                break
        client.stop()
        pipe.send(("result", state.result()))
    except (EOFError, KeyboardInterrupt):
        return
    except Exception as exc:
        with contextlib.suppress(Exception):
            pipe.send(("error", f"watcher failed: {type(exc).__name__}: {exc}"))


@dataclass
class WatchResult:
    """The watchers' merged view."""

    received: int = 0
    unique: int = 0
    duplicates: int = 0
    foreign: int = 0
    invalid: int = 0
    disconnects: int = 0
    per_client: dict[str, int] = field(default_factory=dict)
    latency: Histogram = field(default_factory=Histogram)
    steady_latency: Histogram = field(default_factory=Histogram)


class Watchers:
    """Independent subscriber processes (the platform's view of what arrived)."""

    def __init__(
        self, sandbox: SandboxInfo, telemetry_prefix: str, clients: Sequence[str], count: int
    ) -> None:
        self.sandbox = sandbox
        self.prefix = telemetry_prefix.rstrip("/")
        self.clients = tuple(clients)
        self.count = max(1, count)
        self._procs: list[tuple[Any, multiprocessing.connection.Connection]] = []
        self._lock = threading.Lock()

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the processes and wait until each has subscribed."""
        ctx = multiprocessing.get_context("spawn")
        run_id = secrets.token_hex(4)
        topic = f"{self.prefix}/#"
        if self.count > 1:
            topic = f"$share/iotref-fleet-{run_id}/{topic}"
        for k in range(self.count):
            parent, child = ctx.Pipe()
            spec = WatcherSpec(
                endpoint=self.sandbox.mqtt_host,
                port=self.sandbox.platform_mqtt_port,
                ca_file=str(self.sandbox.ca_file),
                cert_file=str(self.sandbox.operator_cert),
                key_file=str(self.sandbox.operator_key),
                client_id=f"iotref-fleet-watch-{run_id}-{k}",
                topic_filter=topic,
                telemetry_prefix=self.prefix,
                clients=self.clients,
            )
            proc = ctx.Process(target=watcher_main, args=(child, spec), daemon=True)
            proc.start()
            child.close()
            self._procs.append((proc, parent))
        for _proc, pipe in self._procs:
            if not pipe.poll(timeout_s):
                self.kill()
                raise FleetError("a watcher did not subscribe in time")
            kind, detail = pipe.recv()
            if kind != "ready":
                self.kill()
                raise FleetError(str(detail))

    def mark_steady(self, since: float) -> None:
        """From now on also count messages sent after ``since`` (epoch seconds; every
        device connected) in the steady-state latency."""
        with self._lock:
            for _proc, pipe in self._procs:
                with contextlib.suppress(OSError):
                    pipe.send(("steady", since))

    def progress(self) -> tuple[int, int]:
        """``(received, unique)`` so far."""
        received = unique = 0
        with self._lock:
            for _proc, pipe in self._procs:
                try:
                    pipe.send("progress")
                    if pipe.poll(5):
                        _kind, data = pipe.recv()
                        received += int(data["received"])
                        unique += int(data["unique"])
                except (OSError, EOFError):
                    continue
        return received, unique

    def stop(self) -> WatchResult:
        """Stop the processes and merge what they saw."""
        result = WatchResult()
        seen: dict[str, set[int]] = {}
        with self._lock:
            for proc, pipe in self._procs:
                try:
                    pipe.send("stop")
                    if not pipe.poll(60):
                        continue
                    kind, data = pipe.recv()
                except (OSError, EOFError):
                    continue
                finally:
                    proc.join(10)
                    if proc.is_alive():
                        proc.kill()
                        proc.join(5)
                if kind != "result":
                    continue
                result.received += int(data["received"])
                result.duplicates += int(data["duplicates"])
                result.foreign += int(data["foreign"])
                result.invalid += int(data["invalid"])
                result.disconnects += int(data["disconnects"])
                result.latency.merge(Histogram.from_json(data["latency"]))
                result.steady_latency.merge(Histogram.from_json(data["steady_latency"]))
                for client, raw in data["per_client"].items():
                    ids = array("Q")
                    ids.frombytes(raw)
                    seen.setdefault(client, set()).update(ids)
            self._procs.clear()
        result.per_client = {c: len(ids) for c, ids in seen.items()}
        result.unique = sum(result.per_client.values())
        # Duplicates that went to different watchers are duplicates too.
        with_watchers = result.received - result.foreign - result.invalid
        result.duplicates = max(result.duplicates, with_watchers - result.unique)
        return result

    def kill(self) -> None:
        for proc, pipe in self._procs:
            with contextlib.suppress(Exception):
                pipe.close()
            if proc.is_alive():
                proc.kill()
            proc.join(5)
        self._procs.clear()


# --------------------------------------------------------------------------- monitor


async def monitor_counts(sandbox: SandboxInfo, clients: set[str]) -> dict[str, int] | None:
    """Messages the sandbox's monitor stored per device (deduplicated: valid + invalid),
    for ``clients``; ``None`` if the sandbox has no monitor."""
    try:
        async with httpx.AsyncClient(base_url=sandbox.http_url, timeout=60) as http:
            answer = await http.get(
                MONITOR_SUMMARY_PATH, headers={"Authorization": f"Bearer {sandbox.admin_token}"}
            )
    except httpx.HTTPError as exc:
        log.warning("monitor not reachable: %s", exc)
        return None
    if answer.status_code != 200:
        return None
    counts: dict[str, int] = {}
    for device in orjson.loads(answer.content).get("devices", []):
        client = device.get("client_id")
        if client in clients:
            counts[client] = int(device.get("valid") or 0) + int(device.get("invalid") or 0)
    return counts


# --------------------------------------------------------------------------- options, progress


@dataclass(frozen=True)
class FleetOptions:
    """One run: how many devices (in the whole fleet), which shard, how fast, how long."""

    devices: int
    rate: float
    """Messages per device per second."""
    duration_s: float
    shard: Shard = Shard()
    store_root: Path = Path("certificate_store") / "fleet"
    connect_concurrency: int = DEFAULT_CONNECT_CONCURRENCY
    connect_rate: float = DEFAULT_CONNECT_RATE
    """Connection attempts a second of all devices together (0: not limited)."""
    publish_rate_limit: float | None = float(limits.PUBLISH_REQUESTS_PER_SECOND_PER_CONNECTION)
    """Each device's publish quota, paced as a single device's (``None``: not paced)."""
    throughput_limit: int | None = limits.THROUGHPUT_BYTES_PER_SECOND_PER_CONNECTION
    """Each device's throughput quota in bytes a second (``None``: not paced)."""
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    sync_timeout_s: float = DEFAULT_SYNC_TIMEOUT_S
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    shadow_timeout_s: float = 15.0
    keepalive_s: int = 60
    watchers: int = 1
    site: str | None = None
    bulk: bool = True
    seed: int | None = None
    tune_malloc: bool = False
    """Apply :func:`tune_malloc` (process-wide) before connecting; ``iotref fleet`` does,
    since the simulator is the whole process there."""

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ValueError("devices must be at least 1")
        if not self.rate > 0 or not self.duration_s > 0:
            raise ValueError("rate and duration must be positive")
        if self.connect_concurrency < 1:
            raise ValueError("connect concurrency must be at least 1")
        if not self.connect_rate >= 0:
            raise ValueError("connect rate must be 0 (not limited) or more")

    @property
    def messages_per_device(self) -> int:
        return messages_per_device(self.rate, self.duration_s)


@dataclass(frozen=True)
class FleetProgress:
    """A snapshot for the live display."""

    phase: str
    devices: int
    provisioned: int
    connected: int
    synced: int
    failed: int
    generated: int
    acked: int
    outbox_depth: int
    platform_received: int | None
    msgs_per_s: float
    errors: int
    elapsed_s: float
    rss_mb: float


def rss_mb() -> float:
    """This process's resident set size now (MB; Linux), 0 if unknown."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_rss_mb() -> float:
    """This process's peak resident set size (MB).

    From ``VmHWM`` in ``/proc/self/status`` where there is one: ``ru_maxrss`` carries over
    the parent's peak through fork and exec on Linux, so a simulator started by a large
    process (a benchmark harness) would report the parent's size instead of its own."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------- the run


class FleetRun:
    """One fleet run (or one shard of it). ``await FleetRun(env, options).run()``."""

    def __init__(
        self,
        env: Environment,
        options: FleetOptions,
        *,
        sandbox: SandboxInfo | None = None,
        validator: MessageValidatorLike | None = None,
    ) -> None:
        self.env = env
        self.options = options
        self.sandbox = sandbox
        self.stores = FleetStores(options.store_root, env)
        if validator is None:
            from iotref.protocol.message_schemas import default_validator

            validator = default_validator()
        self.validator = validator
        self.outbox_totals = OutboxTotals()
        # One gate for every device's attempts: the run's share of the account's quota.
        self.connect_gate = ConnectGate(options.connect_rate) if options.connect_rate else None
        self.errors: Counter[str] = Counter()
        self.devices: list[FleetDevice] = []
        self.indices = options.shard.indices(options.devices)
        self.phase = "starting"
        self.provisioned = 0
        self.connected_now = 0
        self.synced = 0
        self.failed = 0
        self.generated = 0
        self.connect_hist = Histogram()
        self.sync_hist = Histogram()
        self._started = time.monotonic()
        self._rate_mark = (time.monotonic(), 0)
        self._rate = 0.0
        self.watchers: Watchers | None = None
        self.platform_received: int | None = None
        self.limits: Limits | None = None
        self._rng = random.Random(options.seed)
        self._heap: list[tuple[float, int, int, FleetDevice]] = []
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Future[None]] = set()
        self._all_scheduled = False
        self.cpu_by_phase: dict[str, float] = {}
        self.main_cpu_by_phase: dict[str, float] = {}
        self._phase_mark: tuple[str, float, float] | None = None
        self.memory_maps: int | None = None
        self.trimmed_mb: dict[str, float] = {}

    # ------------------------------------------------------------------ observing

    def _enter(self, phase: str) -> None:
        """Switch to ``phase``, booking this process's CPU time so far to the last one."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = usage.ru_utime + usage.ru_stime
        main = time.thread_time()
        if self._phase_mark is not None:
            name, mark, main_mark = self._phase_mark
            self.cpu_by_phase[name] = round(self.cpu_by_phase.get(name, 0.0) + cpu - mark, 3)
            self.main_cpu_by_phase[name] = round(
                self.main_cpu_by_phase.get(name, 0.0) + main - main_mark, 3
            )
        self._phase_mark = (phase, cpu, main)
        self.phase = phase

    def _trim(self, when: str) -> None:
        """With ``tune_malloc``: return the memory a phase left free to the system."""
        if self.options.tune_malloc:
            released = trim_malloc()
            if released is not None:
                self.trimmed_mb[when] = released

    def error(self, kind: str) -> None:
        """Count one error (or noteworthy event) of ``kind``."""
        self.errors[kind] += 1

    def progress(self) -> FleetProgress:
        """A snapshot for the live display (cheap: counters only)."""
        now = time.monotonic()
        mark_t, mark_n = self._rate_mark
        if now - mark_t >= 1.0:
            self._rate = (self.generated - mark_n) / (now - mark_t)
            self._rate_mark = (now, self.generated)
        totals = self.outbox_totals
        return FleetProgress(
            phase=self.phase,
            devices=len(self.indices),
            provisioned=self.provisioned,
            connected=self.connected_now,
            synced=self.synced,
            failed=self.failed,
            generated=self.generated,
            acked=totals.acked,
            outbox_depth=totals.depth,
            platform_received=self.platform_received,
            msgs_per_s=self._rate,
            errors=sum(self.errors.values())
            - self.errors.get("connect_attempt_failed", 0)
            - self.errors.get("reconnected", 0),
            elapsed_s=now - self._started,
            rss_mb=rss_mb(),
        )

    async def poll_platform(self) -> None:
        """Ask the watchers how much arrived (for the live display)."""
        if self.watchers is not None:
            received, _unique = await asyncio.to_thread(self.watchers.progress)
            self.platform_received = received

    # ------------------------------------------------------------------ phases

    async def run(self) -> FleetReport:
        """Provision, connect, sync, send, drain, measure; return the report."""
        opts = self.options
        loop = asyncio.get_running_loop()
        # Connection.stop() waits for awscrt in a thread: give the fleet enough of them.
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(STOP_WORKER_THREADS))
        self.limits = check_limits(len(self.indices), opts.devices, self.sandbox)
        if opts.tune_malloc:
            tune_malloc()
        started_at = time.time()

        self._enter("provisioning")
        t0 = time.monotonic()
        identities, reused, path = await self._provision()
        provision_s = time.monotonic() - t0
        self._trim("after provisioning")
        self.devices = [FleetDevice(identity, self) for identity in identities]
        clients = [d.client_id for d in self.devices]
        prefix = (
            identities[0].properties.telemetry_topic if identities else "connectprint/telemetry"
        )

        baseline: dict[str, int] | None = None
        if self.sandbox is not None:
            baseline = await monitor_counts(self.sandbox, set(clients))
            if opts.watchers > 0:
                self._enter("starting watchers")
                self.watchers = Watchers(self.sandbox, prefix, clients, opts.watchers)
                await asyncio.to_thread(self.watchers.start)
        try:
            report = await self._simulate(started_at, provision_s, reused, path, baseline)
        finally:
            if self.watchers is not None:
                self.watchers.kill()
        return report

    async def _provision(self) -> tuple[list[FleetDeviceIdentity], int, str]:
        existing: dict[int, FleetDeviceIdentity] = {}
        missing: list[int] = []
        for index in self.indices:
            identity = self.stores.load(index)
            if identity is None:
                missing.append(index)
            else:
                existing[index] = identity
        if existing and self.sandbox is not None:
            first = next(iter(existing.values()))
            self.stores.meta((first.store_path / ROOT_CA_FILE).read_text())
            self._check_root_ca(first)
        self.provisioned = len(existing)

        def done(n: int) -> None:
            self.provisioned += n

        path = "reused"
        new: list[FleetDeviceIdentity] = []
        if missing:
            if self.sandbox is not None and self.options.bulk:
                path = "bulk"
                new = await provision_bulk(
                    self.sandbox, self.stores, missing, site_id=self.options.site, on_done=done
                )
            else:
                path = "platform"
                new = await provision_platform(
                    self.env, self.stores, missing, site=self.options.site, on_done=done
                )
        for identity in new:
            existing[identity.index] = identity
        return [existing[i] for i in self.indices], len(self.indices) - len(missing), path

    def _check_root_ca(self, identity: FleetDeviceIdentity) -> None:
        sandbox = self.sandbox
        if sandbox is None:
            return
        with contextlib.suppress(OSError):
            theirs = sandbox.ca_file.read_text().strip()
            ours = (identity.store_path / ROOT_CA_FILE).read_text().strip()
            if theirs and ours and theirs != ours:
                raise FleetError(
                    f"the device stores in {self.stores.base} belong to another sandbox "
                    "(another root CA)",
                    "pass another --store-root, or delete that folder",
                )

    async def _connect_all(self) -> float:
        """Connect every device, ``connect_concurrency`` handshakes at a time; return the
        seconds until the last one connected (or gave up).

        ``connect_concurrency`` workers take the devices one after another, in order: no
        waiting task per device, whose thousands of coroutines and futures would be freed
        only as the ramp goes on, scattered between the devices' long-lived objects."""
        opts = self.options
        start = time.monotonic()
        last = start
        self._enter("building TLS contexts")
        stop = threading.Event()
        try:
            await asyncio.to_thread(build_tls_contexts, self.devices, stop)
        finally:
            stop.set()
        self._enter("connecting")
        devices = iter(self.devices)

        async def worker() -> None:
            nonlocal last
            for device in devices:
                try:
                    await device.connect()
                except ConnectionFailed as exc:
                    self.failed += 1
                    device.failed = f"connect_failed_{exc.kind}"
                    self.error(device.failed)
                    continue
                except (MqttError, ShadowError, IotrefError) as exc:
                    self.failed += 1
                    device.failed = f"connect_{type(exc).__name__}"
                    self.error(device.failed)
                    continue
                assert device.connect_started is not None and device.connected_at is not None
                self.connect_hist.record((device.connected_at - device.connect_started) * 1e6)
                last = max(last, device.connected_at)
                self._spawn_sync(device)

        workers = min(opts.connect_concurrency, len(self.devices))
        await asyncio.gather(*(worker() for _ in range(workers)))
        return last - start

    def _spawn_sync(self, device: FleetDevice) -> None:
        async def sync() -> None:
            try:
                await device.wait_synced(self.options.sync_timeout_s)
            except TimeoutError:
                self.error("shadow_sync_timeout")
                return
            except ShadowError as exc:
                self.error(f"shadow_sync_{type(exc).__name__}")
                return
            assert device.synced_at is not None and device.connected_at is not None
            self.sync_hist.record((device.synced_at - device.connected_at) * 1e6)
            self.synced += 1
            self._schedule(device)

        task = asyncio.ensure_future(sync())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _schedule(self, device: FleetDevice) -> None:
        interval = 1.0 / self.options.rate
        first = time.monotonic() + self._rng.uniform(0, interval)
        heapq.heappush(self._heap, (first, device.identity.index, 0, device))
        self._wake.set()

    async def _scheduler(self, per_device: int) -> None:
        """Send every due message; one task for the whole fleet."""
        interval = 1.0 / self.options.rate
        heap = self._heap
        while True:
            self._wake.clear()
            now = time.monotonic()
            sent = 0
            while heap and heap[0][0] <= now:
                due, index, k, device = heapq.heappop(heap)
                try:
                    await device.send_next()
                    self.generated += 1
                except Exception as exc:
                    self.error(f"send_{type(exc).__name__}")
                if k + 1 < per_device:
                    heapq.heappush(heap, (due + interval, index, k + 1, device))
                sent += 1
                if sent % 200 == 0:
                    await asyncio.sleep(0)
                    now = time.monotonic()
            if self._all_scheduled and not heap:
                return
            wait = (
                SCHEDULER_TICK_S if not heap else max(0.0, min(SCHEDULER_TICK_S, heap[0][0] - now))
            )
            with contextlib.suppress(TimeoutError):
                async with stdlib_compat.timeout(wait if heap else 1.0):
                    await self._wake.wait()

    async def _simulate(
        self,
        started_at: float,
        provision_s: float,
        reused: int,
        provision_path: str,
        baseline: dict[str, int] | None,
    ) -> FleetReport:
        opts = self.options
        per_device = opts.messages_per_device
        scheduler = asyncio.ensure_future(self._scheduler(per_device))
        try:
            self._enter("connecting")
            self._started = time.monotonic()
            all_connected_s = await self._connect_all()
            if self.watchers is not None:
                await asyncio.to_thread(self.watchers.mark_steady, time.time())
            self._enter("syncing and sending")
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            self._trim("after connecting")
            self._all_scheduled = True
            self._wake.set()
            self._enter("sending")
            send_started = time.monotonic()
            await scheduler
            send_window = time.monotonic() - self._first_send_time(send_started)
            self._enter("draining")
            drained = await self._drain()
            self._enter("collecting")
            watch = None
            if self.watchers is not None:
                watch = await self._collect_watchers()
        finally:
            scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await scheduler
            self.memory_maps = memory_map_count()
            self._enter("stopping")
            await self._stop_all()
        # The monitor's counts after stopping: every message was acknowledged before
        # (drained), and its summary is one JSON document about every device the sandbox
        # knows (~1.2 kB each, tens of MB parsed), better read once the fleet's memory is free.
        monitor = None
        if baseline is not None and self.sandbox is not None:
            self._enter("counting")
            monitor = await self._monitor_delta(baseline)
        self._enter("done")
        return self._report(
            started_at=started_at,
            provision_s=provision_s,
            reused=reused,
            provision_path=provision_path,
            all_connected_s=all_connected_s,
            send_window=send_window,
            drained=drained,
            watch=watch,
            monitor=monitor,
        )

    def _first_send_time(self, fallback: float) -> float:
        synced = [d.synced_at for d in self.devices if d.synced_at is not None]
        return min(synced) if synced else fallback

    async def _drain(self) -> bool:
        """Wait until every queued message was acknowledged (or the drain timeout)."""
        deadline = time.monotonic() + self.options.drain_timeout_s
        while self.outbox_totals.depth > 0 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        if self.outbox_totals.depth > 0:
            self.error("not_acknowledged_at_end")
            return False
        return True

    async def _collect_watchers(self) -> WatchResult:
        """Wait until the watchers saw everything acknowledged (or stop changing), then
        stop them."""
        assert self.watchers is not None
        expected = self.outbox_totals.acked
        last = -1
        still = time.monotonic()
        deadline = time.monotonic() + self.options.drain_timeout_s
        while time.monotonic() < deadline:
            _received, unique = await asyncio.to_thread(self.watchers.progress)
            self.platform_received = _received
            if unique >= expected:
                break
            if unique != last:
                last, still = unique, time.monotonic()
            elif time.monotonic() - still > 5.0:
                break
            await asyncio.sleep(0.25)
        result = await asyncio.to_thread(self.watchers.stop)
        self.watchers = None
        return result

    async def _monitor_delta(self, baseline: dict[str, int]) -> dict[str, int] | None:
        assert self.sandbox is not None
        clients = {d.client_id for d in self.devices}
        expected = sum(d.generated for d in self.devices)
        counts: dict[str, int] | None = None
        last = -1
        still = time.monotonic()
        deadline = time.monotonic() + self.options.drain_timeout_s
        while time.monotonic() < deadline:
            counts = await monitor_counts(self.sandbox, clients)
            if counts is None:
                return None
            total = sum(counts.get(c, 0) - baseline.get(c, 0) for c in clients)
            if total >= expected:
                break
            if total != last:
                last, still = total, time.monotonic()
            elif time.monotonic() - still > 5.0:
                break
            await asyncio.sleep(0.5)
        if counts is None:
            return None
        return {c: counts.get(c, 0) - baseline.get(c, 0) for c in clients}

    async def _stop_all(self) -> None:
        """Stop every device, ``STOP_CONCURRENCY`` at a time. A fixed set of workers takes
        the devices one after another (rather than one waiting task per device), so
        stopping 10,000 devices does not first allocate 10,000 coroutines, and each
        stopped device's objects are freed before the next ones stop."""
        devices = iter(self.devices)

        async def worker() -> None:
            for device in devices:
                with contextlib.suppress(Exception):
                    await device.stop()

        workers = min(STOP_CONCURRENCY, len(self.devices))
        await asyncio.gather(*(worker() for _ in range(workers)), return_exceptions=True)

    # ------------------------------------------------------------------ the report

    def _report(
        self,
        *,
        started_at: float,
        provision_s: float,
        reused: int,
        provision_path: str,
        all_connected_s: float,
        send_window: float,
        drained: bool,
        watch: WatchResult | None,
        monitor: dict[str, int] | None,
    ) -> FleetReport:
        opts = self.options
        generated = sum(d.generated for d in self.devices)
        expected = len(self.devices) * opts.messages_per_device
        connected = sum(1 for d in self.devices if d.ever_connected)
        per_device = {d.client_id: d.generated for d in self.devices}
        watcher_json: dict[str, Any] | None = None
        latency = Histogram()
        steady = Histogram()
        if watch is not None:
            lost = sum(max(0, n - watch.per_client.get(c, 0)) for c, n in per_device.items())
            watcher_json = {
                "received": watch.received,
                "unique": watch.unique,
                "duplicates": watch.duplicates,
                "lost": lost,
                "invalid": watch.invalid,
                "disconnects": watch.disconnects,
                "devices_with_loss": sum(
                    1 for c, n in per_device.items() if watch.per_client.get(c, 0) < n
                ),
            }
            latency = watch.latency
            steady = watch.steady_latency
            if watch.disconnects:
                self.error("watcher_disconnected")
        monitor_json: dict[str, Any] | None = None
        if monitor is not None:
            stored = sum(monitor.values())
            monitor_json = {
                "stored": stored,
                "lost": sum(max(0, n - monitor.get(c, 0)) for c, n in per_device.items()),
                "devices_with_loss": sum(1 for c, n in per_device.items() if monitor.get(c, 0) < n),
            }
        errors = dict(self.errors)
        return FleetReport(
            {
                "format": REPORT_FORMAT,
                "environment": str(self.env),
                "target": "sandbox" if self.sandbox is not None else "platform",
                "fleet_devices": opts.devices,
                "shards": [{"index": opts.shard.index, "count": opts.shard.count}],
                "devices": len(self.devices),
                "rate_per_device": opts.rate,
                "duration_s": opts.duration_s,
                "messages_per_device": opts.messages_per_device,
                "started_at": started_at,
                "finished_at": time.time(),
                "provisioning": {
                    "path": provision_path,
                    "reused": reused,
                    "provisioned": len(self.devices) - reused,
                    "seconds": round(provision_s, 3),
                },
                "connect": {
                    "connected": connected,
                    "failed": self.failed,
                    "concurrency": opts.connect_concurrency,
                    "connect_rate": opts.connect_rate,
                    "all_connected_s": round(all_connected_s, 3),
                    "histogram_us": self.connect_hist.to_json(),
                    "synced": self.synced,
                    "sync_histogram_us": self.sync_hist.to_json(),
                },
                "telemetry": {
                    "expected": expected,
                    "generated": generated,
                    "acknowledged": self.outbox_totals.acked,
                    "unacknowledged": self.outbox_totals.depth,
                    "drained": drained,
                    "send_window_s": round(send_window, 3),
                    "throughput_msgs_per_s": round(generated / send_window, 2)
                    if send_window > 0
                    else 0.0,
                },
                "latency": {
                    "source": "watcher sendertimestamp" if watch is not None else None,
                    "histogram_us": latency.to_json(),
                    "steady_histogram_us": steady.to_json(),
                },
                "lost": {"watcher": watcher_json, "monitor": monitor_json},
                "memory": {
                    "peak_rss_mb": round(peak_rss_mb(), 1),
                    "malloc": dict(_malloc_tuning) if _malloc_tuning else None,
                    "memory_maps_before_stop": self.memory_maps,
                    "trimmed_mb": dict(self.trimmed_mb),
                },
                "cpu_s": dict(self.cpu_by_phase),
                "cpu_main_thread_s": dict(self.main_cpu_by_phase),
                "errors": errors,
                "limits": self.limits.to_json() if self.limits else None,
            }
        )


# --------------------------------------------------------------------------- reports


class FleetReport:
    """A run's (or merged runs') report: the JSON document plus derived figures."""

    def __init__(self, data: dict[str, Any]) -> None:
        if data.get("format") != REPORT_FORMAT:
            raise ValueError(f"not an {REPORT_FORMAT} document")
        self.data = data

    def to_json(self) -> dict[str, Any]:
        """The document with the percentiles (derived from the histograms) filled in."""
        out = json.loads(json.dumps(self.data))
        out["connect"].update(
            Histogram.from_json(self.data["connect"]["histogram_us"]).summary_ms()
        )
        out["connect"]["sync"] = Histogram.from_json(
            self.data["connect"]["sync_histogram_us"]
        ).summary_ms()
        out["latency"]["steady"] = Histogram.from_json(
            self.data["latency"].get("steady_histogram_us")
        ).summary_ms()
        out["latency"].update(
            Histogram.from_json(self.data["latency"]["histogram_us"]).summary_ms()
        )
        return dict(out)

    @property
    def lost(self) -> int | None:
        """Messages lost by the best source available (monitor, else watcher)."""
        lost = self.data["lost"]
        for source in ("monitor", "watcher"):
            if lost.get(source) is not None:
                return int(lost[source]["lost"])
        return None

    def text(self) -> str:
        """The report for people."""
        d = self.to_json()
        c, t, lat, lost = d["connect"], d["telemetry"], d["latency"], d["lost"]
        shards = ", ".join(f"{s['index']}/{s['count']}" for s in d["shards"])

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:,.1f} ms"

        lines = [
            f"fleet: {d['devices']} devices (of {d['fleet_devices']}; shard {shards}) on "
            f"{d['environment']} [{d['target']}]",
            f"  provisioning  {d['provisioning']['provisioned']} new ({d['provisioning']['path']}),"
            f" {d['provisioning']['reused']} reused, {d['provisioning']['seconds']:.1f} s",
            f"  connect       {c['connected']} connected, {c['failed']} failed; p50 "
            f"{ms(c['p50_ms'])}, p99 {ms(c['p99_ms'])}; all connected in "
            f"{c['all_connected_s']:.1f} s (concurrency {c['concurrency']}, "
            f"{_connect_rate_text(c.get('connect_rate'))})",
            f"  shadow sync   {c['synced']} synced; p50 {ms(c['sync']['p50_ms'])}, p99 "
            f"{ms(c['sync']['p99_ms'])} after CONNACK",
            f"  telemetry     {t['generated']} of {t['expected']} sent, {t['acknowledged']} "
            f"acknowledged; {t['throughput_msgs_per_s']:,.1f} msgs/s over "
            f"{t['send_window_s']:.1f} s",
            f"  latency       p50 {ms(lat['p50_ms'])}, p99 {ms(lat['p99_ms'])}, max "
            f"{ms(lat['max_ms'])} ({lat['histogram_us']['count']} messages; "
            f"{lat['source'] or 'not measured: no operator identity'})",
        ]
        steady = lat.get("steady") or {}
        if steady.get("p50_ms") is not None:
            lines.append(
                f"    once all connected: p50 {ms(steady['p50_ms'])}, p99 "
                f"{ms(steady['p99_ms'])}, max {ms(steady['max_ms'])}"
            )
        watcher, monitor = lost.get("watcher"), lost.get("monitor")
        parts = []
        if monitor is not None:
            parts.append(f"{monitor['lost']} by the monitor ({monitor['stored']} stored)")
        if watcher is not None:
            parts.append(
                f"{watcher['lost']} by the independent subscriber ({watcher['unique']} unique, "
                f"{watcher['duplicates']} duplicates)"
            )
        lines.append(f"  lost          {'; '.join(parts) if parts else 'not measured'}")
        mem = d["memory"]
        extra = (
            f" (sum over shards {mem['peak_rss_mb_sum']:,.0f} MB)"
            if "peak_rss_mb_sum" in mem
            else ""
        )
        lines.append(f"  memory        peak RSS {mem['peak_rss_mb']:,.0f} MB{extra}")
        errors = ", ".join(f"{k} {v}" for k, v in sorted(d["errors"].items())) or "none"
        lines.append(f"  errors        {errors}")
        limits = d.get("limits")
        if limits:
            lines.append(
                f"  limits        files {limits['nofile_soft']} (hard {limits['nofile_hard']}, "
                f"was {limits['nofile_soft_before']}); broker max_connections "
                f"{limits['broker_max_connections'] or '?'}, broker files "
                f"{limits['broker_nofile'] or '?'}; local ports {limits['ephemeral_ports'] or '?'}"
            )
        return "\n".join(lines)


def _connect_rate_text(rate: float | None) -> str:
    if rate is None:
        return "connect rate not recorded"
    return f"at most {rate:g} connects/s" if rate else "connect rate not limited"


def merge_reports(reports: Sequence[FleetReport]) -> FleetReport:
    """One report for shard reports of one fleet run: counts summed, histograms merged
    (percentiles recomputed from them), connect time the slowest shard's, throughput the
    sum (shards run at the same time), peak memory the largest shard's (and the sum)."""
    if not reports:
        raise ValueError("nothing to merge")
    docs = [r.data for r in reports]
    first = docs[0]
    for doc in docs[1:]:
        for key in ("fleet_devices", "rate_per_device", "duration_s", "messages_per_device"):
            if doc[key] != first[key]:
                raise ValueError(f"reports differ in {key}: {first[key]} vs {doc[key]}")
    shards = [s for doc in docs for s in doc["shards"]]
    seen = {(s["index"], s["count"]) for s in shards}
    if len(seen) != len(shards):
        raise ValueError("the same shard appears twice")

    def total(path: str) -> int:
        out = 0
        for doc in docs:
            node: Any = doc
            for part in path.split("."):
                node = node[part]
            out += int(node)
        return out

    def merged_hist(section: str, key: str) -> dict[str, Any]:
        hist = Histogram()
        for doc in docs:
            hist.merge(Histogram.from_json(doc[section].get(key)))
        return hist.to_json()

    def merged_lost(source: str) -> dict[str, Any] | None:
        parts = [doc["lost"].get(source) for doc in docs]
        if any(p is None for p in parts):
            return None
        keys = parts[0].keys() if parts[0] else []
        return {k: sum(int(p[k]) for p in parts if p) for k in keys}

    errors: Counter[str] = Counter()
    cpu: Counter[str] = Counter()
    main_cpu: Counter[str] = Counter()
    for doc in docs:
        errors.update(doc["errors"])
        cpu.update(doc.get("cpu_s", {}))
        main_cpu.update(doc.get("cpu_main_thread_s", {}))
    limits = [doc.get("limits") for doc in docs if doc.get("limits")]
    merged = {
        "format": REPORT_FORMAT,
        "environment": first["environment"],
        "target": first["target"],
        "fleet_devices": first["fleet_devices"],
        "shards": sorted(shards, key=lambda s: (s["count"], s["index"])),
        "devices": total("devices"),
        "rate_per_device": first["rate_per_device"],
        "duration_s": first["duration_s"],
        "messages_per_device": first["messages_per_device"],
        "started_at": min(doc["started_at"] for doc in docs),
        "finished_at": max(doc["finished_at"] for doc in docs),
        "provisioning": {
            "path": "+".join(sorted({doc["provisioning"]["path"] for doc in docs})),
            "reused": total("provisioning.reused"),
            "provisioned": total("provisioning.provisioned"),
            "seconds": max(doc["provisioning"]["seconds"] for doc in docs),
        },
        "connect": {
            "connected": total("connect.connected"),
            "failed": total("connect.failed"),
            "concurrency": sum(doc["connect"]["concurrency"] for doc in docs),
            # Each shard paces its own attempts: together they make the sum (0: one was
            # not limited, so neither is the whole).
            "connect_rate": (
                0.0
                if any(not doc["connect"].get("connect_rate") for doc in docs)
                else sum(doc["connect"]["connect_rate"] for doc in docs)
            ),
            "all_connected_s": max(doc["connect"]["all_connected_s"] for doc in docs),
            "histogram_us": merged_hist("connect", "histogram_us"),
            "synced": total("connect.synced"),
            "sync_histogram_us": merged_hist("connect", "sync_histogram_us"),
        },
        "telemetry": {
            "expected": total("telemetry.expected"),
            "generated": total("telemetry.generated"),
            "acknowledged": total("telemetry.acknowledged"),
            "unacknowledged": total("telemetry.unacknowledged"),
            "drained": all(doc["telemetry"]["drained"] for doc in docs),
            "send_window_s": max(doc["telemetry"]["send_window_s"] for doc in docs),
            "throughput_msgs_per_s": round(
                sum(doc["telemetry"]["throughput_msgs_per_s"] for doc in docs), 2
            ),
        },
        "latency": {
            "source": first["latency"]["source"],
            "histogram_us": merged_hist("latency", "histogram_us"),
            "steady_histogram_us": merged_hist("latency", "steady_histogram_us"),
        },
        "lost": {"watcher": merged_lost("watcher"), "monitor": merged_lost("monitor")},
        "memory": {
            "peak_rss_mb": max(doc["memory"]["peak_rss_mb"] for doc in docs),
            "peak_rss_mb_sum": round(sum(doc["memory"]["peak_rss_mb"] for doc in docs), 1),
        },
        "cpu_s": dict(cpu),
        "cpu_main_thread_s": dict(main_cpu),
        "errors": dict(errors),
        "limits": limits[0] if limits else None,
    }
    return FleetReport(merged)


def load_report(path: Path) -> FleetReport:
    """A report written by ``iotref fleet --json`` (or ``--report FILE``)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FleetError(f"cannot read the report {path}: {exc}") from None
    try:
        return FleetReport(data)
    except ValueError as exc:
        raise FleetError(f"{path}: {exc}") from None


__all__ = [
    "FleetDevice",
    "FleetDeviceIdentity",
    "FleetError",
    "FleetLimitError",
    "FleetOptions",
    "FleetProgress",
    "FleetReport",
    "FleetRun",
    "FleetStores",
    "Histogram",
    "Limits",
    "MemoryOutbox",
    "OutboxTotals",
    "SandboxInfo",
    "Shard",
    "StatusGenerator",
    "WatchResult",
    "Watchers",
    "check_limits",
    "device_name",
    "find_sandbox",
    "load_report",
    "merge_reports",
    "messages_per_device",
    "provision_bulk",
    "provision_platform",
    "raise_nofile_limit",
    "watcher_main",
]
