"""Environments: the shipped files carry the contract's values; URLs are checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from iotref.device.environment import (
    EnvironmentIdentity,
    check_service_url,
    environment_name_for_file,
    is_loopback_host,
    load_environment,
    load_environment_file,
    resolve_environment,
)
from iotref.device.errors import ConfigurationError
from iotref.protocol.environment_file import DEFAULT_SCOPE

SCOPE = "Org.prinect.onprem.rw,Org.directory.machines.rw,Org.directory.organization.r"


def test_test_environment_has_the_contract_values() -> None:
    env = load_environment("test")
    assert env.base_url == "https://cfg.iot.stg.connectprint.cloud"
    assert env.directory_host == "https://directory.sandbox.zaikio.com"
    assert env.client_id == "600b71b7-b4cf-44ac-8c00-92283d50f9a5"
    assert env.scope == SCOPE
    assert env.scopes == tuple(SCOPE.split(","))


def test_live_environment_has_the_contract_values() -> None:
    env = load_environment("live")
    assert env.base_url == "https://cfg.iot.connectprint.cloud"
    assert env.directory_host == "https://directory.heidelberg.cloud"
    assert env.client_id == "3c6221cd-9b4d-4037-99f7-a76b74dc0be0"
    assert env.scope == SCOPE


def test_local_environment_points_at_the_default_sandbox() -> None:
    from iotref.sandbox.seed import OAUTH_CLIENT_ID

    env = load_environment("local")
    assert env.base_url == "http://127.0.0.1:8780"
    assert env.directory_host == "http://127.0.0.1:8780"
    assert env.client_id == OAUTH_CLIENT_ID
    assert env.scope == DEFAULT_SCOPE


def test_unknown_environment_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="unknown environment"):
        load_environment("staging")


@pytest.mark.parametrize(
    "host", ["localhost", "LOCALHOST", "127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost."]
)
def test_loopback_hosts(host: str) -> None:
    assert is_loopback_host(host)


@pytest.mark.parametrize("host", ["10.0.0.1", "example.com", "localhost.example.com", "::2", ""])
def test_non_loopback_hosts(host: str) -> None:
    assert not is_loopback_host(host)


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8780", "http://localhost:1/", "http://[::1]:8080", "https://example.com"],
)
def test_accepted_urls(url: str) -> None:
    assert check_service_url(url, "base_url") == url.rstrip("/")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://example.com", "not a loopback host"),
        ("http://10.1.2.3:8780", "not a loopback host"),
        ("ftp://127.0.0.1", "https://"),
        ("https://", "https://"),
        ("127.0.0.1:8780", "https://"),
        ("https://user:pw@example.com", "credentials"),
        ("https://example.com/?x=1", "query"),
        ("https://example.com:99999", "not a valid URL"),
    ],
)
def test_refused_urls(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        check_service_url(url, "base_url")


def _write_env(path: Path, **overrides: str) -> Path:
    values = {
        "base_url": "https://cfg.example.com",
        "DIRECTORY_HOST": "https://dir.example.com",
        "DIRECTORY_OAUTH_CLIENT_ID": "abc",
        "SCOPE": SCOPE,
        **overrides,
    }
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items() if v))
    return path


def test_environment_file_is_named_after_the_file(tmp_path: Path) -> None:
    env = load_environment_file(_write_env(tmp_path / "env.staging"))
    assert env.name == "staging"
    assert env.source == str(tmp_path / "env.staging")
    assert env.cli_selector == f"--env-file {tmp_path / 'env.staging'}"
    assert environment_name_for_file(Path("plant.env")) == "plant"
    assert environment_name_for_file(Path(".env")) == "env"


def test_environment_file_missing_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="lacks DIRECTORY_OAUTH_CLIENT_ID"):
        load_environment_file(_write_env(tmp_path / "env.x", DIRECTORY_OAUTH_CLIENT_ID=""))


def test_environment_file_plain_http_remote_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="plain http"):
        load_environment_file(_write_env(tmp_path / "env.x", DIRECTORY_HOST="http://dir.com"))


def test_environment_file_missing_or_malformed(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_environment_file(tmp_path / "nope")
    bad = tmp_path / "env.bad"
    bad.write_text("no equals sign here\n")
    with pytest.raises(ConfigurationError, match="expected KEY=value"):
        load_environment_file(bad)


def test_resolution_order(tmp_path: Path) -> None:
    file = _write_env(tmp_path / "env.plant")
    assert resolve_environment(environ={}).name == "local"
    assert resolve_environment(environ={"IOTREF_ENV": "live"}).name == "live"
    assert resolve_environment(environ={"IOTREF_ENV_FILE": str(file)}).name == "plant"
    # Options beat variables.
    assert resolve_environment("test", environ={"IOTREF_ENV": "live"}).name == "test"
    assert resolve_environment(None, file, environ={"IOTREF_ENV": "live"}).name == "plant"
    with pytest.raises(ConfigurationError, match="not both"):
        resolve_environment("test", file, environ={})
    with pytest.raises(ConfigurationError, match="both IOTREF_ENV"):
        resolve_environment(environ={"IOTREF_ENV": "live", "IOTREF_ENV_FILE": str(file)})


def test_identity_ties_name_and_directory_host(tmp_path: Path) -> None:
    a = load_environment_file(_write_env(tmp_path / "env.local"))
    (tmp_path / "b").mkdir()
    b = load_environment_file(
        _write_env(tmp_path / "b" / "env.local", DIRECTORY_HOST="http://127.0.0.1:9")
    )
    assert a.identity == EnvironmentIdentity("local", "https://dir.example.com")
    assert a.name == b.name
    assert a.identity != b.identity
    assert EnvironmentIdentity.from_dict(a.identity.as_dict()) == a.identity
