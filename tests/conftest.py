"""Fixtures shared by every test folder; the helpers they are made of live in
``tests/support/`` (see its ``__init__``).

- ``sandbox``: one real sandbox for the session (auto-approve on); ``sandbox_factory``
  starts more, each in its own data dir, stopped at teardown.
- ``device`` (once per module): a device provisioned on ``sandbox``, as files;
  ``onboarding_env`` (once per module), ``store``: a login on ``sandbox`` and a freshly
  provisioned certificate store, made by the onboarding library.
- ``subscriber``: an independent subscriber with the operator identity that records every
  telemetry message ``sandbox`` delivers.
- ``anyio_backend``: ``@pytest.mark.anyio`` tests run on asyncio.

``tests/unit`` tests one piece in-process (fakes allowed, no sandbox, broker or server
besides a local socket that piece owns); ``tests/integration`` runs the real sandbox;
``tests/reliability`` injects faults into it (its own ``conftest.py`` restarts one)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from iotref.device.onboarding.environment import Environment
from iotref.device.onboarding.token_store import TokenStore
from tests.support.device_keys import DeviceFiles
from tests.support.onboarding import logged_in, provision_store
from tests.support.sandbox_process import SandboxProcess
from tests.support.telemetry_watcher import TelemetryWatcher
from tests.support.tokens import provision_device

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


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def device(sandbox: SandboxProcess) -> DeviceFiles:
    """A device provisioned on ``sandbox``: its key, certificate and client id."""
    return provision_device(sandbox)


@pytest.fixture(scope="module")
def onboarding_env(
    sandbox: SandboxProcess, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Environment, TokenStore]:
    """The sandbox's environment and a token store, logged in once (auto-approve)."""
    return logged_in(sandbox, tmp_path_factory.mktemp("client-home") / "tokens")


@pytest.fixture
def store(onboarding_env: tuple[Environment, TokenStore], tmp_path: Path) -> Path:
    """A complete certificate store for a new machine of ``sandbox``."""
    return provision_store(*onboarding_env, tmp_path / "store", "Client test press")


@pytest.fixture
def subscriber(sandbox: SandboxProcess) -> Iterator[TelemetryWatcher]:
    """Every telemetry message ``sandbox`` delivers (QoS 1, on its device listener), kept."""
    watcher = TelemetryWatcher(qos=1, keep_messages=True)
    with watcher.attach(sandbox.info, listener="device"):
        yield watcher
