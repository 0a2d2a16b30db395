"""Onboarding through the library against the real sandbox: login, provisioning, reuse,
renewal, every device-flow outcome, refresh rotation, interrupted runs, secrets in logs."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import stat
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from iotref.device.blocking import BlockingOnboarding
from iotref.device.errors import (
    AuthorizationDenied,
    AuthorizationExpired,
    LoginRequired,
    ProvisioningError,
)
from iotref.device.onboarding.certificate_store import (
    CERTIFICATE_FILE,
    PRIVATE_KEY_FILE,
    PROGRESS_FILE,
    PROPERTIES_FILE,
    PROPERTIES_KEYS,
    ROOT_CA_FILE,
    CertificateStore,
    ProgressState,
)
from iotref.device.onboarding.device_flow import DeviceAuthorization, PollEvent
from iotref.device.onboarding.environment import Environment
from iotref.device.onboarding.http_client import create_http_client
from iotref.device.onboarding.keys import KeyType
from iotref.device.onboarding.provisioning import (
    STEP_CERTIFICATE,
    STEP_MACHINE,
    STEP_OWNERSHIP,
    ProvisionOptions,
)
from iotref.device.onboarding.service import LoginResult, Onboarding
from iotref.device.onboarding.token_store import TokenStore
from iotref.sandbox.directory.seed import (
    FIRST_ORGANIZATION_ID,
    FIRST_SITE_ID,
)
from tests.conftest import SandboxFactory
from tests.support.onboarding import (
    decide_in_browser,
    login_with_auto_approve,
    machine_spec,
    sandbox_env,
)
from tests.support.sandbox_process import SandboxProcess

pytestmark = pytest.mark.integration


# -- helpers ----------------------------------------------------------------------------------


class NoNetwork(AssertionError):
    pass


def no_network_client() -> httpx.AsyncClient:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise NoNetwork(f"unexpected request {request.method} {request.url}")

    return create_http_client(transport=httpx.MockTransport(refuse))


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so nothing handles it."""


@pytest.fixture
def tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TokenStore:
    monkeypatch.setenv("IOTREF_HOME", str(tmp_path / "home"))
    return TokenStore(tmp_path / "home" / "tokens")


@pytest.fixture
def logged_in(sandbox: SandboxProcess, tokens: TokenStore) -> Environment:
    env = sandbox_env(sandbox)
    login_with_auto_approve(env, tokens)
    return env


# -- the whole flow ---------------------------------------------------------------------------


