"""Shadow sync against the real sandbox: the operator changes desired state over the REST
API, the device applies it and reports; changes made while the device is offline (network
cut, broker killed) are applied after it reconnects; clientToken correlation; rejected
requests surface with their code and message; named shadows."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import httpx
import pytest

from iotref.device.connection.connection import Connection
from iotref.device.connection.state import ConnectionEvent, ConnectionState
from iotref.device.shadow.desired import DesiredChange, Refuse
from iotref.device.shadow.errors import ShadowRejected
from iotref.device.shadow.requests import ShadowClient
from iotref.device.shadow.sync import ShadowSync
from tests.support.device_connection import QUICK_RETRY, device_settings
from tests.support.fault_proxy import FaultProxy
from tests.support.sandbox_process import SandboxProcess
from tests.support.tokens import provision_device
from tests.support.waiting import wait_state

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Operator:
    """The sandbox's shadow REST API with the admin token."""

    def __init__(self, sandbox: SandboxProcess, thing: str) -> None:
        self.thing = thing
        self.http = httpx.AsyncClient(
            base_url=sandbox.http_url,
            headers=sandbox.admin_headers,
            timeout=10,
        )

    async def update(self, state: dict[str, Any], name: str | None = None) -> dict[str, Any]:
        params = {"name": name} if name else {}
        r = await self.http.post(
            f"/things/{self.thing}/shadow", json={"state": state}, params=params
        )
        assert r.status_code == 200, r.text
        return dict(r.json())

    async def get(self, name: str | None = None) -> dict[str, Any]:
        params = {"name": name} if name else {}
        r = await self.http.get(f"/things/{self.thing}/shadow", params=params)
        assert r.status_code == 200, r.text
        return dict(r.json())

    async def wait_reported(
        self, key: str, value: Any, name: str | None = None, timeout: float = 15
    ) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            doc = await self.get(name)
            if doc["state"].get("reported", {}).get(key) == value:
                return doc
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"reported.{key} != {value!r}: {doc['state']}")
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        await self.http.aclose()


async def test_operator_change_is_applied_and_reported(sandbox: SandboxProcess) -> None:
    dev = provision_device(sandbox)
    op = Operator(sandbox, dev.client_id)
    try:
        async with (
            Connection(device_settings(sandbox.info, dev, QUICK_RETRY)) as conn,
            ShadowSync(conn, dev.client_id) as sync,
        ):
            # provisioning set desired.sendTelemetryData; the first sync reported it
            assert sync.send_telemetry_allowed
            await op.wait_reported("sendTelemetryData", True)
            await op.update({"desired": {"speed": 120, "job": {"id": "J1", "copies": 500}}})
            assert await sync.wait_for("speed", 120, timeout=10) == 120
            doc = await op.wait_reported("speed", 120)
            assert doc["state"]["reported"]["job"] == {"id": "J1", "copies": 500}
            assert "delta" not in doc["state"]
            # a local change is reported
            sync.set_reported("counter", 42)
            await sync.flush(10)
            await op.wait_reported("counter", 42)
            # the telemetry permission follows the shadow
            await op.update({"desired": {"sendTelemetryData": False}})
            await sync.wait_for("sendTelemetryData", False, timeout=10)
            assert not sync.send_telemetry_allowed
    finally:
        await op.close()


async def test_adjusted_and_refused_changes(sandbox: SandboxProcess) -> None:
    dev = provision_device(sandbox)
    op = Operator(sandbox, dev.client_id)
    try:
        async with Connection(device_settings(sandbox.info, dev, QUICK_RETRY)) as conn:
            sync = ShadowSync(conn, dev.client_id, initial_reported={"mode": "idle"})
            sync.on_desired("speed", lambda c: min(c.value, 100))
            sync.on_desired("mode", lambda c: Refuse("service door open"))
            async with sync:
                await op.update({"desired": {"speed": 250, "mode": "run"}})
                await sync.wait_for("speed", 100, timeout=10)
                await sync.flush(10)
                doc = await op.wait_reported("speed", 100)
                await asyncio.sleep(0.3)  # no ping-pong of deltas and reports
                again = await op.get()
                assert again["version"] == doc["version"]
                assert again["state"]["reported"]["mode"] == "idle"
                assert again["state"]["delta"] == {"speed": 250, "mode": "run"}
    finally:
        await op.close()


