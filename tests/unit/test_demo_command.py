"""The demo's own decisions, on real files and sockets: which ports a sandbox it starts
takes, and when its default certificate store is another sandbox's and is moved aside (the
whole demo runs in tests/integration/test_demo.py), and what it shows with --quiet."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import pytest
from rich.console import Console

from iotref.cli.demo_command import (
    DemoError,
    DemoOptions,
    Display,
    SandboxInfo,
    _set_aside_other_sandboxes_store,
    choose_ports,
)
from iotref.device.onboarding.certificate_store import ROOT_CA_FILE, CertificateStore, Progress
from iotref.device.onboarding.environment import Environment, EnvironmentIdentity
from tests.support.device_keys import make_key, self_signed_pem
from tests.support.ports import free_port


def test_ports_asked_for_are_taken_as_they_are() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(DemoError, match=f"port {port} is in use") as info:
            choose_ports(port, 0)
        assert "--http-port N" in (info.value.next_step or "")
        with pytest.raises(DemoError, match=f"port {port} is in use") as info:
            choose_ports(0, port)
        assert "--mqtt-port N" in (info.value.next_step or "")
    free = free_port()
    chosen = choose_ports(free, 0)
    assert (chosen.http, chosen.mqtt, chosen.busy_defaults) == (free, 0, ())


def _root_ca(name: str) -> bytes:
    return self_signed_pem(make_key(), name, ca=True, days=30)


ADDRESS = "http://127.0.0.1:18780"


def _options(tmp_path: Path, store_option: Path | None = None) -> DemoOptions:
    sandbox_ca = tmp_path / ".sandbox" / "ca" / "ca-bundle.pem"
    sandbox_ca.parent.mkdir(parents=True, exist_ok=True)
    if not sandbox_ca.exists():
        sandbox_ca.write_bytes(_root_ca("this sandbox"))
    env = Environment("local", ADDRESS, ADDRESS, "client", "scope", sandbox_id="bbbb0002")
    sandbox = SandboxInfo(
        data_dir=tmp_path / ".sandbox", http_url=ADDRESS, mqtt_port=18883, admin_token="x",
        env_file=tmp_path / ".sandbox" / "env.local", ca_file=sandbox_ca, started_here=True,
        pid=None,
    )  # fmt: skip
    store = store_option or tmp_path / "certificate_store" / "local"
    return DemoOptions(env, sandbox, store, store_option, 3.0, 0.25, False)


def _store(opts: DemoOptions, identity: EnvironmentIdentity, root_ca: bytes) -> None:
    store = CertificateStore(opts.store)
    store.write_progress(Progress(environment=identity))
    store.file(ROOT_CA_FILE).write_bytes(root_ca)


def _display() -> tuple[Display, io.StringIO]:
    out = io.StringIO()
    return Display(Console(file=out, width=300, highlight=False)), out


def test_a_store_from_before_sandbox_ids_is_told_apart_by_its_root_ca(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    opts = _options(tmp_path)
    legacy = EnvironmentIdentity("local", ADDRESS)  # no sandbox id recorded
    assert opts.sandbox is not None and opts.sandbox.ca_file is not None
    _store(opts, legacy, opts.sandbox.ca_file.read_bytes())
    display, out = _display()
    _set_aside_other_sandboxes_store(opts, display)
    assert opts.store.is_dir() and out.getvalue() == ""  # this sandbox's: kept in place

    _store(opts, legacy, _root_ca("a removed sandbox"))
    _set_aside_other_sandboxes_store(opts, display)
    assert not opts.store.exists()
    [moved] = opts.store.parent.glob("local.sandbox-*")
    assert json.loads((moved / ".progress.json").read_text())["environment"] == legacy.as_dict()
    assert out.getvalue() == (
        f"! the store certificate_store/local belongs to a sandbox at {ADDRESS} with another "
        f"root CA; moved it to certificate_store/{moved.name}\n"
    )


def test_only_the_demos_own_store_of_a_sandbox_is_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    other_sandbox = EnvironmentIdentity("local", ADDRESS, "aaaa0001")
    display, out = _display()
    # Given with --store: left alone (provisioning refuses it with what differs).
    given = _options(tmp_path, store_option=tmp_path / "mine")
    _store(given, other_sandbox, b"")
    _set_aside_other_sandboxes_store(given, display)
    assert given.store.is_dir()
    # A store of the real test platform under the local name: not a sandbox's, left alone.
    opts = _options(tmp_path)
    _store(opts, EnvironmentIdentity("local", "https://directory.example.com"), b"")
    _set_aside_other_sandboxes_store(opts, display)
    assert opts.store.is_dir()
    assert out.getvalue() == ""
    # The demo's own store, made by another sandbox at this address: moved, named after it.
    _store(opts, other_sandbox, b"")
    _set_aside_other_sandboxes_store(opts, display)
    assert not opts.store.exists()
    assert (tmp_path / "certificate_store" / "local.sandbox-aaaa0001").is_dir()
    assert "(another sandbox: a new data dir on the same address)" in out.getvalue()


@pytest.mark.parametrize("quiet", [False, True])
def test_quiet_demo_shows_only_what_needs_the_user(quiet: bool) -> None:
    out = io.StringIO()
    display = Display(Console(file=out, width=120, force_terminal=False), quiet=quiet)
    display.step("sandbox", "started at http://127.0.0.1:8780")
    display.progress.phase = "publishing with permission"
    display.refresh()
    display.note("the saved login no longer worked; logging in again")
    text = out.getvalue()
    assert "the saved login no longer worked" in text, text
    assert ("started at http://127.0.0.1:8780" in text) is not quiet, text
    assert ("publishing with permission" in text) is not quiet, text