def test_login_provision_reuse_and_status(
    sandbox: SandboxProcess, tokens: TokenStore, tmp_path: Path
) -> None:
    env = sandbox_env(sandbox)
    result = login_with_auto_approve(env, tokens)
    assert result.bearer is not None
    assert (result.bearer.type, result.bearer.id) == ("Organization", FIRST_ORGANIZATION_ID)
    token_file = tokens.path_for(env)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700

    store_path = tmp_path / "certificate_store" / "local"
    spec = machine_spec()
    steps: list[str] = []
    with BlockingOnboarding(
        env, store_path=store_path, token_store=tokens, on_step=lambda s, _: steps.append(s)
    ) as onboarding:
        provisioned = onboarding.provision(ProvisionOptions(machine=spec))
        report = onboarding.check()
    assert provisioned.outcome == "provisioned"
    assert provisioned.machine_created
    assert steps == ["site", "machine", "ownership", "key", "configuration", "certificate", "store"]

    # The store: exactly the contract's files and keys, private modes.
    files = sorted(p.name for p in store_path.iterdir() if not p.name.startswith(".lock"))
    assert files == sorted(
        [ROOT_CA_FILE, PRIVATE_KEY_FILE, CERTIFICATE_FILE, PROPERTIES_FILE, PROGRESS_FILE]
    )
    properties = json.loads((store_path / PROPERTIES_FILE).read_text())
    assert list(properties) == list(PROPERTIES_KEYS)
    assert properties["site_id"] == FIRST_SITE_ID
    assert properties["org_id"] == FIRST_ORGANIZATION_ID
    assert properties["mqtt_port"] == sandbox.mqtt_port
    assert stat.S_IMODE(store_path.stat().st_mode) == 0o700
    assert stat.S_IMODE((store_path / PRIVATE_KEY_FILE).stat().st_mode) == 0o600

    # The certificate names the client id and is signed by the sandbox's device CA.
    cert = x509.load_pem_x509_certificate((store_path / CERTIFICATE_FILE).read_bytes())
    assert properties["client_id"] in cert.subject.rfc4514_string()
    device_ca = x509.load_pem_x509_certificate(
        (sandbox.data_dir / "ca" / "device-ca.pem").read_bytes()
    )
    cert.verify_directly_issued_by(device_ca)
    server_root = x509.load_pem_x509_certificate((store_path / ROOT_CA_FILE).read_bytes())
    assert server_root.subject != device_ca.subject

    # Status: everything fine, and honest about what it could check of the chain.
    assert report.ok, report.problems
    assert report.properties is not None
    assert report.properties.client_id == properties["client_id"]
    assert "broker checks" in report.chain

    # The machine and its ownership exist in the directory.
    with BlockingOnboarding(env, token_store=tokens) as onboarding:
        token = onboarding.access_token()
    with sandbox.http(headers={"Authorization": f"Bearer {token}"}) as http:
        machine = http.get(f"/api/v1/machines/{properties['machine_id']}").json()
        owner = http.get(f"/api/v1/machines/{properties['machine_id']}/machine_ownership")
    assert machine["serial_number"] == spec.serial_number
    assert owner.json()["organization_id"] == FIRST_ORGANIZATION_ID

    # The next run reuses the store and needs no network at all.
    async def again() -> str:
        async with Onboarding(
            env, store_path=store_path, token_store=tokens, http=no_network_client()
        ) as onboarding:
            return (await onboarding.provision(ProvisionOptions(machine=spec))).outcome

    assert asyncio.run(again()) == "reused"


def test_renew_gives_a_new_key_and_certificate_for_the_same_machine(
    logged_in: Environment, tokens: TokenStore, tmp_path: Path
) -> None:
    store = CertificateStore(tmp_path / "store")
    with BlockingOnboarding(logged_in, store_path=store.path, token_store=tokens) as onboarding:
        first = onboarding.provision(ProvisionOptions(machine=machine_spec()))
        old_key = store.file(PRIVATE_KEY_FILE).read_bytes()
        old_cert = store.file(CERTIFICATE_FILE).read_bytes()
        renewed = onboarding.provision(ProvisionOptions(renew=True, key_type=KeyType.RSA2048))
        report = onboarding.check()
    assert renewed.outcome == "renewed"
    assert not renewed.machine_created
    assert renewed.properties.machine_id == first.properties.machine_id
    assert renewed.properties.site_id == first.properties.site_id
    assert store.file(PRIVATE_KEY_FILE).read_bytes() != old_key
    assert store.file(CERTIFICATE_FILE).read_bytes() != old_cert
    assert report.ok, report.problems
    assert report.key == "RSA 2048"


@pytest.mark.parametrize("key_type", list(KeyType))
def test_every_key_type_is_accepted(
    logged_in: Environment, tokens: TokenStore, tmp_path: Path, key_type: KeyType
) -> None:
    with BlockingOnboarding(logged_in, store_path=tmp_path / "s", token_store=tokens) as ob:
        ob.provision(ProvisionOptions(machine=machine_spec(), key_type=key_type))
        report = ob.check()
    assert report.ok, report.problems


def test_site_by_name_and_unknown_site(
    logged_in: Environment, tokens: TokenStore, tmp_path: Path
) -> None:
    with BlockingOnboarding(logged_in, store_path=tmp_path / "a", token_store=tokens) as ob:
        result = ob.provision(ProvisionOptions(machine=machine_spec(), site="finishing hall"))
    assert result.properties.site_id != FIRST_SITE_ID
    with (
        BlockingOnboarding(logged_in, store_path=tmp_path / "b", token_store=tokens) as ob,
        pytest.raises(ProvisioningError, match="no single site 'Nowhere'") as info,
    ):
        ob.provision(ProvisionOptions(machine=machine_spec(), site="Nowhere"))
    assert "Main Plant" in str(info.value)


