"""Message validation speed: iotref's compiled validator (jsonschema_rs) against the
reference client's library (python ``jsonschema``), doing the same work (header and payload
schema on the whole message, formats checked); and the builders' build+serialize time.

Each figure is the median over several rounds of ~20,000 messages, in us per message.
"""

from __future__ import annotations

import importlib
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from bench.harness import BenchContext, Figure
from iotref.device.telemetry.messages import (
    Asset,
    AssetType,
    DeviceStatusV1,
    DeviceStatusV2,
    Event,
    JobPhaseStatusV1,
    JobPhaseStatusV2,
    JobPhaseV1,
    JobPhaseV2,
    Payload,
    Sender,
    SenderType,
    StatusV1,
    StatusV2,
    build_message,
    to_json,
)
from iotref.protocol.message_schemas import MessageValidator, header_schema, payload_schema

MESSAGES = 20_000
ROUNDS = 5


def _payloads_v1(n: int) -> list[Payload]:
    statuses = list(DeviceStatusV1)
    return [
        StatusV1(
            status=statuses[i % len(statuses)],
            speed=float(i % 18000),
            productioncounter=i,
            totalproductioncounter=1_000_000 + i,
            jobphase=JobPhaseV1(
                jobid=f"J{i // 100}", status=JobPhaseStatusV1.IN_PROGRESS, amount=5000
            ),
            event=Event(eventid="E1", eventvalue="ok") if i % 10 == 0 else None,
        )
        for i in range(n)
    ]


def _payloads_v2(n: int) -> list[Payload]:
    statuses = list(DeviceStatusV2)
    return [
        StatusV2(
            status=statuses[i % len(statuses)],
            speed=float(i % 18000),
            totalproductioncounter=1_000_000 + i,
            statusdetails="",
            productioncounter=i,
            jobphase=[
                JobPhaseV2(
                    jobid=f"J{i // 100}",
                    status=JobPhaseStatusV2.IN_PROGRESS,
                    amount=5000,
                    statusdetails="",
                    percentcompleted=str(i % 100),
                )
            ],
            event=Event(eventid="E1", eventvalue="ok") if i % 10 == 0 else None,
        )
        for i in range(n)
    ]


def _messages(payloads: list[Payload]) -> list[dict[str, Any]]:
    sender = Sender(SenderType.PRESS, "bench-gateway", "1.0.0", siteid="site-1")
    asset = Asset("asset-1", "SN-0001", AssetType.SHEETFED_PRESS, assetname="Press 1")
    start = datetime(2026, 11, 25, 10, 0, tzinfo=timezone.utc)
    return [
        build_message(sender, asset, p, now=start + timedelta(milliseconds=i))
        for i, p in enumerate(payloads)
    ]


def _median_us(fn: Callable[[], object], count: int, rounds: int = ROUNDS) -> float:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) / count * 1e6)
    return statistics.median(samples)


def _peer_validators() -> dict[int, Callable[[dict[str, Any]], bool]] | None:
    """python ``jsonschema`` doing the same work, or None if it is not installed."""
    try:
        jsonschema: Any = importlib.import_module("jsonschema")
    except ImportError:
        return None
    header = jsonschema.Draft7Validator(
        header_schema(3), format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER
    )
    out: dict[int, Callable[[dict[str, Any]], bool]] = {}
    for version in (1, 2):
        payload = jsonschema.Draft7Validator(
            payload_schema("generic.signal", "Status", version),
            format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER,
        )

        def check(message: dict[str, Any], payload: Any = payload) -> bool:
            return bool(header.is_valid(message) and payload.is_valid(message))

        out[version] = check
    return out


def run(ctx: BenchContext) -> list[Figure]:
    validator = MessageValidator()
    figures: list[Figure] = []
    peers = _peer_validators()
    for version, payloads in ((1, _payloads_v1(MESSAGES)), (2, _payloads_v2(MESSAGES))):
        messages = _messages(payloads)
        assert all(not validator.validate(m) for m in messages[:100])

        def ours(messages: list[dict[str, Any]] = messages) -> None:
            validate = validator.validate
            for m in messages:
                validate(m)

        ours()  # warm up
        us = _median_us(ours, len(messages))
        figures.append(
            Figure(
                f"validation.status_v{version}.iotref",
                us,
                "us/message",
                f"jsonschema_rs, header+payload on whole message, median of {ROUNDS}x"
                f"{len(messages)}; goal <= 10",
            )
        )
        texts = [to_json(m) for m in messages]

        def ours_json(texts: list[bytes] = texts) -> None:
            validate_json = validator.validate_json
            for t in texts:
                validate_json(t)

        figures.append(
            Figure(
                f"validation.status_v{version}.iotref_from_json",
                _median_us(ours_json, len(texts)),
                "us/message",
                "validate_json: parse bytes + validate",
            )
        )
        if peers is None:
            figures.append(
                Figure(
                    f"validation.status_v{version}.jsonschema_peer",
                    float("nan"),
                    "us/message",
                    "skipped: python jsonschema not installed",
                )
            )
            continue
        peer_check = peers[version]
        peer_count = min(len(messages), 4000)  # the peer is slow; fewer messages suffice
        sample = messages[:peer_count]
        assert all(peer_check(m) for m in sample[:100])

        def peer(
            sample: list[dict[str, Any]] = sample,
            peer_check: Callable[[dict[str, Any]], bool] = peer_check,
        ) -> None:
            for m in sample:
                peer_check(m)

        peer_us = _median_us(peer, peer_count)
        figures.append(
            Figure(
                f"validation.status_v{version}.jsonschema_peer",
                peer_us,
                "us/message",
                f"python jsonschema Draft7Validator + FORMAT_CHECKER, same work, median of "
                f"{ROUNDS}x{peer_count}",
            )
        )
        figures.append(
            Figure(
                f"validation.status_v{version}.speedup",
                peer_us / us,
                "x",
                "python jsonschema time / iotref time",
            )
        )

    sender = Sender(SenderType.PRESS, "bench-gateway", "1.0.0", siteid="site-1")
    asset = Asset("asset-2", "SN-0002", AssetType.SHEETFED_PRESS)
    payloads = _payloads_v2(MESSAGES)

    def build() -> None:
        for p in payloads:
            to_json(build_message(sender, asset, p))

    figures.append(
        Figure(
            "messages.build_serialize_v2",
            _median_us(build, len(payloads)),
            "us/message",
            "build_message (uuid4, timestamps, header, payload) + to_json",
        )
    )
    return figures
