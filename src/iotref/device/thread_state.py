"""Python thread states for awscrt's event-loop threads.

awscrt calls into Python from threads of its own (not started by Python) through
``PyGILState_Ensure``/``PyGILState_Release``. On such a thread the first call creates a
Python thread state and the matching release destroys it again, so every callback (every
PUBACK, every received message) builds and tears down a thread state; CPython maps and
unmaps the memory of its frame stack each time (a page fault and a TLB flush per
message). ``perf`` put that at 40-50 % of the CPU of a process receiving 100,000 messages,
and about a third of a sending process's CPU per QoS 1 message.

:func:`keep_thread_state` makes one extra ``PyGILState_Ensure`` on the calling thread that
is never released: the thread state then lives as long as the thread (awscrt's event-loop
threads live as long as the process), and later callbacks reuse it. The callbacks still
release the GIL when they return (``PyGILState_Release`` does so whenever the state it
restores did not hold the GIL). On an interpreter without ``ctypes.pythonapi`` it does
nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading

_kept: set[int] = set()
_lock = threading.Lock()


def keep_thread_state() -> None:
    """Keep the calling thread's Python thread state for the rest of the thread's life.

    Call it from a callback that awscrt runs on its own thread (it holds the GIL there).
    Cheap after the first call on a thread: one set lookup."""
    ident = threading.get_ident()
    if ident in _kept:
        return
    with _lock:
        if ident in _kept:
            return
        _kept.add(ident)
    with contextlib.suppress(AttributeError, OSError):  # not CPython: nothing to keep
        ctypes.pythonapi.PyGILState_Ensure()


def is_kept() -> bool:
    """Whether :func:`keep_thread_state` already ran on the calling thread."""
    return threading.get_ident() in _kept