# -- device-flow outcomes ---------------------------------------------------------------------


async def _login_deciding(
    sb: SandboxProcess,
    onboarding: Onboarding,
    approve: bool | None,
    events: list[PollEvent],
    after_events: int = 1,
) -> LoginResult:
    """Log in; once ``after_events`` polls were unsuccessful the person decides (None:
    never)."""
    shown: list[DeviceAuthorization] = []
    decided = False

    def on_poll(event: PollEvent) -> None:
        nonlocal decided
        events.append(event)
        if approve is not None and not decided and len(events) >= after_events:
            decided = True
            decide_in_browser(sb, shown[0].user_code, approve)

    return await onboarding.login(shown.append, on_poll)


def test_pending_until_the_person_approves(
    sandbox_factory: SandboxFactory, tokens: TokenStore
) -> None:
    sb = sandbox_factory("--poll-interval", "1")
    events: list[PollEvent] = []

    async def run() -> LoginResult:
        async with Onboarding(sandbox_env(sb), token_store=tokens) as onboarding:
            return await _login_deciding(sb, onboarding, True, events, after_events=2)

    result = asyncio.run(run())
    assert [e.outcome for e in events] == ["pending", "pending"]
    assert result.bearer is not None
    assert result.bearer.id == FIRST_ORGANIZATION_ID
    assert tokens.load(sandbox_env(sb)) is not None


def test_slow_down_grows_the_interval_by_five_seconds(
    sandbox_factory: SandboxFactory, tokens: TokenStore
) -> None:
    sb = sandbox_factory("--poll-interval", "1")
    requested: list[float] = []

    async def impatient_then_obedient(seconds: float) -> None:
        # The first two polls come too early: the directory answers slow_down.
        requested.append(seconds)
        await asyncio.sleep(0 if len(requested) <= 2 else seconds)

    events: list[PollEvent] = []

    async def run() -> LoginResult:
        async with Onboarding(
            sandbox_env(sb), token_store=tokens, sleep=impatient_then_obedient
        ) as onboarding:
            return await _login_deciding(sb, onboarding, True, events, after_events=2)

    asyncio.run(run())
    assert [(e.outcome, e.interval) for e in events] == [("pending", 1), ("slow_down", 6)]
    assert requested == [1, 1, 6]


def test_denied(sandbox_factory: SandboxFactory, tokens: TokenStore) -> None:
    sb = sandbox_factory("--poll-interval", "1")
    events: list[PollEvent] = []

    async def run() -> LoginResult:
        async with Onboarding(sandbox_env(sb), token_store=tokens) as onboarding:
            return await _login_deciding(sb, onboarding, False, events)

    with pytest.raises(AuthorizationDenied) as info:
        asyncio.run(run())
    assert "denied" in info.value.one_line()
    assert tokens.load(sandbox_env(sb)) is None


def test_expired(sandbox_factory: SandboxFactory, tokens: TokenStore) -> None:
    sb = sandbox_factory("--poll-interval", "1", "--device-code-ttl", "2")
    events: list[PollEvent] = []

    async def run() -> LoginResult:
        async with Onboarding(sandbox_env(sb), token_store=tokens) as onboarding:
            return await _login_deciding(sb, onboarding, None, events)

    with pytest.raises(AuthorizationExpired, match="expired"):
        asyncio.run(run())
    assert events
    assert {e.outcome for e in events} == {"pending"}


