"""Mosquitto's dynamic-security plugin as the sandbox uses it: the identities whose rights
differ from a thing's policy, and the commands that change them while Mosquitto runs.

Owns the plugin's JSON file in the broker dir, brought in line with the thing registry
before Mosquitto starts: the sandbox's services and the operator (every topic, shared
subscriptions, ``$SYS`` and the plugin's own ``$CONTROL`` topics) and every revoked thing
(a disabled client whose role denies everything). While Mosquitto runs, the plugin keeps
that file itself; :class:`DynsecControl` sends it commands over MQTT (revoking a thing
disconnects it at once). The things' own policies are in the ACL file
(:mod:`iotref.sandbox.broker.config`); Mosquitto asks this plugin first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiomqtt

from iotref.device.files import write_atomic
from iotref.sandbox.context import LOOPBACK
from iotref.sandbox.provisioning.certificate_authority import (
    OPERATOR_IDENTITY,
    PLATFORM_IDENTITY,
)

log = logging.getLogger(__name__)

PLUGIN_FILE = "mosquitto_dynamic_security.so"
PLUGIN_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib/arm-linux-gnueabihf",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
    "/opt/homebrew/lib",
)
CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
SERVICES_ROLE = "iotref-services"
REVOKED_ROLE = "iotref-revoked"
REVOKED_PRIORITY = 1000  # checked before any other role the client may have
PRIVILEGED_IDENTITIES = (PLATFORM_IDENTITY, OPERATOR_IDENTITY)
COMMAND_TIMEOUT = 30.0  # a reload of a large ACL file holds Mosquitto for a while

_ACL_TYPES = ("publishClientSend", "publishClientReceive", "subscribePattern", "unsubscribePattern")
_SUBSCRIBE_TYPES = ("subscribePattern", "unsubscribePattern")


class DynsecError(Exception):
    """The plugin refused a command or did not answer; the message says which."""


def find_plugin(configured: str | None = None) -> Path | None:
    """The plugin's shared object: ``configured`` if given, else the first one found in
    the usual library folders."""
    if configured:
        path = Path(configured)
        return path if path.is_file() else None
    for folder in PLUGIN_DIRS:
        path = Path(folder) / PLUGIN_FILE
        if path.is_file():
            return path
    return None


def _acl(acltype: str, topic: str, allow: bool) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "allow": allow}


def roles() -> list[dict[str, Any]]:
    """The sandbox's roles: everything for its services and the operator, nothing for a
    revoked thing."""
    services = [_acl(t, f, True) for t in _ACL_TYPES for f in ("#", "$aws/#", "$SYS/#")]
    services += [_acl(t, "$share/#", True) for t in _SUBSCRIBE_TYPES]
    services += [_acl(t, "$CONTROL/dynamic-security/#", True) for t in _ACL_TYPES]
    revoked = [
        _acl(t, f, False)
        for t in _ACL_TYPES
        for f in ("#", "$aws/#", "$SYS/#", "$share/#", "$CONTROL/#")
    ]
    return [
        {
            "rolename": SERVICES_ROLE,
            "textname": "the sandbox's services and the operator: every topic",
            "acls": services,
        },
        {
            "rolename": REVOKED_ROLE,
            "textname": "a revoked thing: nothing",
            "acls": revoked,
        },
    ]


def revoked_client(client_id: str) -> dict[str, Any]:
    return {
        "username": client_id,
        "textname": "revoked thing",
        "disabled": True,
        "roles": [{"rolename": REVOKED_ROLE, "priority": REVOKED_PRIORITY}],
    }


def reconcile(path: Path, revoked: Iterable[str]) -> None:
    """Bring the plugin's file in line with the registry (Mosquitto not running): the
    sandbox's roles as this version defines them, the privileged identities enabled with
    the services role, every revoked thing disabled with the revoked role. Other clients,
    groups and roles (an operator's own, made with ``mosquitto_ctrl``) are kept."""
    doc = _load(path)
    doc["defaultACLAccess"] = {
        "publishClientSend": False,
        "publishClientReceive": False,
        "subscribe": False,
        "unsubscribe": False,
    }
    ours = roles()
    names = {role["rolename"] for role in ours}
    doc["roles"] = [r for r in doc.get("roles", []) if r.get("rolename") not in names] + ours
    clients: dict[str, dict[str, Any]] = {}
    for client in doc.get("clients", []):
        if isinstance(client, dict) and isinstance(client.get("username"), str):
            clients[client["username"]] = client
    for identity in PRIVILEGED_IDENTITIES:
        client = clients.setdefault(identity, {"username": identity})
        client["disabled"] = False
        client["textname"] = "sandbox identity"
        kept = [r for r in client.get("roles", []) if r.get("rolename") != SERVICES_ROLE]
        client["roles"] = [*kept, {"rolename": SERVICES_ROLE}]
    for client_id in revoked:
        clients[client_id] = revoked_client(client_id)
    doc["clients"] = list(clients.values())
    doc.setdefault("groups", [])
    write_atomic(path, (json.dumps(doc, indent=1) + "\n").encode())


def _load(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        aside = path.with_name(f"{path.name}.broken-{int(time.time())}")
        with contextlib.suppress(OSError):
            os.replace(path, aside)
        log.warning("%s was unreadable (%s); set aside as %s, rebuilt", path, exc, aside.name)
        return {}
    return doc if isinstance(doc, dict) else {}


async def revoke(session: ControlSession, client_id: str) -> None:
    """Leave ``client_id`` a disabled client with the revoked role. Disabling disconnects
    every connection of that identity at once."""
    client = revoked_client(client_id)
    created, _disabled = await session.call(
        [
            {
                "command": "createClient",
                "username": client_id,
                "textname": client["textname"],
                "roles": client["roles"],
            },
            {"command": "disableClient", "username": client_id},
        ],
        tolerate=("client already exists",),
    )
    if not created.get("error"):
        return
    (found,) = await session.call([{"command": "getClient", "username": client_id}])
    data = found.get("data")
    held = data.get("client", {}).get("roles", []) if isinstance(data, dict) else []
    if not any(isinstance(r, dict) and r.get("rolename") == REVOKED_ROLE for r in held):
        # adding a role disconnects the client again
        await session.call(
            [
                {
                    "command": "addClientRole",
                    "username": client_id,
                    "rolename": REVOKED_ROLE,
                    "priority": REVOKED_PRIORITY,
                }
            ]
        )


async def barrier(session: ControlSession) -> None:
    """Return once Mosquitto has acted on a signal sent before this call (a SIGHUP's
    reload): the signal is pending before the first command's bytes exist, so it is
    handled, at the latest, in the loop turn that reads them, and the reload happens at the
    end of that turn; the second command is read in a later turn."""
    for _turn in range(2):
        await session.call([{"command": "getDefaultACLAccess"}])


class DynsecControl:
    """Sends commands to the plugin as the platform identity, over the platform listener."""

    def __init__(self, port: int, ca_file: Path, cert_file: Path, key_file: Path) -> None:
        self.port = port
        self.ca_file = ca_file
        self.cert_file = cert_file
        self.key_file = key_file

    def _tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.load_cert_chain(str(self.cert_file), str(self.key_file))
        return context

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[ControlSession]:
        """One connection for a few commands."""
        async with aiomqtt.Client(
            LOOPBACK,
            self.port,
            identifier=f"iotref-platform-control-{os.getpid()}-{uuid.uuid4().hex[:8]}",
            tls_context=self._tls(),
            keepalive=60,
            clean_session=True,
            timeout=COMMAND_TIMEOUT,
        ) as client:
            await client.subscribe(RESPONSE_TOPIC, qos=1)
            yield ControlSession(client)


class ControlSession:
    """An open connection to the plugin: :meth:`call` sends commands and waits for their
    answers."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client

    async def call(
        self, commands: list[dict[str, Any]], tolerate: tuple[str, ...] = ()
    ) -> list[dict[str, Any]]:
        """Send ``commands`` in one message; their responses, in order. Raises
        :class:`DynsecError` for a refused command, unless its error contains one of
        ``tolerate`` (lower case)."""
        tag = uuid.uuid4().hex
        tagged = [{**c, "correlationData": f"{tag}-{i}"} for i, c in enumerate(commands)]
        await self.client.publish(CONTROL_TOPIC, json.dumps({"commands": tagged}), qos=1)
        try:
            responses = await asyncio.wait_for(self._responses(tag), COMMAND_TIMEOUT)
        except asyncio.TimeoutError:  # on Python 3.10 not the builtin TimeoutError
            raise DynsecError(
                f"no answer from the dynamic-security plugin in {COMMAND_TIMEOUT:.0f} s"
            ) from None
        for response in responses:
            error = response.get("error")
            if error and not any(text in str(error).lower() for text in tolerate):
                raise DynsecError(f"dynamic-security {response.get('command')}: {error}")
        return responses

    async def _responses(self, tag: str) -> list[dict[str, Any]]:
        async for message in self.client.messages:
            try:
                doc = json.loads(bytes(message.payload))
            except (TypeError, ValueError):
                continue
            responses = doc.get("responses") if isinstance(doc, dict) else None
            if not isinstance(responses, list):
                continue
            mine = [
                r
                for r in responses
                if isinstance(r, dict) and str(r.get("correlationData", "")).startswith(tag)
            ]
            if mine:
                return mine
        raise DynsecError("the broker connection closed before the plugin answered")
