"""Onboarding through the device library against a running sandbox, as tests need it done
before what they test: the sandbox's environment, a machine, a login (auto-approve, or a
person deciding on the verification page), a provisioned certificate store, and what the
store's ``properties.json`` and outbox say."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import httpx

from iotref.device.blocking import BlockingOnboarding
from iotref.device.onboarding.directory_client import MachineSpec
from iotref.device.onboarding.environment import Environment, load_environment_file
from iotref.device.onboarding.provisioning import ProvisionOptions
from iotref.device.onboarding.service import LoginResult
from iotref.device.onboarding.token_store import TokenStore
from iotref.device.telemetry.outbox import OUTBOX_FILE_NAME, Outbox
from iotref.protocol.topics import telemetry_topic
from iotref.sandbox.broker.config import TELEMETRY_TOPIC
from iotref.sandbox.directory.seed import DEMO_EMAIL, DEMO_PASSWORD, FIRST_ORGANIZATION_ID
from tests.support.sandbox_process import SandboxProcess


def sandbox_env(sandbox: SandboxProcess) -> Environment:
    """The environment file the sandbox wrote."""
    return load_environment_file(Path(sandbox.info["env_file"]))


def machine_spec(label: str = "press") -> MachineSpec:
    """A new machine (a serial number of its own)."""
    return MachineSpec(f"Test {label}", "ACME Print", f"SN-{uuid.uuid4().hex[:12]}", "folder")


def login_with_auto_approve(env: Environment, tokens: TokenStore) -> LoginResult:
    """Log in on a sandbox that approves by itself."""
    with BlockingOnboarding(env, token_store=tokens) as onboarding:
        return onboarding.login()


def logged_in(sandbox: SandboxProcess, tokens_dir: Path) -> tuple[Environment, TokenStore]:
    """The environment of an auto-approving sandbox and a token store in ``tokens_dir``,
    logged in."""
    env = sandbox_env(sandbox)
    tokens = TokenStore(tokens_dir)
    login_with_auto_approve(env, tokens)
    return env, tokens


def provision_store(
    env: Environment, tokens: TokenStore, path: Path, name: str = "Test press"
) -> Path:
    """A complete certificate store at ``path`` for a new machine called ``name``."""
    spec = MachineSpec(name, "ACME Print", f"SN-{uuid.uuid4().hex[:12]}")
    with BlockingOnboarding(env, store_path=path, token_store=tokens) as onboarding:
        onboarding.provision(ProvisionOptions(machine=spec))
    return path


def decide_in_browser(sandbox: SandboxProcess, user_code: str, approve: bool) -> None:
    """What the person does on the verification page: sign in, check, approve or deny."""

    def csrf(page: httpx.Response) -> str:
        found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert found, page.text
        return found.group(1)

    with httpx.Client(base_url=sandbox.http_url, follow_redirects=True, timeout=10) as browser:
        page = browser.get("/oauth/device", params={"user_code": user_code})
        page = browser.post(
            "/oauth/device/sign_in",
            data={
                "csrf_token": csrf(page),
                "user_code": user_code,
                "email": DEMO_EMAIL,
                "password": DEMO_PASSWORD,
            },
        )
        assert user_code in page.text, page.text
        form = {
            "csrf_token": csrf(page),
            "user_code": user_code,
            "decision": "approve" if approve else "deny",
            "organization_id": FIRST_ORGANIZATION_ID,
        }
        page = browser.post("/oauth/device", data=form)
        assert ("Device connected" if approve else "Request denied") in page.text, page.text


def store_properties(store: Path) -> dict[str, Any]:
    """The store's ``properties.json``."""
    return dict(json.loads((store / "properties.json").read_text()))


def client_id_of(store: Path) -> str:
    return str(store_properties(store)["client_id"])


def machine_of(store: Path) -> str:
    return str(store_properties(store)["machine_id"])


def store_topic(store: Path) -> str:
    """The telemetry topic of the store's device."""
    properties = store_properties(store)
    return telemetry_topic(TELEMETRY_TOPIC, properties["org_id"], properties["client_id"])


def outbox_depth(store: Path) -> int:
    """How many messages wait in the store's outbox."""
    with Outbox(store / OUTBOX_FILE_NAME) as outbox:
        return outbox.depth
