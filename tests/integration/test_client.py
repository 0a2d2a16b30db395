"""The client facade against the real sandbox, with a certificate store made by the
onboarding library and an independent subscriber (paho, the sandbox operator's identity)
that records what arrives.

- :class:`AsyncClient` end to end: connect, shadow synced with ``sendTelemetryData`` true,
  N status messages arrive valid on the device's telemetry topic, outbox empty after.
- :class:`Client` (blocking) the same, sending from several threads, plus shadow reports
  and a named shadow.
- Every way to send (``send``, ``send_many``, ``send_message``, ``send_messages``, an asset
  channel's ``send`` and ``send_many``), async and blocking: each message arrives once.
- Permission switched off through the shadow REST API: nothing arrives, the stats show
  the messages held; on again: they arrive. Closed while held: they stay in the outbox and
  the next client publishes them.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from iotref.device.blocking import BlockingOnboarding, Client
from iotref.device.client import AsyncClient
from iotref.device.connection.state import ConnectionState
from iotref.device.errors import InvalidMessageError
from iotref.device.onboarding.directory_client import MachineSpec
from iotref.device.onboarding.environment import Environment, load_environment_file
from iotref.device.onboarding.provisioning import ProvisionOptions
from iotref.device.onboarding.token_store import TokenStore
from iotref.device.telemetry.messages import (
    Asset,
    AssetType,
    DeviceStatusV2,
    Sender,
    SenderType,
    StatusV2,
    build_message,
)
from iotref.device.telemetry.outbox import OUTBOX_FILE_NAME, Outbox
from iotref.device.telemetry.results import SendStatus
from iotref.protocol.message_schemas import MessageValidator
from iotref.sandbox.broker.config import TELEMETRY_TOPIC
from tests.support.sandbox_process import SandboxProcess

pytestmark = pytest.mark.integration

SENDER = Sender(SenderType.PRESS, "client-test", "1.0")
VALIDATOR = MessageValidator(strict=True)


# --------------------------------------------------------------------------- store


@pytest.fixture(scope="module")
def onboarding_env(
    sandbox: SandboxProcess, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Environment, TokenStore]:
    """The sandbox's environment and a token store, logged in once (auto-approve)."""
    env = load_environment_file(Path(sandbox.info["env_file"]))
    tokens = TokenStore(tmp_path_factory.mktemp("client-home") / "tokens")
    with BlockingOnboarding(env, token_store=tokens) as onboarding:
        onboarding.login()
    return env, tokens


def provision_store(env: Environment, tokens: TokenStore, path: Path) -> Path:
    """A complete certificate store for a new machine, made by the onboarding library."""
    spec = MachineSpec("Client test press", "ACME Print", f"SN-{uuid.uuid4().hex[:12]}")
    with BlockingOnboarding(env, store_path=path, token_store=tokens) as onboarding:
        onboarding.provision(ProvisionOptions(machine=spec))
    return path


@pytest.fixture
def store(onboarding_env: tuple[Environment, TokenStore], tmp_path: Path) -> Path:
    return provision_store(*onboarding_env, tmp_path / "store")


def client_id_of(store: Path) -> str:
    return str(json.loads((store / "properties.json").read_text())["client_id"])


# --------------------------------------------------------------------------- subscriber


