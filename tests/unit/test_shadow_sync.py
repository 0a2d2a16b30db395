"""ShadowClient and ShadowSync against a fake connection whose "broker" is an in-process
shadow service built on the shared document rules (iotref.protocol.shadow_document)."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest

from iotref.device.connection.state import IncomingMessage
from iotref.device.connection.subscriptions import topic_matches
from iotref.device.shadow.desired import DesiredChange, Refuse
from iotref.device.shadow.errors import DesiredChangeRefused, ShadowRejected, ShadowTimeout
from iotref.device.shadow.requests import RESPONSE_SUFFIXES, ShadowClient
from iotref.device.shadow.sync import ShadowSync
from iotref.protocol import shadow_document as sd
from iotref.protocol.topics import parse_shadow_topic, shadow_topic

THING = "iotref-00000000000000000001"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


pytestmark = pytest.mark.anyio

Handler = Callable[[IncomingMessage], Awaitable[None] | None]


class FakeShadowConnection:
    """Just enough of Connection for the shadow code, with a shadow service behind it."""

    def __init__(self) -> None:
        self.connected = True
        self.subs: list[tuple[str, Handler]] = []
        self.callbacks: list[Callable[[bool], Any]] = []
        self.docs: dict[str | None, sd.ShadowDocument] = {}
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.answer = True  # False: requests vanish (a slow or lost service)
        self.reject_next: sd.ShadowError | None = None
        self.reject_times = 1  # how many requests in a row reject_next refuses
        self.rejected: list[tuple[str, int]] = []  # (operation, code) of each refusal
        self.tasks: set[asyncio.Future[Any]] = set()
        self.subscribes: list[list[str]] = []  # the topic filters of each SUBSCRIBE
        self.paced = 0  # requests that asked the connection's pace first

    # -- the Connection API used by the shadow module
    async def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        await self.subscribe_many([(topic_filter, handler)], qos)

    async def subscribe_many(self, subscriptions: list[tuple[str, Handler]], qos: int = 1) -> None:
        self.subscribes.append([f for f, _ in subscriptions])
        self.subs.extend(subscriptions)

    async def pace(self) -> None:
        self.paced += 1

    async def unsubscribe(self, topic_filter: str, handler: Handler | None = None) -> None:
        self.subs = [(f, h) for f, h in self.subs if not (f == topic_filter and h == handler)]

    def add_connected_callback(self, cb: Callable[[bool], Any]) -> None:
        self.callbacks.append(cb)

    def remove_connected_callback(self, cb: Callable[[bool], Any]) -> None:
        self.callbacks.remove(cb)

    def publish_nowait(self, topic: str, payload: bytes, qos: int = 1) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self.connected:
            return fut  # queued forever, as far as this test is concerned
        fut.set_result(None)
        doc = json.loads(payload) if payload else {}
        self.published.append((topic, doc))
        if self.answer:
            asyncio.get_running_loop().call_soon(self._serve, topic, payload)
        return fut

    # -- test controls
    def deliver(self, topic: str, doc: dict[str, Any]) -> None:
        if not self.connected:
            return
        msg = IncomingMessage(topic, json.dumps(doc).encode(), 1)
        for flt, handler in list(self.subs):
            if topic_matches(flt, topic):
                result = handler(msg)
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)

    def disconnect(self) -> None:
        self.connected = False

    def reconnect(self, session_present: bool = True) -> None:
        self.connected = True
        for cb in list(self.callbacks):
            cb(session_present)

    def operator_update(self, state: dict[str, Any], shadow: str | None = None) -> None:
        """An update from someone else (e.g. REST): stored, and announced if online."""
        request = sd.UpdateRequest(state)
        outcome = sd.apply_update(self.docs.get(shadow), request, int(time.time()))
        self.docs[shadow] = outcome.document
        self.deliver(shadow_topic(THING, "update/accepted", shadow), outcome.accepted)
        if outcome.delta is not None:
            self.deliver(shadow_topic(THING, "update/delta", shadow), outcome.delta)

    def reported(self, shadow: str | None = None) -> dict[str, Any]:
        return dict(self.docs[shadow].state.get("reported", {}))

    def updates(self) -> list[dict[str, Any]]:
        return [d for t, d in self.published if t.endswith("/update")]

    # -- the service
    def _serve(self, topic: str, payload: bytes) -> None:
        parsed = parse_shadow_topic(topic)
        assert parsed is not None
        thing, shadow, op = parsed
        now = int(time.time())
        try:
            if self.reject_next is not None:
                error = self.reject_next
                self.reject_times -= 1
                if self.reject_times <= 0:
                    self.reject_next, self.reject_times = None, 1
                self.rejected.append((op, error.code))
                token = sd.parse_simple(payload, strict=False).client_token
                raise sd.ShadowError(error.code, error.message, token)
            if op == "get":
                req = sd.parse_simple(payload)
                doc = self.docs.get(shadow)
                if doc is None:
                    raise sd.ShadowError(404, "No shadow exists with name", req.client_token)
                self.deliver(
                    shadow_topic(thing, "get/accepted", shadow),
                    sd.get_response(doc, now, req.client_token),
                )
            elif op == "update":
                upd = sd.parse_update(payload)
                outcome = sd.apply_update(self.docs.get(shadow), upd, now)
                self.docs[shadow] = outcome.document
                self.deliver(shadow_topic(thing, "update/accepted", shadow), outcome.accepted)
                if outcome.delta is not None:
                    self.deliver(shadow_topic(thing, "update/delta", shadow), outcome.delta)
            elif op == "delete":
                req = sd.parse_simple(payload, strict=False)
                doc = self.docs.pop(shadow, None)
                if doc is None:
                    raise sd.ShadowError(404, "No shadow exists with name", req.client_token)
                self.deliver(
                    shadow_topic(thing, "delete/accepted", shadow),
                    sd.delete_response(doc, now, req.client_token),
                )
        except sd.ShadowError as exc:
            self.deliver(shadow_topic(thing, f"{op}/rejected", shadow), exc.payload(now))


def sync_for(conn: FakeShadowConnection, **kw: Any) -> ShadowSync:
    return ShadowSync(cast(Any, conn), THING, **kw)


async def settle(rounds: int = 20) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


# --------------------------------------------------------------------------- client


async def test_client_correlates_answers_by_client_token() -> None:
    conn = FakeShadowConnection()
    conn.docs[None] = sd.apply_update(None, sd.UpdateRequest({"desired": {"a": 1}}), 1).document
    client = ShadowClient(cast(Any, conn), THING)
    got = await asyncio.gather(*(client.get() for _ in range(5)))
    tokens = [d["clientToken"] for d in got]
    assert len(set(tokens)) == 5 and all(len(t.encode()) <= 64 for t in tokens)
    sent = [d["clientToken"] for t, d in conn.published if t.endswith("/get")]
    assert sorted(sent) == sorted(tokens)
    accepted = await client.update({"reported": {"a": 1}})
    assert accepted["state"] == {"reported": {"a": 1}} and accepted["version"] == 2


async def test_client_ignores_answers_to_other_tokens() -> None:
    conn = FakeShadowConnection()
    conn.answer = False
    client = ShadowClient(cast(Any, conn), THING, timeout_s=0.5)
    task = asyncio.ensure_future(client.get())
    await settle()
    conn.deliver(shadow_topic(THING, "get/accepted"), {"state": {}, "clientToken": "other"})
    conn.deliver(shadow_topic(THING, "get/accepted"), {"state": {}})
    await settle()
    assert not task.done()
    token = conn.published[-1][1]["clientToken"]
    conn.deliver(
        shadow_topic(THING, "get/accepted"), {"state": {}, "version": 7, "clientToken": token}
    )
    assert (await task)["version"] == 7


async def test_client_rejected_and_timeout() -> None:
    conn = FakeShadowConnection()
    client = ShadowClient(cast(Any, conn), THING, timeout_s=0.2)
    with pytest.raises(ShadowRejected) as info:
        await client.get()
    assert info.value.code == 404 and "No shadow" in info.value.message
    conn.docs[None] = sd.ShadowDocument(version=3)
    with pytest.raises(ShadowRejected) as conflict:
        await client.update({"reported": {"x": 1}}, version=1)
    assert (conflict.value.code, conflict.value.message) == (409, "Version conflict")
    conn.answer = False
    with pytest.raises(ShadowTimeout):
        await client.get()
    assert not client._pending  # nothing left behind


async def test_named_shadow_topics() -> None:
    conn = FakeShadowConnection()
    client = ShadowClient(cast(Any, conn), THING, "config")
    await client.update({"reported": {"v": 1}})
    assert conn.published[-1][0] == f"$aws/things/{THING}/shadow/name/config/update"
    assert conn.docs["config"].state == {"reported": {"v": 1}}
    assert all("/name/config/" in f for f, _ in conn.subs)


# --------------------------------------------------------------------------- sync


async def test_start_takes_desired_and_reports_it() -> None:
    conn = FakeShadowConnection()
    conn.operator_update({"desired": {"sendTelemetryData": True, "speed": 5}})
    changes: list[bool] = []
    sync = sync_for(conn)
    sync.on_send_telemetry_changed(changes.append)
    async with sync:
        await sync.flush(2)
        assert sync.reported == {"sendTelemetryData": True, "speed": 5}
        assert conn.reported() == {"sendTelemetryData": True, "speed": 5}
        assert sync.version == 1 and sync.send_telemetry_allowed
        assert changes == [True]
        gets = [d for t, d in conn.published if t.endswith("/get")]
        assert len(gets) == 1


async def test_no_shadow_yet_reports_local_state() -> None:
    conn = FakeShadowConnection()
    async with sync_for(conn, initial_reported={"firmware": "1.2"}) as sync:
        await sync.flush(2)
        assert conn.reported() == {"firmware": "1.2"}
        assert not sync.send_telemetry_allowed


async def test_deltas_applied_in_order_and_old_ones_ignored() -> None:
    conn = FakeShadowConnection()
    conn.operator_update({"desired": {"speed": 1}})
    async with sync_for(conn) as sync:
        await sync.flush(2)
        conn.operator_update({"desired": {"speed": 2}})
        assert await sync.wait_for("speed", 2, timeout=2) == 2
        version = sync.version
        stale = {"version": version - 1, "state": {"speed": 99}, "timestamp": 1}
        conn.deliver(shadow_topic(THING, "update/delta"), stale)
        duplicate = {"version": version, "state": {"speed": 98}, "timestamp": 1}
        conn.deliver(shadow_topic(THING, "update/delta"), duplicate)
        await settle()
        assert sync.reported["speed"] == 2 and sync.version == version
        await sync.flush(2)
        assert conn.reported()["speed"] == 2


async def test_nested_desired_is_merged_and_reported_minimally() -> None:
    conn = FakeShadowConnection()
    conn.operator_update({"desired": {"cfg": {"a": 1, "b": {"c": 2}}}})
    async with sync_for(conn, initial_reported={"cfg": {"z": 0}}) as sync:
        await sync.flush(2)
        assert sync.reported == {"cfg": {"z": 0, "a": 1, "b": {"c": 2}}}
        conn.operator_update({"desired": {"cfg": {"b": {"c": 3}}}})
        await sync.wait_for("cfg", predicate=lambda v: v["b"]["c"] == 3, timeout=2)
        await sync.flush(2)
        assert conn.reported() == {"cfg": {"z": 0, "a": 1, "b": {"c": 3}}}
        assert conn.updates()[-1]["state"] == {"reported": {"cfg": {"b": {"c": 3}}}}


async def test_handler_adjusts_without_looping() -> None:
    conn = FakeShadowConnection()
    asked: list[DesiredChange] = []

    def clamp(change: DesiredChange) -> Any:
        asked.append(change)
        return min(change.value, 100)

    sync = sync_for(conn)
    sync.on_desired("speed", clamp)
    async with sync:
        conn.operator_update({"desired": {"speed": 500}})
        assert await sync.wait_for("speed", 100, timeout=2) == 100
        await sync.flush(2)
        await asyncio.sleep(0.05)
        assert conn.reported()["speed"] == 100
        assert [c.value for c in asked] == [500]  # the delta after the report is not re-asked
        assert len(conn.updates()) == 1


async def test_handler_refuses_by_raising_or_returning() -> None:
    conn = FakeShadowConnection()
    conn.operator_update({"desired": {"mode": "run", "speed": 3, "color": "red"}})
    sync = sync_for(conn, initial_reported={"mode": "idle"})

    async def no_run(change: DesiredChange) -> Any:
        raise DesiredChangeRefused("the press is being serviced")

    sync.on_desired("mode", no_run)
    sync.on_desired("speed", lambda c: Refuse("too fast"))
    async with sync:
        await sync.flush(2)
        assert sync.reported == {"mode": "idle", "color": "red"}
        assert conn.reported() == {"mode": "idle", "color": "red"}
        assert sync.desired["mode"] == "run"
        # a handler error is a refusal too, and the sync goes on
        sync.on_desired("color", lambda c: 1 / 0)
        conn.operator_update({"desired": {"color": "blue"}})
        await asyncio.sleep(0.05)
        assert sync.reported["color"] == "red"
        # reconcile offers refused changes again
        sync.on_desired("mode", lambda c: None)
        await sync.reconcile(["mode"])
        assert sync.reported["mode"] == "run"


async def test_whole_delta_handler() -> None:
    conn = FakeShadowConnection()
    seen: list[DesiredChange] = []

    def decide(change: DesiredChange) -> Any:
        seen.append(change)
        return {k: v for k, v in change.value.items() if k != "secret"}

    sync = sync_for(conn)
    sync.on_desired(decide)
    async with sync:
        conn.operator_update({"desired": {"a": 1, "secret": 2}})
        await sync.wait_for("a", 1, timeout=2)
        await sync.flush(2)
        assert "secret" not in sync.reported
        assert seen[0].key is None and seen[0].value == {"a": 1, "secret": 2}


async def test_unhandled_keys_can_be_ignored() -> None:
    conn = FakeShadowConnection()
    conn.operator_update({"desired": {"a": 1}})
    async with sync_for(conn, accept_unhandled=False) as sync:
        await sync.flush(2)
        assert sync.reported == {}


async def test_reconnect_does_a_fresh_get_and_applies_offline_changes() -> None:
    conn = FakeShadowConnection()
    conn.operator_update({"desired": {"speed": 1}})
    async with sync_for(conn) as sync:
        await sync.flush(2)
        conn.disconnect()
        conn.operator_update({"desired": {"speed": 7}})  # no delta reaches the device
        sync.set_reported("temperature", 40)  # a local change while offline
        await settle()
        assert sync.reported["speed"] == 1
        conn.reconnect(session_present=False)
        assert await sync.wait_for("speed", 7, timeout=2) == 7
        await sync.flush(2)
        assert conn.reported() == {"speed": 7, "temperature": 40}
        assert sync.syncs == 2
        gets = [d for t, d in conn.published if t.endswith("/get")]
        assert len(gets) == 2


async def test_local_changes_are_coalesced_and_reported() -> None:
    conn = FakeShadowConnection()
    async with sync_for(conn) as sync:
        for i in range(50):
            sync.set_reported("counter", i)
        sync.update_local({"status": {"state": "run", "job": "J1"}})
        await sync.flush(2)
        assert conn.reported() == {"counter": 49, "status": {"state": "run", "job": "J1"}}
        assert len(conn.updates()) <= 3
        sync.update_local({"status": {"job": None}})
        await sync.flush(2)
        assert conn.reported() == {"counter": 49, "status": {"state": "run"}}


async def test_send_telemetry_permission_follows_the_shadow() -> None:
    conn = FakeShadowConnection()
    conn.operator_update({"desired": {"sendTelemetryData": True}})
    seen: list[bool] = []

    async def changed(allowed: bool) -> None:
        seen.append(allowed)

    sync = sync_for(conn)
    sync.on_send_telemetry_changed(changed)
    async with sync:
        assert sync.send_telemetry_allowed
        conn.operator_update({"desired": {"sendTelemetryData": False}})
        await sync.wait_for("sendTelemetryData", False, timeout=2)
        await settle()
        assert not sync.send_telemetry_allowed
        assert seen == [True, False]


async def test_rejected_first_sync_raises_with_code_and_message() -> None:
    conn = FakeShadowConnection()
    conn.reject_next = sd.ShadowError(403, "Forbidden")
    with pytest.raises(ShadowRejected) as info:
        async with sync_for(conn):
            pass
    assert (info.value.code, info.value.message) == (403, "Forbidden")


async def test_throttled_sync_is_retried() -> None:
    conn = FakeShadowConnection()
    conn.operator_update({"desired": {"a": 1}})
    conn.reject_next = sd.ShadowError(429, "Too Many Requests")
    async with sync_for(conn, first_sync_timeout_s=5) as sync:
        assert sync.reported == {"a": 1}
        assert "429" in (sync.last_error or "")


async def test_throttled_reports_are_retried_with_backoff_and_lose_nothing() -> None:
    conn = FakeShadowConnection()
    async with sync_for(conn) as sync:
        assert conn.subscribes == [[shadow_topic(THING, s) for s in RESPONSE_SUFFIXES]]
        conn.reject_next = sd.ShadowError(429, "Too Many Requests")
        conn.reject_times = 3
        loop = asyncio.get_running_loop()
        started = loop.time()
        sync.set_reported("mode", "production")
        await sync.flush(10)
        waited = loop.time() - started
        assert conn.reported() == {"mode": "production"}
        assert conn.rejected == [("update", 429)] * 3
        updates = conn.updates()
        assert len(updates) == 4  # three refused, the fourth accepted
        assert all(u["state"] == {"reported": {"mode": "production"}} for u in updates)
        assert "429" in (sync.last_error or "")
        # Full-jitter delays below 0.2, 0.4 and 0.8 s: some waiting, less than their sum.
        assert 0 < waited < 1.4 + 0.5
        # Every request (the sync's get, the four updates) asked the connection's pace.
        assert conn.paced == len(conn.published)


async def test_reported_update_rejected_surfaces_in_flush() -> None:
    conn = FakeShadowConnection()
    async with sync_for(conn) as sync:
        sync.set_reported("blob", "x" * 9000)  # over the 8 KB state limit
        with pytest.raises(ShadowRejected) as info:
            await sync.flush(2)
        assert info.value.code == 413


async def test_delete_resets_and_later_deltas_apply() -> None:
    conn = FakeShadowConnection()
    conn.operator_update({"desired": {"a": 1}})
    async with sync_for(conn) as sync:
        await sync.flush(2)
        await sync.client.delete()
        await settle()
        assert sync.desired == {} and sync.version == -1
        conn.operator_update({"desired": {"a": 2}})
        assert await sync.wait_for("a", 2, timeout=2) == 2


async def test_desired_removals_by_others_are_tracked() -> None:
    conn = FakeShadowConnection()
    conn.operator_update({"desired": {"sendTelemetryData": True, "x": 1}})
    async with sync_for(conn) as sync:
        conn.operator_update({"desired": {"x": None}})
        await settle()
        assert sync.desired == {"sendTelemetryData": True}


async def test_named_shadow_sync_is_independent() -> None:
    conn = FakeShadowConnection()
    conn.operator_update({"desired": {"a": 1}})
    conn.operator_update({"desired": {"b": 2}}, shadow="cfg")
    async with sync_for(conn) as classic, ShadowSync(cast(Any, conn), THING, "cfg") as named:
        await classic.flush(2)
        await named.flush(2)
        assert classic.reported == {"a": 1} and named.reported == {"b": 2}
        assert conn.reported() == {"a": 1} and conn.reported("cfg") == {"b": 2}