async def test_desired_change_while_offline_is_applied_after_reconnect(
    sandbox: SandboxProcess,
) -> None:
    dev = provision_device(sandbox)
    op = Operator(sandbox, dev.client_id)
    link = FaultProxy(sandbox.mqtt_port).start()
    events: list[ConnectionEvent] = []
    try:
        s = device_settings(
            sandbox.info, dev, QUICK_RETRY, port=link.port, keepalive_s=5, ping_timeout_s=2
        )
        async with (
            Connection(s, on_event=events.append) as conn,
            ShadowSync(conn, dev.client_id) as sync,
        ):
            n = len(events)
            link.refuse()  # the network is gone: open connections cut, new ones refused
            link.cut()
            await wait_state(events, ConnectionState.DISCONNECTED, n)
            await op.update({"desired": {"speed": 77}})
            sync.set_reported("temperature", 41)  # changed locally while offline
            await asyncio.sleep(0.5)
            assert "speed" not in sync.reported
            link.admit()
            assert await sync.wait_for("speed", 77, timeout=30) == 77
            await op.wait_reported("speed", 77)
            await op.wait_reported("temperature", 41)
            assert sync.syncs >= 2
    finally:
        link.close()
        await op.close()


async def test_broker_killed_device_reconnects_resubscribes_and_reconciles(
    sandbox: SandboxProcess,
) -> None:
    dev = provision_device(sandbox)
    op = Operator(sandbox, dev.client_id)
    events: list[ConnectionEvent] = []
    try:
        async with (
            Connection(
                device_settings(sandbox.info, dev, QUICK_RETRY), on_event=events.append
            ) as conn,
            ShadowSync(conn, dev.client_id) as sync,
        ):
            n = len(events)
            sandbox.mosquitto().send_signal(signal.SIGKILL)
            await wait_state(events, ConnectionState.DISCONNECTED, n)
            await op.update({"desired": {"speed": 5}})  # the device cannot hear this
            await wait_state(events, ConnectionState.CONNECTED, n, timeout=60)
            assert await sync.wait_for("speed", 5, timeout=30) == 5  # the fresh get
            await op.wait_reported("speed", 5)
            # deltas arrive again: the subscriptions were renewed
            await op.update({"desired": {"speed": 6}})
            assert await sync.wait_for("speed", 6, timeout=15) == 6
            await op.wait_reported("speed", 6)
    finally:
        await op.close()


async def test_client_token_correlation_and_rejections(sandbox: SandboxProcess) -> None:
    dev = provision_device(sandbox)
    async with Connection(device_settings(sandbox.info, dev, QUICK_RETRY)) as conn:
        client = ShadowClient(conn, dev.client_id)
        # As many at once as AWS IoT keeps in flight per thing (more are answered 429).
        answers = await asyncio.gather(
            *(client.update({"reported": {"n": i}}) for i in range(9)), client.get()
        )
        tokens = [a["clientToken"] for a in answers]
        assert len(set(tokens)) == 10
        for i, a in enumerate(answers[:9]):
            assert a["state"] == {"reported": {"n": i}}
        current = await client.get()
        with pytest.raises(ShadowRejected) as conflict:
            await client.update({"reported": {"n": -1}}, version=current["version"] - 1)
        assert (conflict.value.code, conflict.value.message) == (409, "Version conflict")
        deep: dict[str, Any] = {"x": 1}
        for _ in range(7):
            deep = {"a": deep}
        with pytest.raises(ShadowRejected) as too_deep:
            await client.update({"reported": deep})
        assert too_deep.value.code == 400 and "nesting" in too_deep.value.message
        with pytest.raises(ShadowRejected) as missing:
            await ShadowClient(conn, dev.client_id, "nothing-here").get()
        assert missing.value.code == 404
        deleted = await client.delete()
        assert deleted["version"] >= current["version"]


async def test_named_shadow_sync(sandbox: SandboxProcess) -> None:
    dev = provision_device(sandbox)
    op = Operator(sandbox, dev.client_id)
    seen: list[DesiredChange] = []
    try:
        async with Connection(device_settings(sandbox.info, dev, QUICK_RETRY)) as conn:
            named = ShadowSync(conn, dev.client_id, "press-config")
            named.on_desired(lambda c: seen.append(c))
            async with named, ShadowSync(conn, dev.client_id) as classic:
                await op.update({"desired": {"ink": "cyan"}}, name="press-config")
                assert await named.wait_for("ink", "cyan", timeout=10) == "cyan"
                await op.wait_reported("ink", "cyan", name="press-config")
                assert "ink" not in classic.reported
                assert seen[-1].key is None and seen[-1].value == {"ink": "cyan"}
    finally:
        await op.close()
