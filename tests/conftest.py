"""Shared fixtures. ``sandbox`` is one real sandbox for the session (auto-approve on);
``sandbox_factory`` starts more, each in its own data dir, stopped at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.sandbox_process import SandboxProcess

SandboxFactory = Callable[..., SandboxProcess]


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxProcess]:
    """A running sandbox with ``--auto-approve`` and a 1 s polling interval."""
    args = ["--auto-approve", "--poll-interval", "1"]
    with SandboxProcess(tmp_path_factory.mktemp("sandbox"), args).start() as proc:
        yield proc


@pytest.fixture
def sandbox_factory(tmp_path: Path) -> Iterator[SandboxFactory]:
    """Start sandboxes with extra ``sandbox up`` arguments: ``sandbox_factory("--x", "1")``."""
    started: list[SandboxProcess] = []

    def start(*args: str, data_dir: Path | None = None) -> SandboxProcess:
        proc = SandboxProcess(data_dir or tmp_path / f"sandbox{len(started)}", list(args))
        started.append(proc)
        return proc.start()

    yield start
    errors = []
    for proc in started:
        try:
            proc.stop()
        except AssertionError as exc:
            errors.append(str(exc))
    assert not errors, errors
