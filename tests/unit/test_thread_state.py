"""keep_thread_state: one extra PyGILState_Ensure per thread, never more."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from iotref.device import thread_state


def test_each_thread_keeps_its_state_once(monkeypatch: pytest.MonkeyPatch) -> None:
    kept: list[int] = []
    api = SimpleNamespace(PyGILState_Ensure=lambda: kept.append(threading.get_ident()))
    monkeypatch.setattr(thread_state, "ctypes", SimpleNamespace(pythonapi=api))
    monkeypatch.setattr(thread_state, "_kept", set())
    together = threading.Barrier(2)  # both alive at once: thread idents are reused

    def callbacks() -> None:
        for _ in range(3):
            thread_state.keep_thread_state()
        assert thread_state.is_kept()

    def callbacks_together() -> None:
        callbacks()
        together.wait(5)

    threads = [threading.Thread(target=callbacks_together) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not thread_state.is_kept()
    callbacks()
    assert len(kept) == 3 and len(set(kept)) == 3  # once per calling thread
    assert threading.get_ident() in kept


def test_without_the_c_api_it_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(thread_state, "ctypes", SimpleNamespace())
    monkeypatch.setattr(thread_state, "_kept", set())
    thread_state.keep_thread_state()  # no pythonapi: nothing to call, no error
    assert thread_state.is_kept()


def test_a_real_thread_keeps_running_python_after_it() -> None:
    """The real call on a Python thread: nests once more and the thread goes on and ends
    normally (the state is freed with the thread)."""
    out: list[int] = []

    def work() -> None:
        thread_state.keep_thread_state()
        out.append(sum(range(1000)))

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(5)
    assert not worker.is_alive() and out == [499500]
