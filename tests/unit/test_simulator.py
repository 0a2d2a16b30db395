"""The simulated press: deterministic, counters monotonic, phases in a plausible order,
speed ramps, and every payload it produces valid against the platform schemas."""

from __future__ import annotations

import itertools

import pytest

from iotref.device.telemetry.messages import (
    Asset,
    Sender,
    SenderType,
    StatusV1,
    StatusV2,
    build_message,
)
from iotref.fleet.press import (
    DIGITAL,
    OFFSET,
    Phase,
    PressKind,
    PressSimulator,
    profile_for,
)
from iotref.protocol.message_schemas import MessageValidator

VALIDATOR = MessageValidator(strict=True)
SENDER = Sender(SenderType.SYSTEM, "simulator-test", "1.0")

ALLOWED = {
    (Phase.IDLE, Phase.MAKEREADY),
    (Phase.MAKEREADY, Phase.PRODUCTION),
    (Phase.PRODUCTION, Phase.STOPPED),
    (Phase.PRODUCTION, Phase.WASHUP),
    (Phase.STOPPED, Phase.PRODUCTION),
    (Phase.WASHUP, Phase.IDLE),
}


def trace(sim: PressSimulator, seconds: int, tick: float = 1.0) -> list[tuple[Phase, float]]:
    out = []
    for _ in range(int(seconds / tick)):
        sim.step(tick)
        out.append((sim.phase, sim.speed))
    return out


@pytest.mark.parametrize("kind", list(PressKind))
@pytest.mark.parametrize("seed", [0, 1, 42])
def test_counters_never_decrease_and_jobs_complete(kind: PressKind, seed: int) -> None:
    sim = PressSimulator(kind, seed=seed)
    last = (sim.good_sheets, sim.waste_sheets, sim.total_impressions)
    for _ in range(3600):
        sim.step(1.0)
        now = (sim.good_sheets, sim.waste_sheets, sim.total_impressions)
        assert all(b >= a for a, b in zip(last, now, strict=True)), (last, now)
        if sim.job_amount is not None:
            assert 0 <= sim.job_good <= sim.job_amount
        last = now
    assert sim.jobs_completed >= 3
    assert sim.good_sheets > 0
    per_sheet = profile_for(kind).impressions_per_sheet
    started_with = PressSimulator(kind, seed=seed).total_impressions
    printed = sim.good_sheets + sim.waste_sheets
    assert sim.total_impressions - started_with == per_sheet * printed


@pytest.mark.parametrize("kind", list(PressKind))
def test_phases_follow_a_plausible_sequence(kind: PressKind) -> None:
    sim = PressSimulator(kind, seed=7)
    events = sim.run(4 * 3600, tick=0.5)
    phases = [e.phase for e in events if e.kind in ("phase", "stop", "resume")]
    assert phases, "nothing happened in four hours"
    previous = Phase.IDLE
    for phase in phases:
        assert (previous, phase) in ALLOWED, f"{previous} -> {phase}"
        previous = phase
    assert {Phase.MAKEREADY, Phase.PRODUCTION, Phase.WASHUP, Phase.IDLE} <= set(phases)
    assert any(e.kind == "stop" and e.code for e in events), "a press stops now and then"
    started = [e for e in events if e.kind == "job_started"]
    completed = [e for e in events if e.kind == "job_completed"]
    assert len(started) - len(completed) in (0, 1)
    # Event times move forward with the simulated clock.
    assert all(a.at <= b.at for a, b in itertools.pairwise(events))


@pytest.mark.parametrize("kind", list(PressKind))
def test_speed_ramps_except_for_a_stop(kind: PressKind) -> None:
    sim = PressSimulator(kind, seed=3)
    assert sim.profile is (OFFSET if kind is PressKind.OFFSET else DIGITAL)
    ramp = sim.profile.ramp
    speed = sim.speed
    for _ in range(7200):
        sim.step(0.5)
        if sim.phase is Phase.STOPPED:
            assert sim.speed == 0
        else:
            assert abs(sim.speed - speed) <= ramp * 0.5 + 1e-6
        if sim.phase is Phase.IDLE:
            assert sim.speed <= speed  # never speeds up while idle
        speed = sim.speed
        assert 0 <= sim.speed <= sim.profile.speed_range[1]


@pytest.mark.parametrize("kind", list(PressKind))
@pytest.mark.parametrize("version", [1, 2])
def test_every_message_is_valid(kind: PressKind, version: int) -> None:
    sim = PressSimulator(kind, seed=11)
    asset = Asset("press-1", "SN-1", sim.profile.asset_type)
    seen_status: set[str] = set()
    seen_events = 0
    for _ in range(1800):
        sim.step(2.0)
        payload = sim.payload(version)
        assert isinstance(payload, StatusV2 if version == 2 else StatusV1)
        message = build_message(SENDER, asset, payload)
        issues = VALIDATOR.validate(message)
        assert not issues, (sim.phase, issues)
        info = message["payload"]["signalstatus"]["deviceinfo"]
        seen_status.add(info["status"])
        seen_events += "event" in info
    expected = (
        {"Idle", "NonPoductive", "Production", "Stopped"}
        if version == 2
        else {"Idle", "Running", "Down"}
    )
    assert expected <= seen_status
    assert seen_events > 0