class Subscriber:
    """An independent subscriber with the sandbox operator's identity: records every
    telemetry message (topic, parsed JSON)."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"client-test-{uuid.uuid4().hex[:10]}",
            protocol=paho.MQTTv311,
        )
        context = ssl.create_default_context(cafile=info["ca_file"])
        context.load_cert_chain(info["operator_cert"], info["operator_key"])
        client.tls_set_context(context)
        client.on_connect = lambda c, *_: c.subscribe(f"{TELEMETRY_TOPIC}/#", qos=1)
        client.on_subscribe = lambda *_: self._subscribed.set()
        client.on_message = self._on_message
        self.client = client
        client.connect(info["mqtt_host"], int(info["mqtt_port"]), keepalive=10)
        client.loop_start()
        assert self._subscribed.wait(20), "subscriber not subscribed"

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, json.loads(msg.payload)))

    def of(self, asset_id: str) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            return [(t, m) for t, m in self.messages if m.get("assetid") == asset_id]

    def counters(self, asset_id: str) -> list[int]:
        return [counter_of(m) for _, m in self.of(asset_id)]

    def wait_for(self, asset_id: str, expected: set[int], timeout: float = 20) -> list[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.counters(asset_id)
            if expected <= set(got):
                return got
            time.sleep(0.05)
        missing = sorted(expected - set(self.counters(asset_id)))
        raise AssertionError(f"{len(missing)} never arrived, e.g. {missing[:20]}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def subscriber(sandbox: SandboxProcess) -> Iterator[Subscriber]:
    s = Subscriber(sandbox.info)
    yield s
    s.close()


def counter_of(message: dict[str, Any]) -> int:
    return int(message["payload"]["signalstatus"]["deviceinfo"]["totalproductioncounter"])


def status(n: int) -> StatusV2:
    return StatusV2(
        status=DeviceStatusV2.PRODUCTION, speed=9000, totalproductioncounter=n, statusdetails="ok"
    )


def set_permission(sandbox: SandboxProcess, thing: str, allowed: bool) -> None:
    answer = httpx.post(
        f"{sandbox.http_url}/things/{thing}/shadow",
        json={"state": {"desired": {"sendTelemetryData": allowed}}},
        headers={"Authorization": f"Bearer {sandbox.admin_token}"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text


def shadow_document(sandbox: SandboxProcess, thing: str, name: str | None = None) -> Any:
    answer = httpx.get(
        f"{sandbox.http_url}/things/{thing}/shadow",
        params={"name": name} if name else {},
        headers={"Authorization": f"Bearer {sandbox.admin_token}"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def outbox_depth(store: Path) -> int:
    with Outbox(store / OUTBOX_FILE_NAME) as outbox:
        return outbox.depth


def check_arrived(
    subscriber: Subscriber, client_topic: str, asset_id: str, expected: set[int]
) -> None:
    got = subscriber.wait_for(asset_id, expected)
    assert set(got) == expected
    for topic, message in subscriber.of(asset_id):
        assert topic == client_topic
        assert VALIDATOR.validate(message) == []
        assert message["sendername"] == SENDER.sendername


# --------------------------------------------------------------------------- tests


def test_async_client_end_to_end(store: Path, subscriber: Subscriber) -> None:
    count = 200

    async def main() -> None:
        async with AsyncClient.from_store(store, sender=SENDER) as client:
            assert client.shadow.synced and client.permission
            assert client.shadow.reported.get("sendTelemetryData") is True
            press = client.asset(Asset("async-press", "SN-A", AssetType.SHEETFED_PRESS))
            results = [await press.send(status(n)) for n in range(count)]
            assert {r.status for r in results} == {SendStatus.QUEUED}
            assert await client.wait_drained(20)
            stats = client.stats()
            assert stats.state is ConnectionState.CONNECTED and stats.permission
            assert stats.accepted == count and stats.acked == count and stats.queued == 0
            assert stats.pubacks >= stats.acked
            topic = client.topic
        final = client.stats()
        assert final.queued == 0 and final.accepted == count and final.acked == count
        # After close the state says so (it said CONNECTED, connected=True before).
        assert final.state is ConnectionState.STOPPED
        assert not final.connected and not final.waiting_for_platform
        assert final.connection_status == "stopped"
        check_arrived(subscriber, topic, "async-press", set(range(count)))
        assert all(m["siteid"] for _, m in subscriber.of("async-press"))

    asyncio.run(main())
    assert outbox_depth(store) == 0


def test_blocking_client_end_to_end(
    sandbox: SandboxProcess, store: Path, subscriber: Subscriber
) -> None:
    threads, per_thread = 4, 50
    thing = client_id_of(store)
    with Client.from_store(store, sender=SENDER) as client:
        assert client.shadow.synced and client.permission

        errors: list[BaseException] = []

        def send(k: int) -> None:
            press = client.asset(Asset(f"blocking-press-{k}", f"SN-{k}", AssetType.CUTTER))
            try:
                for n in range(per_thread):
                    # Both ways of sending, from several threads at once.
                    payload = status(n)
                    result = client.send(press.asset, payload) if n % 2 else press.send(payload)
                    assert result.queued
            except BaseException as exc:
                errors.append(exc)

        workers = [threading.Thread(target=send, args=(k,)) for k in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(30)
        assert not errors, errors
        assert client.wait_drained(20)
        stats = client.stats()
        assert stats.accepted == threads * per_thread and stats.queued == 0
        assert stats.acked == threads * per_thread and stats.connected

        client.shadow.set_reported("mode", "production")
        client.shadow.flush(10)
        assert shadow_document(sandbox, thing)["state"]["reported"]["mode"] == "production"
        config = client.named_shadow("config")
        config.set_reported("firmware", "1.2.3")
        config.flush(10)
        named = shadow_document(sandbox, thing, "config")
        assert named["state"]["reported"]["firmware"] == "1.2.3"
        topic = client.topic
    final = client.stats()
    assert final.state is ConnectionState.STOPPED and not final.connected
    assert final.acked == threads * per_thread
    for k in range(threads):
        check_arrived(subscriber, topic, f"blocking-press-{k}", set(range(per_thread)))
    assert outbox_depth(store) == 0


def raw_status(n: int) -> dict[str, Any]:
    """A Status v2 payload as a plain dict (what ``send()`` also takes)."""
    return status(n).to_payload()


def test_every_send_method_delivers(store: Path, subscriber: Subscriber) -> None:
    """The send family, async then blocking: six ways, 5 messages each, every message
    arrives once (counted by the independent subscriber) and nothing is left behind."""
    per_way = 5

    def numbers(way: int) -> range:
        return range(way * per_way, (way + 1) * per_way)

    async def main() -> str:
        asset = Asset("family-async", "SN-FA", AssetType.SHEETFED_PRESS)
        async with AsyncClient.from_store(store, sender=SENDER) as client:
            channel = client.asset(asset)
            for n in numbers(0):
                assert (await client.send(asset, status(n))).queued
            results = await client.send_many(asset, [raw_status(n) for n in numbers(1)])
            assert [r.queued for r in results] == [True] * per_way
            for n in numbers(2):
                message = build_message(client.sender, asset, status(n))
                assert (await client.send_message(message)).queued
            messages = [build_message(client.sender, asset, status(n)) for n in numbers(3)]
            assert len(await client.send_messages(messages)) == per_way
            for n in numbers(4):
                assert (await channel.send(raw_status(n), payloadversion=2)).queued
            assert len(await channel.send_many([status(n) for n in numbers(5)])) == per_way
            # One invalid payload refuses the whole batch: 99 never arrives.
            with pytest.raises(InvalidMessageError, match="signalstatus"):
                await client.send_many(asset, [raw_status(99), {"signalstatus": {}}])
            assert client.stats().accepted == 6 * per_way
            assert await client.wait_drained(20)
            return client.topic

    topic = asyncio.run(main())
    check_arrived(subscriber, topic, "family-async", set(range(6 * per_way)))
    assert sorted(subscriber.counters("family-async")) == list(range(6 * per_way))

    asset = Asset("family-blocking", "SN-FB", AssetType.CUTTER)
    with Client.from_store(store, sender=SENDER) as client:
        channel = client.asset(asset)
        for n in numbers(0):
            assert client.send(asset, status(n)).queued
        assert len(client.send_many(asset, (raw_status(n) for n in numbers(1)))) == per_way
        for n in numbers(2):
            assert client.send_message(build_message(client.sender, asset, status(n))).queued
        messages = [build_message(client.sender, asset, status(n)) for n in numbers(3)]
        assert len(client.send_messages(iter(messages))) == per_way
        for n in numbers(4):
            assert channel.send(status(n)).queued
        assert len(channel.send_many([raw_status(n) for n in numbers(5)])) == per_way
        assert client.wait_drained(20)
    check_arrived(subscriber, topic, "family-blocking", set(range(6 * per_way)))
    assert sorted(subscriber.counters("family-blocking")) == list(range(6 * per_way))
    assert outbox_depth(store) == 0


def test_permission_off_holds_messages_on_releases_them(
    sandbox: SandboxProcess, store: Path, subscriber: Subscriber
) -> None:
    thing = client_id_of(store)
    asset = Asset("held-press", "SN-H", AssetType.SHEETFED_PRESS)

    async def main() -> str:
        async with AsyncClient.from_store(store, sender=SENDER) as client:
            for n in range(20):
                await client.send(asset, status(n))
            await asyncio.to_thread(subscriber.wait_for, "held-press", set(range(20)))

            set_permission(sandbox, thing, False)
            assert await client.wait_permission(False, 10)
            for n in range(20, 50):
                result = await client.send(asset, status(n))
                assert result.status is SendStatus.QUEUED  # hold (the default)
            await asyncio.sleep(1.0)
            stats = client.stats()
            assert not stats.permission and stats.held == 30 and stats.queued == 30
            assert max(subscriber.counters("held-press")) < 20, "published without permission"

            set_permission(sandbox, thing, True)
            assert await client.wait_permission(True, 10)
            assert await client.wait_drained(20)
            await asyncio.to_thread(subscriber.wait_for, "held-press", set(range(50)))

            # Closed while held: kept in the outbox, quickly (no drain without permission).
            set_permission(sandbox, thing, False)
            assert await client.wait_permission(False, 10)
            for n in range(50, 60):
                await client.send(asset, status(n))
            began = time.monotonic()
            final = await client.close()
            assert time.monotonic() - began < 5
            assert final.queued == 10 and final.held == 10
            assert final.state is ConnectionState.STOPPED and not final.connected
            # The counts add up: 60 accepted = 50 delivered + 10 left in the outbox.
            assert (final.carried_over, final.accepted, final.acked) == (0, 60, 50)
            return client.topic

    topic = asyncio.run(main())
    assert outbox_depth(store) == 10
    time.sleep(0.5)
    assert max(subscriber.counters("held-press")) < 50

    # The next run publishes them once permitted again.
    set_permission(sandbox, thing, True)
    with Client.from_store(store, sender=SENDER) as client:
        assert client.wait_drained(20)
        stats = client.stats()
        assert (stats.carried_over, stats.accepted, stats.acked, stats.queued) == (10, 0, 10, 0)
    check_arrived(subscriber, topic, "held-press", set(range(60)))
    assert outbox_depth(store) == 0


def test_policy_drop_discards_without_permission(
    sandbox: SandboxProcess, store: Path, subscriber: Subscriber
) -> None:
    thing = client_id_of(store)
    set_permission(sandbox, thing, False)
    asset = Asset("dropping-press", "SN-D", AssetType.SHEETFED_PRESS)
    with Client.from_store(store, sender=SENDER, policy="drop") as client:
        assert not client.permission
        results = [client.send(asset, status(n)) for n in range(10)]
        assert {r.status for r in results} == {SendStatus.DROPPED_NO_PERMISSION}
        assert client.stats().dropped_no_permission == 10 and client.stats().queued == 0
        set_permission(sandbox, thing, True)
        assert client.wait_permission(True, 10)
        for n in range(10, 20):
            assert client.send(asset, status(n)).queued
        assert client.wait_drained(20)
    subscriber.wait_for("dropping-press", set(range(10, 20)))
    time.sleep(0.3)
    assert set(subscriber.counters("dropping-press")) == set(range(10, 20))
