"""The token store (files, modes, environments) and refresh through the Authenticator."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from iotref.device.errors import LoginRequired, StoreError
from iotref.device.onboarding.auth import Authenticator
from iotref.device.onboarding.device_flow import Bearer, DeviceFlowClient, TokenSet
from iotref.device.onboarding.environment import Environment, load_environment, with_sandbox_id
from iotref.device.onboarding.http_client import create_http_client
from iotref.device.onboarding.token_store import TokenStore, default_config_dir

ENV = load_environment("test")


def _tokens(suffix: str = "1", expires_at: float = 2_000_000_000.0) -> TokenSet:
    return TokenSet(
        access_token=f"access-{suffix}",
        refresh_token=f"refresh-{suffix}",
        token_type="bearer",
        scope=ENV.scope,
        audiences=("directory",),
        bearer=Bearer("org-1", "Organization"),
        expires_at=expires_at,
        obtained_at=1_700_000_000.0,
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_default_location() -> None:
    assert default_config_dir({"IOTREF_HOME": "/srv/iot"}) == Path("/srv/iot")
    assert default_config_dir({"XDG_CONFIG_HOME": "/x"}) == Path("/x/iotref")
    assert default_config_dir({"XDG_CONFIG_HOME": "relative"}) == (
        Path.home() / ".config" / "iotref"
    )
    assert default_config_dir({}) == Path.home() / ".config" / "iotref"
    assert default_config_dir({"IOTREF_HOME": "/a", "XDG_CONFIG_HOME": "/b"}) == Path("/a")


def test_save_and_load_with_private_modes(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "home" / "tokens")
    path = store.save(ENV, _tokens())
    assert store.load(ENV) == _tokens()
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert _mode(path.parent.parent) == 0o700
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    assert path.name.startswith("test-")
    data = json.loads(path.read_text())
    assert data["environment"] == {
        "name": "test",
        "directory_host": ENV.directory_host,
        "client_id": ENV.client_id,
    }


def test_one_file_per_environment_keyed_by_name_and_host(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    other = Environment("test", ENV.base_url, "https://other.example", ENV.client_id, ENV.scope)
    store.save(ENV, _tokens("a"))
    assert store.path_for(ENV) != store.path_for(other)
    assert store.load(other) is None
    store.save(other, _tokens("b"))
    assert store.load(ENV) == _tokens("a")
    assert store.load(other) == _tokens("b")


def test_a_file_of_another_environment_is_refused(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    path = store.save(ENV, _tokens())
    data = json.loads(path.read_text())
    data["environment"]["directory_host"] = "https://evil.example"
    path.write_text(json.dumps(data))
    with pytest.raises(StoreError, match="another environment"):
        store.load(ENV)


def test_a_login_with_one_sandbox_is_not_handed_out_for_another_at_the_same_address(
    tmp_path: Path,
) -> None:
    store = TokenStore(tmp_path)
    local = load_environment("local")
    first, second = with_sandbox_id(local, "aaaa0001"), with_sandbox_id(local, "bbbb0002")
    path = store.save(first, _tokens("a"))
    assert json.loads(path.read_text())["environment"]["sandbox_id"] == "aaaa0001"
    assert store.load(first) == _tokens("a")
    assert store.load(second) is None  # the new sandbox never issued these tokens
    assert store.load(local) == _tokens("a")  # sandbox not known (none answers): not compared
    # One file per address: the login with the new sandbox replaces the old one's.
    assert store.save(second, _tokens("b")) == path
    assert store.load(second) == _tokens("b")
    assert store.load(first) is None
    assert [p.name for p in tmp_path.glob("*.json")] == [path.name]


def test_a_file_from_before_sandbox_ids_is_used(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    local = load_environment("local")
    path = store.save(local, _tokens("a"))
    assert "sandbox_id" not in json.loads(path.read_text())["environment"]
    assert store.load(with_sandbox_id(local, "aaaa0001")) == _tokens("a")


def test_damaged_file(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    store.save(ENV, _tokens())
    store.path_for(ENV).write_text("{not json")
    with pytest.raises(StoreError, match="damaged") as info:
        store.load(ENV)
    assert "logout" in (info.value.next_step or "")


def test_loose_mode_is_tightened(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    path = store.save(ENV, _tokens())
    os.chmod(path, 0o644)
    assert store.load(ENV) == _tokens()
    assert _mode(path) == 0o600


def test_delete(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    store.save(ENV, _tokens())
    assert store.delete(ENV) is True
    assert store.load(ENV) is None
    assert store.delete(ENV) is False


# -- Authenticator ----------------------------------------------------------------------------


class RefreshServer:
    """Answers refresh grants; each refresh token works once."""

    def __init__(self) -> None:
        self.valid = {"refresh-1"}
        self.calls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        form = parse_qs(request.content.decode())
        token = form["refresh_token"][0]
        if token not in self.valid:
            return httpx.Response(400, json={"error": "invalid_grant"})
        self.valid.discard(token)
        self.calls += 1
        new = f"refresh-{self.calls + 1}"
        self.valid.add(new)
        body: dict[str, Any] = {
            "access_token": f"access-{self.calls + 1}",
            "refresh_token": new,
            "token_type": "bearer",
            "scope": ENV.scope,
            "bearer": {"id": "org-1", "type": "Organization"},
            "expires_in": 3600,
        }
        return httpx.Response(200, json=body)


def _authenticator(store: TokenStore, http: httpx.AsyncClient, now: float) -> Authenticator:
    return Authenticator(ENV, store, DeviceFlowClient(ENV, http), clock=lambda: now)


def _access_token(store: TokenStore, server: RefreshServer, now: float = 1000.0) -> str:
    """What an authenticator of ``store`` hands out at ``now``, refreshing at ``server``."""

    async def run() -> str:
        async with create_http_client(transport=httpx.MockTransport(server)) as http:
            return await _authenticator(store, http, now=now).access_token()

    return asyncio.run(run())


def test_valid_token_is_used_without_network(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    store.save(ENV, _tokens(expires_at=5000.0))
    server = RefreshServer()

    assert _access_token(store, server) == "access-1"
    assert server.calls == 0


def test_expired_token_is_refreshed_and_the_rotated_one_saved(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    store.save(ENV, _tokens(expires_at=1000.0))
    server = RefreshServer()

    assert _access_token(store, server) == "access-2"
    saved = store.load(ENV)
    assert saved is not None
    assert saved.refresh_token == "refresh-2"
    assert _mode(store.path_for(ENV)) == 0o600


def test_second_process_uses_the_first_ones_refresh(tmp_path: Path) -> None:
    """Two authenticators (think: processes) with the same stale tokens refresh once."""
    store = TokenStore(tmp_path)
    store.save(ENV, _tokens(expires_at=1000.0))
    server = RefreshServer()

    async def run() -> tuple[str, str]:
        async with create_http_client(transport=httpx.MockTransport(server)) as http:
            first = _authenticator(store, http, now=1000.0)
            second = _authenticator(store, http, now=1000.0)
            second.tokens()  # loads the stale tokens before the first refreshes
            a = await first.access_token()
            b = await second.access_token()
            return a, b

    assert asyncio.run(run()) == ("access-2", "access-2")
    assert server.calls == 1


def test_concurrent_refreshes_in_one_loop_do_not_deadlock(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    store.save(ENV, _tokens(expires_at=1000.0))
    server = RefreshServer()

    async def run() -> list[str]:
        async with create_http_client(transport=httpx.MockTransport(server)) as http:
            auths = [_authenticator(store, http, now=1000.0) for _ in range(5)]
            for auth in auths:
                auth.tokens()
            return await asyncio.wait_for(
                asyncio.gather(*(a.access_token() for a in auths)), timeout=10
            )

    assert set(asyncio.run(run())) == {"access-2"}
    assert server.calls == 1


def test_spent_refresh_token_asks_for_login(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    store.save(ENV, _tokens(expires_at=1000.0))
    server = RefreshServer()
    server.valid.clear()

    with pytest.raises(LoginRequired, match="no longer valid"):
        _access_token(store, server)


def test_not_logged_in(tmp_path: Path) -> None:
    with pytest.raises(LoginRequired, match="not logged in") as info:
        _access_token(TokenStore(tmp_path), RefreshServer(), now=0)
    assert info.value.next_step == "run 'iotref login --env test'"
