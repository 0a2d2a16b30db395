"""The shadow service's per-thing limits: the rule on a fake clock, and the real service
(in process, its MQTT publishing replaced by a recorder that acknowledges on demand)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from iotref.protocol import shadow_document as sd
from iotref.sandbox.context import SandboxContext, SandboxSettings
from iotref.sandbox.limits import SandboxLimits
from iotref.sandbox.quota_meter import QuotaMeter
from iotref.sandbox.shadow.request_limits import PRUNE_EVERY, ShadowRequestLimits
from iotref.sandbox.shadow.service import ShadowService
from tests.support.fake_clock import FakeClock


def refused(limits: ShadowRequestLimits, thing: str, *, mqtt: bool = False) -> bool:
    """Whether the request is refused (always with AWS's 429 "Too Many Requests")."""
    try:
        limits.admit(thing, mqtt=mqtt)
    except sd.ShadowError as exc:
        error = exc
    else:
        return False
    assert (error.code, error.message) == (429, sd.MSG_TOO_MANY_REQUESTS)
    return True


def test_rate_per_thing_is_a_bucket_of_one_second() -> None:
    clock = FakeClock(100.0)
    limits = ShadowRequestLimits(20, 10, clock)
    assert [refused(limits, "a") for _ in range(21)] == [False] * 20 + [True]
    assert not refused(limits, "b")  # another thing has its own
    clock.now += 0.05  # one more request's worth
    assert not refused(limits, "a")
    assert refused(limits, "a")
    clock.now += 1.0
    assert [refused(limits, "a") for _ in range(21)].count(True) == 1
    assert limits.refused_rate == 3


def test_in_flight_counts_mqtt_requests_until_finished() -> None:
    limits = ShadowRequestLimits(0, 3, FakeClock(100.0))
    for _ in range(3):
        assert not refused(limits, "a", mqtt=True)
        limits.started("a")
    assert refused(limits, "a", mqtt=True)
    assert not refused(limits, "a", mqtt=False)  # REST requests are not on a connection
    limits.finished("a")
    assert not refused(limits, "a", mqtt=True)
    assert limits.refused_in_flight == 1
    for _ in range(5):
        limits.finished("a")
    assert limits.in_flight("a") == 0


def test_limits_of_zero_are_off() -> None:
    limits = ShadowRequestLimits(0, 0, FakeClock(100.0))
    for _ in range(1000):
        limits.started("a")
        assert not refused(limits, "a", mqtt=True)


def test_full_buckets_are_forgotten() -> None:
    clock = FakeClock(100.0)
    limits = ShadowRequestLimits(20, 0, clock)
    for i in range(PRUNE_EVERY + 1):
        limits.admit(f"thing-{i}", mqtt=False)
    assert len(limits._buckets) == PRUNE_EVERY + 1
    clock.now += 2.0  # every one of them full again
    for _ in range(PRUNE_EVERY - 1):  # one thing at its rate, until the next pruning
        limits.admit("busy", mqtt=False)
        clock.now += 0.05
    assert len(limits._buckets) <= 1


# --------------------------------------------------------------------------- the service


class Service:
    """The real ShadowService without a broker: publishes wait for ``gate``."""

    def __init__(self, tmp: Path, limits: SandboxLimits) -> None:
        self.ctx = SandboxContext.open(SandboxSettings(data_dir=tmp, limits=limits))
        self.meter = QuotaMeter(limits.publish_rate, limits.throughput)
        self.service = ShadowService(self.ctx, cas=None, meter=self.meter)
        self.published: list[tuple[str, Any]] = []
        self.gate = asyncio.Event()

        async def held_publish(
            topic: str, payload: bytes, qos: int = 1, retain: bool = False
        ) -> bool:
            self.published.append((topic, json.loads(payload)))
            await self.gate.wait()
            return True

        self.service._publish = held_publish  # type: ignore[method-assign]
        self.service._connected.set()

    def request(self, thing: str, op: str, body: dict[str, Any]) -> None:
        topic = f"$aws/things/{thing}/shadow/{op}"
        self.service._on_message(topic, json.dumps(body).encode())

    def answers(self, suffix: str) -> list[Any]:
        return [body for topic, body in self.published if topic.endswith(suffix)]

    async def settle(self) -> None:
        """Let the loop run everything that can run now (no I/O here: a few hundred
        turns are plenty for chained publishes)."""
        for _ in range(300):
            await asyncio.sleep(0)


def run(service: Service, scenario: Any) -> None:
    """Run ``scenario(service)``; whatever happens, the held publishes are let go."""

    async def main() -> None:
        try:
            await scenario(service)
        finally:
            service.gate.set()
            await service.settle()

    try:
        asyncio.run(main())
    finally:
        service.ctx.db.close()


def test_requests_over_the_in_flight_limit_are_answered_429(tmp_path: Path) -> None:
    async def scenario(s: Service) -> None:
        update = {"state": {"reported": {"n": 1}}}
        for i in range(12):
            s.request("dev", "update", {**update, "clientToken": f"t{i}"})
        await s.settle()
        assert s.service.request_limits.in_flight("dev") == 10  # no PUBACK yet
        s.gate.set()  # the broker acknowledges everything
        await s.settle()
        assert s.service.request_limits.in_flight("dev") == 0
        rejected = s.answers("update/rejected")
        assert [r["clientToken"] for r in rejected] == ["t10", "t11"]
        assert {(r["code"], r["message"]) for r in rejected} == {(429, "Too Many Requests")}
        assert len(s.answers("update/accepted")) == 10
        s.request("dev", "update", {**update, "clientToken": "after"})
        await s.settle()
        assert s.answers("update/accepted")[-1]["clientToken"] == "after"
        assert s.meter.snapshot("dev", 0)["messages"] == 13  # every request was metered

    run(Service(tmp_path, SandboxLimits(shadow_rate=0)), scenario)


def test_requests_over_the_rate_are_answered_429_over_mqtt_and_rest(tmp_path: Path) -> None:
    async def scenario(s: Service) -> None:
        s.gate.set()
        for i in range(6):
            s.request("dev", "get", {"clientToken": f"g{i}"})
        await s.settle()
        assert [r["code"] for r in s.answers("get/rejected")] == [404] * 5 + [429]
        assert s.answers("get/rejected")[-1]["clientToken"] == "g5"
        with pytest.raises(sd.ShadowError) as info:
            await s.service.get("dev", None)  # REST shares the thing's rate
        assert info.value.code == 429
        with pytest.raises(sd.ShadowError) as other:
            await s.service.get("other", None)  # another thing has its own
        assert other.value.code == 404

    run(Service(tmp_path, SandboxLimits(shadow_rate=5, shadow_in_flight=0)), scenario)


def test_document_limits_follow_the_settings(tmp_path: Path) -> None:
    async def scenario(s: Service) -> None:
        s.gate.set()
        big_state = b'{"state": {"reported": {"a": "' + b"x" * 100 + b'"}}}'
        with pytest.raises(sd.ShadowError) as big:
            await s.service.update("dev", None, big_state)
        assert (big.value.code, big.value.message) == (413, sd.MSG_TOO_LARGE)
        with pytest.raises(sd.ShadowError) as deep:
            await s.service.update("dev", None, b'{"state": {"reported": {"a": {"b": {"c": 1}}}}}')
        assert (deep.value.code, deep.value.message) == (
            400,
            "JSON contains too many levels of nesting; maximum is 2",
        )
        accepted = await s.service.update("dev", None, b'{"state": {"reported": {"a": {"b": 1}}}}')
        assert accepted["version"] == 1

    run(Service(tmp_path, SandboxLimits(shadow_state_bytes=100, shadow_depth=2)), scenario)


def test_bad_names_over_mqtt_are_answered_on_rejected(tmp_path: Path) -> None:
    async def scenario(s: Service) -> None:
        s.gate.set()
        s.service._on_message(f"$aws/things/dev/shadow/name/{'n' * 65}/get", b"")
        await s.settle()
        (answer,) = s.answers("get/rejected")
        assert answer["code"] == 400
        assert "shadowName" in answer["message"]

    run(Service(tmp_path, SandboxLimits()), scenario)
