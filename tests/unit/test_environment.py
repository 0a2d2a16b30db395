"""Environments: the shipped files carry the contract's values; URLs are checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from iotref.device.errors import ConfigurationError
from iotref.device.onboarding.environment import (
    EnvironmentIdentity,
    check_service_url,
    environment_name_for_file,
    is_loopback_host,
    load_environment,
    load_environment_file,
    resolve_environment,
    with_sandbox_id,
)
from iotref.protocol.environment_file import DEFAULT_SCOPE

SCOPE = "Org.prinect.onprem.rw,Org.directory.machines.rw,Org.directory.organization.r"


@pytest.mark.parametrize(
    ("name", "base_url", "directory_host", "client_id"),
    [
        pytest.param(
            "test",
            "https://cfg.iot.stg.connectprint.cloud",
            "https://directory.sandbox.zaikio.com",
            "600b71b7-b4cf-44ac-8c00-92283d50f9a5",
            id="test",
        ),
        pytest.param(
            "live",
            "https://cfg.iot.connectprint.cloud",
            "https://directory.heidelberg.cloud",
            "3c6221cd-9b4d-4037-99f7-a76b74dc0be0",
            id="live",
        ),
    ],
)
def test_shipped_environment_has_the_contract_values(
    name: str, base_url: str, directory_host: str, client_id: str
) -> None:
    env = load_environment(name)
    assert env.base_url == base_url
    assert env.directory_host == directory_host
    assert env.client_id == client_id
    assert env.scope == SCOPE
    assert env.scopes == tuple(SCOPE.split(","))


def test_local_environment_points_at_the_default_sandbox() -> None:
    from iotref.sandbox.directory.seed import OAUTH_CLIENT_ID

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


def test_a_sandbox_environment_file_carries_the_sandbox_id(tmp_path: Path) -> None:
    env = load_environment_file(_write_env(tmp_path / "env.local", SANDBOX_ID="0a1b2c3d4e5f6071"))
    assert env.sandbox_id == "0a1b2c3d4e5f6071"
    assert env.identity == EnvironmentIdentity(
        "local", "https://dir.example.com", "0a1b2c3d4e5f6071"
    )
    assert EnvironmentIdentity.from_dict(env.identity.as_dict()) == env.identity
    assert env.identity.as_dict()["sandbox_id"] == "0a1b2c3d4e5f6071"
    # Files without the key (test, live, hand-written ones) have no sandbox id.
    assert load_environment("test").sandbox_id is None
    assert "sandbox_id" not in load_environment("test").identity.as_dict()
    with pytest.raises(ConfigurationError, match="SANDBOX_ID .* is not usable"):
        load_environment_file(_write_env(tmp_path / "env.bad", SANDBOX_ID="has spaces in it"))


def test_another_sandbox_at_the_same_address_is_another_environment() -> None:
    old = EnvironmentIdentity("local", "http://127.0.0.1:8780", "aaaa")
    new = EnvironmentIdentity("local", "http://127.0.0.1:8780", "bbbb")
    unknown = EnvironmentIdentity("local", "http://127.0.0.1:8780")
    assert old.matches(old)
    assert not old.matches(new) and not new.matches(old)
    # An id that is not known (--env local while no sandbox answers) is not compared.
    assert old.matches(unknown) and unknown.matches(new)
    assert not old.matches(EnvironmentIdentity("local", "http://127.0.0.1:9", "aaaa"))

    assert old.difference(old) == ""
    assert old.difference(new) == (
        "the sandbox aaaa at http://127.0.0.1:8780, not the one there now, bbbb "
        "(another sandbox: a new data dir on the same address)"
    )
    moved = EnvironmentIdentity("local", "http://127.0.0.1:46281", "aaaa")
    assert moved.difference(old) == (
        "local at http://127.0.0.1:46281, not local at http://127.0.0.1:8780 (the endpoint differs)"
    )
    test = EnvironmentIdentity("test", "https://directory.sandbox.zaikio.com")
    assert test.difference(old) == (
        "environment test (https://directory.sandbox.zaikio.com), not local "
        "(http://127.0.0.1:8780) (another environment)"
    )


def test_with_sandbox_id_ties_an_environment_to_one_sandbox() -> None:
    local = load_environment("local")
    tied = with_sandbox_id(local, "c0ffee00c0ffee00")
    assert tied.sandbox_id == "c0ffee00c0ffee00"
    assert tied.identity.sandbox_id == "c0ffee00c0ffee00"
    assert (tied.base_url, tied.directory_host, tied.source) == (
        local.base_url,
        local.directory_host,
        "built-in",
    )
    assert with_sandbox_id(local, None) is local
    assert with_sandbox_id(local, "not an id!") is local


def test_an_environment_file_may_set_the_platforms_quotas(tmp_path: Path) -> None:
    env = load_environment_file(
        _write_env(tmp_path / "env.plant", PUBLISH_RATE_LIMIT="50", THROUGHPUT_LIMIT="65536")
    )
    assert (env.publish_rate_limit, env.throughput_limit) == (50.0, 65536)
    assert env.client_limits() == {"publish_rate_limit": 50.0, "throughput_limit": 65536}
    off = load_environment_file(_write_env(tmp_path / "env.off", PUBLISH_RATE_LIMIT="0"))
    assert off.client_limits() == {"publish_rate_limit": None}  # not paced
    # Not given (the shipped files, most hand-written ones): the client's defaults.
    for env in (load_environment("live"), load_environment_file(_write_env(tmp_path / "env.x"))):
        assert env.publish_rate_limit is None and env.client_limits() == {}
    for key, value in (
        ("PUBLISH_RATE_LIMIT", "fast"),
        ("PUBLISH_RATE_LIMIT", "-1"),
        ("PUBLISH_RATE_LIMIT", "inf"),
        ("THROUGHPUT_LIMIT", "1.5"),
    ):
        with pytest.raises(ConfigurationError, match=f"{key} in .* is not usable") as info:
            load_environment_file(_write_env(tmp_path / "env.bad", **{key: value}))
        assert (
            info.value.next_step is not None and "0 to send without pacing" in info.value.next_step
        )
