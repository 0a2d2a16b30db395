"""The dynamic-security plugin's file as the sandbox brings it in line before Mosquitto
starts: the sandbox's roles and identities, revoked things, what an operator added kept.
(The plugin itself, with Mosquitto, is exercised in test_broker_supervisor.)"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from iotref.sandbox.broker import dynamic_security as dynsec
from iotref.sandbox.provisioning.certificate_authority import OPERATOR_IDENTITY, PLATFORM_IDENTITY


def _read(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def _clients(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["username"]: c for c in doc["clients"]}


def test_new_file(tmp_path: Path) -> None:
    path = tmp_path / "dynamic-security.json"
    dynsec.reconcile(path, ["iotref-gone"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = _read(path)
    assert doc["defaultACLAccess"] == {
        "publishClientSend": False,
        "publishClientReceive": False,
        "subscribe": False,
        "unsubscribe": False,
    }
    clients = _clients(doc)
    for identity in (PLATFORM_IDENTITY, OPERATOR_IDENTITY):
        assert clients[identity]["disabled"] is False
        assert clients[identity]["roles"] == [{"rolename": dynsec.SERVICES_ROLE}]
        assert "password" not in clients[identity]  # certificates only
    assert clients["iotref-gone"]["disabled"] is True
    assert clients["iotref-gone"]["roles"] == [
        {"rolename": dynsec.REVOKED_ROLE, "priority": dynsec.REVOKED_PRIORITY}
    ]
    roles = {r["rolename"]: r for r in doc["roles"]}
    revoked = roles[dynsec.REVOKED_ROLE]["acls"]
    assert revoked and not any(acl["allow"] for acl in revoked)
    denied = {(acl["acltype"], acl["topic"]) for acl in revoked}
    for acltype in ("publishClientSend", "publishClientReceive", "subscribePattern"):
        for topic in ("#", "$aws/#", "$CONTROL/#"):
            assert (acltype, topic) in denied
    services = {(a["acltype"], a["topic"]) for a in roles[dynsec.SERVICES_ROLE]["acls"]}
    assert ("publishClientSend", "#") in services
    assert ("publishClientSend", "$aws/#") in services
    assert ("subscribePattern", "$share/#") in services
    assert ("publishClientSend", "$CONTROL/dynamic-security/#") in services
    assert ("publishClientSend", "$share/#") not in services


def test_existing_file_keeps_what_the_operator_added(tmp_path: Path) -> None:
    path = tmp_path / "dynamic-security.json"
    path.write_text(
        json.dumps(
            {
                "defaultACLAccess": {"publishClientSend": True},
                "clients": [
                    {"username": "watcher", "roles": [{"rolename": "read-only"}]},
                    {"username": OPERATOR_IDENTITY, "disabled": True, "roles": []},
                ],
                "groups": [{"groupname": "g"}],
                "roles": [
                    {"rolename": "read-only", "acls": []},
                    {"rolename": dynsec.SERVICES_ROLE, "acls": []},  # an older definition
                ],
            }
        )
    )
    dynsec.reconcile(path, [])
    doc = _read(path)
    clients = _clients(doc)
    assert clients["watcher"]["roles"] == [{"rolename": "read-only"}]
    assert clients[OPERATOR_IDENTITY]["disabled"] is False
    assert clients[OPERATOR_IDENTITY]["roles"] == [{"rolename": dynsec.SERVICES_ROLE}]
    assert doc["groups"] == [{"groupname": "g"}]
    roles = {r["rolename"]: r for r in doc["roles"]}
    assert set(roles) == {"read-only", dynsec.SERVICES_ROLE, dynsec.REVOKED_ROLE}
    assert roles[dynsec.SERVICES_ROLE]["acls"]  # this version's definition
    assert doc["defaultACLAccess"]["publishClientSend"] is False


def test_unreadable_file_is_set_aside_and_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "dynamic-security.json"
    path.write_text("{ half a file")
    dynsec.reconcile(path, ["iotref-gone"])
    assert _clients(_read(path))["iotref-gone"]["disabled"] is True
    aside = [p.name for p in tmp_path.iterdir() if p.name.startswith(f"{path.name}.broken-")]
    assert len(aside) == 1
    assert (tmp_path / aside[0]).read_text() == "{ half a file"


def test_plugin_is_found_or_named(tmp_path: Path) -> None:
    fake = tmp_path / dynsec.PLUGIN_FILE
    fake.write_bytes(b"")
    assert dynsec.find_plugin(str(fake)) == fake
    assert dynsec.find_plugin(str(tmp_path / "missing.so")) is None
