"""The simulator process's memory: glibc malloc tuned for thousands of connections
(``mallopt``, ``malloc_trim`` through ctypes), and what the process holds (RSS, its peak,
memory mappings). Why and what it saves: docs/fleet.md, "Memory"."""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import sys
from pathlib import Path
from typing import Any, Final

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
    page is ever written (the MQTT 5 client's operation tables, s2n's record buffers). Cut
    out of a heap they occupy memory that earlier, freed allocations had already touched,
    and s2n wipes its buffers when a connection is freed; on pages of their own the
    untouched pages are never resident, and freeing them returns them at once. glibc only
    maps a block of its own when the heap's free end cannot hold it, so the heap is also no
    longer grown ahead (``M_TOP_PAD`` 0). Each such block costs an ``mmap``/``munmap``."""
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


def malloc_tuning() -> dict[str, Any] | None:
    """What :func:`tune_malloc` set in this process (``None``: not tuned)."""
    return dict(_malloc_tuning) if _malloc_tuning else None


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
