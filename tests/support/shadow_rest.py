"""A thing's shadow through the sandbox's REST API with the admin token, as an operator
reads and changes it: the document, desired state, and the ``sendTelemetryData`` switch."""

from __future__ import annotations

from typing import Any

from tests.support.sandbox_process import SandboxProcess


def shadow_document(sandbox: SandboxProcess, thing: str, name: str | None = None) -> Any:
    """The thing's classic (or ``name``d) shadow document."""
    with sandbox.admin_http() as http:
        answer = http.get(f"/things/{thing}/shadow", params={"name": name} if name else {})
    assert answer.status_code == 200, answer.text
    return answer.json()


def desired_state(sandbox: SandboxProcess, thing: str) -> dict[str, Any]:
    """The desired state of the thing's classic shadow (``{}`` when it has none)."""
    desired: dict[str, Any] = shadow_document(sandbox, thing)["state"].get("desired", {})
    return desired


def set_desired(sandbox: SandboxProcess, thing: str, desired: dict[str, Any]) -> None:
    """Update the desired state of the thing's classic shadow."""
    with sandbox.admin_http() as http:
        answer = http.post(f"/things/{thing}/shadow", json={"state": {"desired": desired}})
    assert answer.status_code == 200, answer.text


def set_permission(sandbox: SandboxProcess, thing: str, allowed: bool) -> None:
    """Switch ``sendTelemetryData`` in the thing's desired state."""
    set_desired(sandbox, thing, {"sendTelemetryData": allowed})
