"""The sandbox a fleet runs against, as its ``sandbox.json`` describes it (addresses, admin
token, operator identity), and how to find it for an environment. The fleet reads that file
and speaks HTTP and MQTT to the sandbox; it never imports sandbox code."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from iotref.device.onboarding.environment import Environment
from iotref.device.onboarding.next_steps import shell_word
from iotref.fleet.errors import FleetError


@dataclass(frozen=True)
class SandboxInfo:
    """What ``sandbox.json`` of a running sandbox says (the parts the fleet uses)."""

    data_dir: Path
    http_url: str
    admin_token: str
    mqtt_host: str
    mqtt_port: int
    platform_mqtt_port: int
    ca_file: Path
    operator_cert: Path
    operator_key: Path
    pid: int | None = None

    @classmethod
    def load(cls, path: Path) -> SandboxInfo:
        """Read ``sandbox.json``; :class:`FleetError` if it is unusable."""
        try:
            data = json.loads(path.read_text())
            return cls(
                data_dir=Path(data.get("data_dir") or path.parent),
                http_url=str(data["http_url"]).rstrip("/"),
                admin_token=str(data["admin_token"]),
                mqtt_host=str(data["mqtt_host"]),
                mqtt_port=int(data["mqtt_port"]),
                platform_mqtt_port=int(data["platform_mqtt_port"]),
                ca_file=Path(data["ca_file"]),
                operator_cert=Path(data["operator_cert"]),
                operator_key=Path(data["operator_key"]),
                pid=int(data["pid"]) if data.get("pid") else None,
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            start = f"iotref sandbox up --data-dir {shell_word(str(path.parent))}"
            raise FleetError(
                f"cannot use {path}: {exc}", f"is the sandbox running? ('{start}')"
            ) from None


def find_sandbox(
    env: Environment, env_file: Path | None = None, sandbox_dir: Path | None = None
) -> SandboxInfo | None:
    """The sandbox behind ``env``: ``sandbox_dir/sandbox.json`` if given, else the
    ``sandbox.json`` next to ``env_file``, else ``.sandbox/sandbox.json`` when its HTTP
    address is the environment's. ``None``: a real platform."""
    if sandbox_dir is not None:
        path = sandbox_dir / "sandbox.json"
        if not path.exists():
            raise FleetError(f"no sandbox.json in {sandbox_dir}", "start the sandbox first")
        return SandboxInfo.load(path)
    candidates = []
    if env_file is not None:
        candidates.append(env_file.parent / "sandbox.json")
    candidates.append(Path(".sandbox") / "sandbox.json")
    for path in candidates:
        if path.exists():
            info = SandboxInfo.load(path)
            if info.http_url.rstrip("/") == env.base_url.rstrip("/"):
                return info
    return None
