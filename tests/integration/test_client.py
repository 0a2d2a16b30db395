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
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from iotref.device.blocking import Client
from iotref.device.client import AsyncClient
from iotref.device.connection.state import ConnectionState
from iotref.device.errors import InvalidMessageError
from iotref.device.telemetry.messages import (
    Asset,
    AssetType,
    DeviceStatusV2,
    Sender,
    SenderType,
    StatusV2,
    build_message,
)
from iotref.device.telemetry.results import SendStatus
from iotref.protocol.message_schemas import MessageValidator
from tests.support.onboarding import client_id_of, outbox_depth
from tests.support.sandbox_process import SandboxProcess
from tests.support.shadow_rest import set_permission, shadow_document
from tests.support.telemetry_watcher import TelemetryWatcher

pytestmark = pytest.mark.integration

SENDER = Sender(SenderType.PRESS, "client-test", "1.0")
VALIDATOR = MessageValidator(strict=True)


# --------------------------------------------------------------------------- helpers


def status(n: int) -> StatusV2:
    return StatusV2(
        status=DeviceStatusV2.PRODUCTION, speed=9000, totalproductioncounter=n, statusdetails="ok"
    )


def check_arrived(
    subscriber: TelemetryWatcher, client_topic: str, asset_id: str, expected: set[int]
) -> None:
    got = subscriber.wait_for(asset_id, expected)
    assert set(got) == expected
    for topic, message in subscriber.of(asset_id):
        assert topic == client_topic
        assert VALIDATOR.validate(message) == []
        assert message["sendername"] == SENDER.sendername


# --------------------------------------------------------------------------- tests


def test_async_client_end_to_end(store: Path, subscriber: TelemetryWatcher) -> None:
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
    sandbox: SandboxProcess, store: Path, subscriber: TelemetryWatcher
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


def test_every_send_method_delivers(store: Path, subscriber: TelemetryWatcher) -> None:
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
    assert sorted(subscriber.indices("family-async")) == list(range(6 * per_way))

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
    assert sorted(subscriber.indices("family-blocking")) == list(range(6 * per_way))
    assert outbox_depth(store) == 0


def test_permission_off_holds_messages_on_releases_them(
    sandbox: SandboxProcess, store: Path, subscriber: TelemetryWatcher
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
            assert max(subscriber.indices("held-press")) < 20, "published without permission"

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
    assert max(subscriber.indices("held-press")) < 50

    # The next run publishes them once permitted again.
    set_permission(sandbox, thing, True)
    with Client.from_store(store, sender=SENDER) as client:
        assert client.wait_drained(20)
        stats = client.stats()
        assert (stats.carried_over, stats.accepted, stats.acked, stats.queued) == (10, 0, 10, 0)
    check_arrived(subscriber, topic, "held-press", set(range(60)))
    assert outbox_depth(store) == 0


def test_policy_drop_discards_without_permission(
    sandbox: SandboxProcess, store: Path, subscriber: TelemetryWatcher
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
    assert set(subscriber.indices("dropping-press")) == set(range(10, 20))