def test_v2_payload_describes_the_job() -> None:
    sim = PressSimulator("offset", seed=5)
    while sim.phase is not Phase.PRODUCTION:
        sim.step(1.0)
    sim.step(20)
    info = sim.status().to_payload()["signalstatus"]["deviceinfo"]
    assert info["status"] == "Production" and info["speed"] > 0
    assert info["productioncounter"] == sim.job_good
    assert info["totalproductioncounter"] == sim.total_impressions
    (phase,) = info["jobphase"]
    assert phase["jobid"] == sim.job_id and phase["status"] == "InProgress"
    assert sim.job_amount is not None and phase["amount"] == sim.job_amount
    assert float(phase["percentcompleted"]) == pytest.approx(
        100 * sim.job_good / sim.job_amount, abs=0.05
    )


def test_a_stop_reports_its_event_while_it_lasts() -> None:
    sim = PressSimulator("offset", seed=1).with_profile(stop_every_s=5.0)
    while sim.phase is not Phase.STOPPED:
        sim.step(1.0)
    first = sim.status()
    again = sim.status()
    assert first.status == "Stopped" and first.speed == 0
    assert first.event is not None and first.event.eventid and first.event.eventid.startswith("E-")
    assert again.event == first.event


def test_job_events_are_reported_once() -> None:
    sim = PressSimulator("digital", seed=2)
    while sim.phase is Phase.IDLE:
        sim.step(1.0)
    first = sim.status()
    assert first.event is not None and first.event.eventid == "JobStarted"
    assert sim.status().event is None


def test_same_seed_same_press_different_seed_different_press() -> None:
    def run(seed: int) -> list[tuple[Phase, float]]:
        return trace(PressSimulator("offset", seed=seed), 1800)

    assert run(9) == run(9)
    assert run(9) != run(10)


def test_long_steps_behave_like_short_ones() -> None:
    a = PressSimulator("offset", seed=4)
    b = PressSimulator("offset", seed=4)
    a.step(600)
    for _ in range(600):
        b.step(1.0)
    assert (a.phase, a.good_sheets, a.total_impressions) == (
        b.phase,
        b.good_sheets,
        b.total_impressions,
    )


@pytest.mark.parametrize("kind", list(PressKind))
@pytest.mark.parametrize("seed", [0, 7, 42])
def test_a_press_started_in_production_prints_from_the_first_status(
    kind: PressKind, seed: int
) -> None:
    sim = PressSimulator(kind, seed=seed, start_phase=Phase.PRODUCTION)
    first = sim.status()
    assert sim.phase is Phase.PRODUCTION
    assert first.speed is not None
    low, high = profile_for(kind).speed_range
    assert low <= first.speed <= high
    assert first.event is not None and first.event.eventid == "JobStarted"
    job = sim.job_id
    sim.step(10)
    assert sim.job_id == job
    assert sim.job_good > 0  # sheets printed in ten seconds
    assert sim.status().productioncounter == sim.job_good
    # Then the usual cycle: the job ends with a wash-up and the press idles.
    phases = [p for p, _ in trace(sim, 3600)]
    assert Phase.WASHUP in phases and Phase.IDLE in phases and sim.jobs_completed >= 1
    for (a, _), (b, _) in itertools.pairwise(trace(sim, 600)):
        assert a == b or (a, b) in ALLOWED


def test_with_profile_keeps_the_start_phase() -> None:
    sim = PressSimulator("offset", seed=3, start_phase=Phase.PRODUCTION)
    stopping = sim.with_profile(stop_every_s=5.0)
    assert stopping.phase is Phase.PRODUCTION and stopping.speed > 0
    assert stopping.profile.stop_every_s == 5.0
    stops = [e for e in stopping.run(60) if e.kind == "stop"]
    assert stops, "a press that stops every 5 s did not stop in a minute"


def test_bad_arguments() -> None:
    sim = PressSimulator()
    with pytest.raises(ValueError, match="version 3"):
        sim.payload(3)
    with pytest.raises(ValueError, match="seconds"):
        sim.step(-1)
    with pytest.raises(ValueError):
        PressSimulator("flexo")
    with pytest.raises(ValueError, match="total_impressions_start"):
        PressSimulator(total_impressions_start=-1)
    with pytest.raises(ValueError, match="start_phase"):
        PressSimulator(start_phase=Phase.WASHUP)