def test_refresh_rotates_and_a_spent_refresh_token_is_refused(
    sandbox_factory: SandboxFactory, tokens: TokenStore, tmp_path: Path
) -> None:
    sb = sandbox_factory("--auto-approve", "--poll-interval", "0", "--access-token-ttl", "1")
    env = sandbox_env(sb)
    login_with_auto_approve(env, tokens)
    before = tokens.load(env)
    assert before is not None
    saved_file = tokens.path_for(env).read_bytes()

    # Provisioning needs a valid access token: the expired one is refreshed, and the
    # rotated pair is saved.
    with BlockingOnboarding(env, store_path=tmp_path / "s", token_store=tokens) as ob:
        ob.provision(ProvisionOptions(machine=machine_spec()))
    after = tokens.load(env)
    assert after is not None
    assert after.refresh_token != before.refresh_token
    assert after.access_token != before.access_token

    # The old refresh token works once only: the directory refuses it now ...
    with sb.http() as http:
        answer = http.post(
            "/oauth/access_token",
            data={
                "client_id": env.client_id,
                "grant_type": "refresh_token",
                "refresh_token": before.refresh_token,
            },
        )
    assert answer.status_code == 400
    assert answer.json()["error"] == "invalid_grant"

    # ... and a device left with it (say, a restored backup) is told to log in again.
    tokens.path_for(env).write_bytes(saved_file)
    with (
        BlockingOnboarding(env, token_store=tokens) as ob,
        pytest.raises(LoginRequired, match="no longer valid") as info,
    ):
        ob.access_token()
    assert "iotref login --env-file" in (info.value.next_step or "")


def test_provision_without_login(
    sandbox: SandboxProcess, tokens: TokenStore, tmp_path: Path
) -> None:
    async def run() -> None:
        async with Onboarding(
            sandbox_env(sandbox),
            store_path=tmp_path / "s",
            token_store=tokens,
            http=no_network_client(),
        ) as onboarding:
            await onboarding.provision(ProvisionOptions(machine=machine_spec()))

    with pytest.raises(LoginRequired, match="not logged in"):
        asyncio.run(run())


# -- interrupted provisioning -----------------------------------------------------------------


@pytest.mark.parametrize("crash_after", [STEP_MACHINE, STEP_OWNERSHIP, STEP_CERTIFICATE])
def test_interrupted_provisioning_resumes_with_the_same_machine(
    logged_in: Environment, tokens: TokenStore, tmp_path: Path, crash_after: str
) -> None:
    store = CertificateStore(tmp_path / "store")
    spec = machine_spec()

    def crash(step: str, _: str) -> None:
        if step == crash_after:
            raise Crash(step)

    with (
        BlockingOnboarding(
            logged_in, store_path=store.path, token_store=tokens, on_step=crash
        ) as ob,
        pytest.raises(Crash),
    ):
        ob.provision(ProvisionOptions(machine=spec))
    progress = store.read_progress()
    assert progress is not None
    assert progress.machine_id is not None
    assert progress.state is not ProgressState.PROVISIONED
    assert not store.file(CERTIFICATE_FILE).exists()

    with BlockingOnboarding(logged_in, store_path=store.path, token_store=tokens) as ob:
        status_before = ob.check()
        result = ob.provision(ProvisionOptions(machine=spec))
        report = ob.check()
    assert [p.code for p in status_before.problems] == ["incomplete"]
    assert result.outcome == "resumed"
    assert not result.machine_created
    assert result.properties.machine_id == progress.machine_id
    assert report.ok, report.problems

    # No second machine: the serial number is still free for exactly one, and that one
    # is the store's.
    with BlockingOnboarding(logged_in, token_store=tokens) as ob:
        token = ob.access_token()
    with httpx.Client(base_url=logged_in.directory_host, timeout=10) as http:
        duplicate = http.post(
            "/api/v1/machines",
            params={
                "machine[name]": spec.name,
                "machine[manufacturer]": spec.manufacturer,
                "machine[serial_number]": spec.serial_number,
            },
            headers={"Authorization": f"Bearer {token}"},
        )
    assert duplicate.status_code == 422


def test_crash_right_after_creating_the_machine_needs_its_id(
    logged_in: Environment, tokens: TokenStore, tmp_path: Path
) -> None:
    """The directory created the machine, but the process died before recording its id:
    the next run says so instead of failing obscurely, and --machine-id continues."""
    store = CertificateStore(tmp_path / "store")
    spec = machine_spec()

    def die_during_creation(step: str, _: str) -> None:
        if step == STEP_MACHINE:
            progress = store.read_progress()
            assert progress is not None
            # Rewind the record to "request sent, answer never recorded".
            store.write_progress(
                progress.advanced(ProgressState.MACHINE_REQUESTED, machine_id=None)
            )
            raise Crash(step)

    with (
        BlockingOnboarding(
            logged_in, store_path=store.path, token_store=tokens, on_step=die_during_creation
        ) as ob,
        pytest.raises(Crash),
    ):
        ob.provision(ProvisionOptions(machine=spec))
    # The process died after the machine's id was known to the directory only.
    with BlockingOnboarding(logged_in, store_path=store.path, token_store=tokens) as ob:
        with pytest.raises(ProvisioningError, match="may already have created") as info:
            ob.provision(ProvisionOptions(machine=spec))
        assert "--machine-id" in (info.value.next_step or "")
        token = ob.access_token()
    with httpx.Client(base_url=logged_in.directory_host, timeout=10) as http:
        created = http.post(
            "/api/v1/machines",
            params={
                "machine[name]": spec.name,
                "machine[manufacturer]": spec.manufacturer,
                "machine[serial_number]": spec.serial_number + "-2",
            },
            headers={"Authorization": f"Bearer {token}"},
        ).json()
    with BlockingOnboarding(logged_in, store_path=store.path, token_store=tokens) as ob:
        result = ob.provision(ProvisionOptions(machine_id=created["id"]))
    assert result.properties.machine_id == created["id"]
    assert not result.machine_created


def test_store_of_another_environment_is_refused(
    logged_in: Environment, tokens: TokenStore, tmp_path: Path
) -> None:
    store_path = tmp_path / "store"
    with BlockingOnboarding(logged_in, store_path=store_path, token_store=tokens) as ob:
        ob.provision(ProvisionOptions(machine=machine_spec()))
    other = Environment(
        "local",
        "http://127.0.0.1:9",
        "http://127.0.0.1:9",
        logged_in.client_id,
        logged_in.scope,
        source="elsewhere",
    )

    async def run() -> None:
        async with Onboarding(
            other, store_path=store_path, token_store=tokens, http=no_network_client()
        ) as onboarding:
            await onboarding.provision()

    from iotref.device.errors import StoreError

    with pytest.raises(StoreError, match=r"belongs to local at .*\(the endpoint differs\)") as info:
        asyncio.run(run())
    assert "--store" in (info.value.next_step or "")


# -- secrets ----------------------------------------------------------------------------------


def test_no_secret_in_debug_logs(
    sandbox_factory: SandboxFactory,
    tokens: TokenStore,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    sb = sandbox_factory("--auto-approve", "--poll-interval", "0", "--access-token-ttl", "1")
    env = sandbox_env(sb)
    secrets: list[str] = []
    login_with_auto_approve(env, tokens)
    first = tokens.load(env)
    assert first is not None
    secrets += [first.access_token, first.refresh_token]
    store_path = tmp_path / "store"
    with BlockingOnboarding(env, store_path=store_path, token_store=tokens) as ob:
        ob.provision(ProvisionOptions(machine=machine_spec()))  # refreshes on the way
        ob.provision(ProvisionOptions(renew=True))
    second = tokens.load(env)
    assert second is not None
    secrets += [second.access_token, second.refresh_token]
    key_pem = (store_path / PRIVATE_KEY_FILE).read_text()
    key_body = "".join(key_pem.strip().splitlines()[1:-1])
    text = caplog.text
    assert "iotref.http" in text  # the requests were logged ...
    assert "httpcore" in text
    for secret in secrets:  # ... without a secret
        assert secret not in text
    assert key_body[:40] not in text
    assert "PRIVATE KEY" not in text
    # The device codes the directory handed out are not in the logs either.
    device_codes = re.findall(r"device_code=([^&\s'\"]+)", text)
    assert device_codes
    assert set(device_codes) == {"[redacted]"}
