"""A simulated printing press, for ``iotref run``, demos and tests.

Owns the behaviour of one press (sheetfed offset or digital) over simulated time: its
phases (idle -> make-ready -> production -> wash-up -> idle, with occasional stops during
production; a press starts idle or already printing a job), its speed (ramped, never
jumping, except an emergency stop), its counters and the ``generic.signal``/``Status``
payloads (v2, and v1 on request) built from them with the typed builders of
:mod:`iotref.device.telemetry.messages`.

Pure: no I/O, no clock and no global random state. Time only moves when :meth:`step` is
called, randomness comes from a :class:`random.Random` seeded by the caller, so the same
seed and the same steps give the same press. Counters of the press's life
(``good_sheets``, ``waste_sheets``, ``total_impressions``) never decrease; the job's own
counters start at zero with each job.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Final, Literal

from iotref.device.stdlib_compat import StrEnum
from iotref.device.telemetry.messages import (
    AssetType,
    DeviceStatusDetailsV1,
    DeviceStatusV1,
    DeviceStatusV2,
    Event,
    JobPhaseStatusV1,
    JobPhaseStatusV2,
    JobPhaseV1,
    JobPhaseV2,
    Part,
    StatusV1,
    StatusV2,
)

__all__ = [
    "DEFAULT_START",
    "DIGITAL",
    "OFFSET",
    "Phase",
    "PressEvent",
    "PressKind",
    "PressProfile",
    "PressSimulator",
    "profile_for",
]

DEFAULT_START: Final = datetime(2026, 1, 1, 6, 0, tzinfo=timezone.utc)
"""Simulated time at which a press starts when no ``start`` is given."""


class PressKind(StrEnum):
    OFFSET = "offset"
    DIGITAL = "digital"


class Phase(StrEnum):
    """Where the press is. The usual cycle is ``IDLE -> MAKEREADY -> PRODUCTION -> WASHUP
    -> IDLE``; ``PRODUCTION`` may be interrupted by ``STOPPED`` and resumes after it."""

    IDLE = "idle"
    MAKEREADY = "makeready"
    PRODUCTION = "production"
    STOPPED = "stopped"
    WASHUP = "washup"


@dataclass(frozen=True)
class PressProfile:
    """How a kind of press behaves. Speeds in sheets per hour, durations in seconds of
    simulated time. Durations are short compared with a real shop so that a few minutes of
    simulation show whole jobs."""

    kind: PressKind
    asset_type: AssetType
    speed_range: tuple[float, float]
    """Production speed of a job, drawn per job."""
    makeready_speed: float
    """Speed while making ready (sheets run for register and colour, all waste)."""
    ramp: float
    """How fast the speed changes, sheets per hour per second."""
    makeready_s: tuple[float, float]
    washup_s: tuple[float, float]
    idle_s: tuple[float, float]
    job_sheets: tuple[int, int]
    waste_rate: float
    """Share of waste at full speed; more while ramping up."""
    stop_every_s: float
    """Mean production time between stops (0: never stops)."""
    stop_s: tuple[float, float]
    impressions_per_sheet: int


OFFSET: Final = PressProfile(
    kind=PressKind.OFFSET,
    asset_type=AssetType.SHEETFED_PRESS,
    speed_range=(10_000.0, 16_000.0),
    makeready_speed=3_000.0,
    ramp=1_500.0,
    makeready_s=(15.0, 45.0),
    washup_s=(8.0, 20.0),
    idle_s=(5.0, 20.0),
    job_sheets=(300, 1_500),
    waste_rate=0.02,
    stop_every_s=150.0,
    stop_s=(5.0, 25.0),
    impressions_per_sheet=1,
)
DIGITAL: Final = PressProfile(
    kind=PressKind.DIGITAL,
    asset_type=AssetType.DIGITAL_PRINTER,
    speed_range=(3_000.0, 4_600.0),
    makeready_speed=0.0,
    ramp=3_000.0,
    makeready_s=(2.0, 8.0),
    washup_s=(1.0, 3.0),
    idle_s=(3.0, 12.0),
    job_sheets=(50, 600),
    waste_rate=0.005,
    stop_every_s=240.0,
    stop_s=(3.0, 15.0),
    impressions_per_sheet=2,
)

_STOP_REASONS: Final = (
    ("E-1001", "paper jam in the delivery"),
    ("E-1002", "double sheet detected"),
    ("E-2003", "ink level low"),
    ("E-3010", "safety guard opened"),
    ("E-4002", "pile exhausted at the feeder"),
)


def profile_for(kind: PressKind | str) -> PressProfile:
    """The built-in profile of ``"offset"`` or ``"digital"``."""
    return OFFSET if PressKind(kind) is PressKind.OFFSET else DIGITAL


@dataclass(frozen=True)
class PressEvent:
    """Something that happened during a :meth:`PressSimulator.step`."""

    at: datetime
    kind: Literal["phase", "stop", "resume", "job_started", "job_completed"]
    phase: Phase
    message: str
    code: str | None = None


@dataclass
class _Job:
    jobid: str
    amount: int
    target_speed: float
    started_at: datetime
    good: int = 0
    waste: int = 0


@dataclass
class _Counters:
    good: float = 0.0
    waste: float = 0.0
    frac_good: float = 0.0
    frac_waste: float = 0.0


@dataclass
class PressSimulator:
    """One simulated press. ``step(seconds)`` moves it on; ``status()`` describes it.

    ``seed`` makes it deterministic; ``start`` is its simulated clock's start;
    ``total_impressions`` the life counter it starts with (a press is rarely new);
    ``start_phase`` where it is at ``start``: ``IDLE`` (waiting for its first job) or
    ``PRODUCTION`` (a job made ready and printing at the job's speed).
    """

    kind: PressKind | str = PressKind.OFFSET
    seed: int = 0
    start: datetime = DEFAULT_START
    total_impressions_start: int | None = None
    start_phase: Phase = Phase.IDLE
    profile: PressProfile = field(init=False)
    now: datetime = field(init=False)
    phase: Phase = field(init=False, default=Phase.IDLE)
    speed: float = field(init=False, default=0.0)
    """Current speed, sheets per hour."""
    jobs_completed: int = field(init=False, default=0)
    stops: int = field(init=False, default=0)
    _rng: random.Random = field(init=False, repr=False)
    _phase_left: float = field(init=False, default=0.0, repr=False)
    _job: _Job | None = field(init=False, default=None, repr=False)
    _last_job: _Job | None = field(init=False, default=None, repr=False)
    _jobs_started: int = field(init=False, default=0, repr=False)
    _counters: _Counters = field(init=False, default_factory=_Counters, repr=False)
    _impressions: int = field(init=False, default=0, repr=False)
    _stop_reason: tuple[str, str] | None = field(init=False, default=None, repr=False)
    _pending_event: Event | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.kind = PressKind(self.kind)
        if self.start.tzinfo is None:
            raise ValueError("start must be a timezone-aware datetime")
        self.profile = profile_for(self.kind)
        self.now = self.start
        self._rng = random.Random(self.seed)
        if self.total_impressions_start is None:
            self._impressions = self._rng.randrange(1_000_000, 50_000_000)
        else:
            if self.total_impressions_start < 0:
                raise ValueError("total_impressions_start must be >= 0")
            self._impressions = self.total_impressions_start
        self.start_phase = Phase(self.start_phase)
        if self.start_phase not in (Phase.IDLE, Phase.PRODUCTION):
            raise ValueError(f"start_phase must be idle or production, not {self.start_phase}")
        self._begin()

    def _begin(self) -> None:
        """Set up the first phase (after the profile is final)."""
        self._phase_left = self._draw(self.profile.idle_s)
        if self.start_phase is Phase.PRODUCTION:
            self._start_job([])  # its JobStarted event is still reported with the first status
            self._enter(Phase.PRODUCTION, [], "production started")
            assert self._job is not None
            self.speed = self._job.target_speed

    # ------------------------------------------------------------------ views

    @property
    def good_sheets(self) -> int:
        """Good sheets over the press's life (in this simulation)."""
        return int(self._counters.good)

    @property
    def waste_sheets(self) -> int:
        """Waste sheets over the press's life (in this simulation)."""
        return int(self._counters.waste)

    @property
    def total_impressions(self) -> int:
        """The life impression counter (``totalproductioncounter``)."""
        return self._impressions

    @property
    def job_id(self) -> str | None:
        return self._job.jobid if self._job is not None else None

    @property
    def job_good(self) -> int:
        """Good sheets of the current job (``productioncounter``; 0 between jobs)."""
        return self._job.good if self._job is not None else 0

    @property
    def job_waste(self) -> int:
        return self._job.waste if self._job is not None else 0

    @property
    def job_amount(self) -> int | None:
        return self._job.amount if self._job is not None else None

    # ------------------------------------------------------------------ time

    def run(self, seconds: float, tick: float = 1.0) -> list[PressEvent]:
        """Step ``seconds`` in ticks of ``tick`` seconds; all events."""
        events: list[PressEvent] = []
        left = seconds
        while left > 1e-9:
            dt = min(tick, left)
            events += self.step(dt)
            left -= dt
        return events

    def step(self, seconds: float) -> list[PressEvent]:
        """Move simulated time on by ``seconds`` (sub-stepped to at most one second, so
        long steps behave like short ones); return what happened."""
        if seconds < 0 or not math.isfinite(seconds):
            raise ValueError("seconds must be a finite number >= 0")
        events: list[PressEvent] = []
        left = seconds
        while left > 1e-9:
            dt = min(1.0, left)
            self._tick(dt, events)
            left -= dt
        return events

    def _tick(self, dt: float, events: list[PressEvent]) -> None:
        self.now += timedelta(seconds=dt)
        p = self.profile
        phase = self.phase
        if phase is Phase.IDLE:
            self._ramp_to(0.0, dt)
            self._phase_left -= dt
            if self._phase_left <= 0:
                self._start_job(events)
        elif phase is Phase.MAKEREADY:
            self._ramp_to(p.makeready_speed, dt)
            self._run_sheets(dt, waste_share=1.0)
            self._phase_left -= dt
            if self._phase_left <= 0:
                self._enter(Phase.PRODUCTION, events, "production started")
        elif phase is Phase.PRODUCTION:
            job = self._job
            assert job is not None
            ramping = self.speed < job.target_speed * 0.95
            self._ramp_to(job.target_speed, dt)
            share = p.waste_rate * (5 if ramping else 1)
            self._run_sheets(dt, waste_share=min(1.0, share))
            if job.good >= job.amount:
                self._enter(Phase.WASHUP, events, f"job {job.jobid} printed; wash-up")
                self._phase_left = self._draw(p.washup_s)
            elif p.stop_every_s > 0 and self._rng.random() < dt / p.stop_every_s:
                self._stop(events)
        elif phase is Phase.STOPPED:
            self.speed = 0.0
            self._phase_left -= dt
            if self._phase_left <= 0:
                self._stop_reason = None
                self._enter(Phase.PRODUCTION, events, "production resumed", kind="resume")
        elif phase is Phase.WASHUP:
            self._ramp_to(0.0, dt)
            self._phase_left -= dt
            if self._phase_left <= 0 and self.speed == 0.0:
                self._finish_job(events)

    def _ramp_to(self, target: float, dt: float) -> None:
        step = self.profile.ramp * dt
        if self.speed < target:
            self.speed = min(target, self.speed + step)
        else:
            self.speed = max(target, self.speed - step)

    def _run_sheets(self, dt: float, waste_share: float) -> None:
        sheets = self.speed * dt / 3600.0
        if sheets <= 0:
            return
        c = self._counters
        c.frac_waste += sheets * waste_share
        c.frac_good += sheets * (1.0 - waste_share)
        waste = int(c.frac_waste)
        good = int(c.frac_good)
        c.frac_waste -= waste
        c.frac_good -= good
        job = self._job
        if job is not None and good:
            # Never print more good sheets than the job needs.
            good = min(good, max(0, job.amount - job.good))
        c.good += good
        c.waste += waste
        self._impressions += (good + waste) * self.profile.impressions_per_sheet
        if job is not None:
            job.good += good
            job.waste += waste

    def _draw(self, bounds: tuple[float, float]) -> float:
        return self._rng.uniform(*bounds)

    def _enter(
        self,
        phase: Phase,
        events: list[PressEvent],
        message: str,
        *,
        kind: Literal["phase", "stop", "resume", "job_started", "job_completed"] = "phase",
        code: str | None = None,
    ) -> None:
        self.phase = phase
        events.append(PressEvent(self.now, kind, phase, message, code))

    def _start_job(self, events: list[PressEvent]) -> None:
        p = self.profile
        self._jobs_started += 1
        job = _Job(
            jobid=f"JOB-{self.seed % 10_000:04d}-{self._jobs_started:05d}",
            amount=self._rng.randint(*p.job_sheets),
            target_speed=round(self._rng.uniform(*p.speed_range), -2),
            started_at=self.now,
        )
        self._job = job
        self._last_job = None
        self._pending_event = Event("JobStarted", job.jobid)
        events.append(
            PressEvent(self.now, "job_started", Phase.MAKEREADY, f"job {job.jobid} started")
        )
        self._enter(Phase.MAKEREADY, events, f"make-ready for {job.jobid}")
        self._phase_left = self._draw(p.makeready_s)

    def _stop(self, events: list[PressEvent]) -> None:
        code, text = self._rng.choice(_STOP_REASONS)
        self._stop_reason = (code, text)
        self.speed = 0.0
        self.stops += 1
        self._phase_left = self._draw(self.profile.stop_s)
        self._enter(Phase.STOPPED, events, f"stopped: {text}", kind="stop", code=code)

    def _finish_job(self, events: list[PressEvent]) -> None:
        job = self._job
        assert job is not None
        self.jobs_completed += 1
        self._last_job = job
        self._job = None
        self._pending_event = Event("JobCompleted", job.jobid)
        events.append(
            PressEvent(self.now, "job_completed", Phase.IDLE, f"job {job.jobid} completed")
        )
        self._enter(Phase.IDLE, events, "idle")
        self._phase_left = self._draw(self.profile.idle_s)

    # ------------------------------------------------------------------ payloads

    def _event(self) -> Event | None:
        if self._stop_reason is not None:
            return Event(*self._stop_reason)
        event, self._pending_event = self._pending_event, None
        return event

    def _details(self) -> str:
        return {
            Phase.IDLE: "waiting for the next job",
            Phase.MAKEREADY: "make-ready",
            Phase.PRODUCTION: "printing",
            Phase.STOPPED: "stopped: " + (self._stop_reason or ("", "fault"))[1],
            Phase.WASHUP: "wash-up",
        }[self.phase]

    def status(self) -> StatusV2:
        """The press now, as a Status v2 payload. A one-shot event (job started or
        completed) is reported once; a stop's event as long as the press stands."""
        status = {
            Phase.IDLE: DeviceStatusV2.IDLE,
            Phase.MAKEREADY: DeviceStatusV2.NON_PRODUCTIVE,
            Phase.PRODUCTION: DeviceStatusV2.PRODUCTION,
            Phase.STOPPED: DeviceStatusV2.STOPPED,
            Phase.WASHUP: DeviceStatusV2.NON_PRODUCTIVE,
        }[self.phase]
        phases: list[JobPhaseV2] = []
        job = self._job or self._last_job
        if job is not None:
            phase_status = {
                Phase.IDLE: JobPhaseStatusV2.COMPLETED,
                Phase.MAKEREADY: JobPhaseStatusV2.SETUP,
                Phase.PRODUCTION: JobPhaseStatusV2.IN_PROGRESS,
                Phase.STOPPED: JobPhaseStatusV2.STOPPED,
                Phase.WASHUP: JobPhaseStatusV2.CLEANUP,
            }[self.phase]
            done = min(100.0, 100.0 * job.good / job.amount) if job.amount else 0.0
            phases.append(
                JobPhaseV2(
                    jobid=job.jobid,
                    status=phase_status,
                    amount=job.amount,
                    statusdetails=self._details(),
                    workstepid=f"{job.jobid}-print",
                    starttime=job.started_at,
                    percentcompleted=f"{done:.1f}",
                    waste=str(job.waste),
                    part=[Part(side="Front", sheetname="Sheet 1")],
                )
            )
        return StatusV2(
            status=status,
            speed=round(self.speed),
            totalproductioncounter=self._impressions,
            statusdetails=self._details(),
            productioncounter=self.job_good,
            jobphase=phases or None,
            event=self._event(),
        )

    def status_v1(self) -> StatusV1:
        """The press now, as a Status v1 payload (``Running``/``Idle``/``Down``)."""
        if self.phase is Phase.STOPPED:
            status, details = DeviceStatusV1.DOWN, None
        elif self.phase is Phase.PRODUCTION:
            status, details = DeviceStatusV1.RUNNING, DeviceStatusDetailsV1.GOOD
        elif self.phase is Phase.MAKEREADY and self.speed > 0:
            status, details = DeviceStatusV1.RUNNING, DeviceStatusDetailsV1.WASTE
        else:
            status, details = DeviceStatusV1.IDLE, None
        jobphase = None
        job = self._job
        if job is not None and self.phase in (Phase.MAKEREADY, Phase.PRODUCTION, Phase.STOPPED):
            jobphase = JobPhaseV1(
                jobid=job.jobid,
                workstepid=f"{job.jobid}-print",
                status=(
                    JobPhaseStatusV1.SETUP
                    if self.phase is Phase.MAKEREADY
                    else JobPhaseStatusV1.IN_PROGRESS
                ),
                statusdetails=self._details(),
                amount=job.amount,
                percentcompleted=round(min(100.0, 100.0 * job.good / job.amount), 1),
                waste=job.waste,
            )
        return StatusV1(
            status=status,
            statusdetails=details,
            speed=round(self.speed),
            productioncounter=self.job_good,
            totalproductioncounter=self._impressions,
            jobphase=jobphase,
            event=self._event(),
        )

    def payload(self, version: int = 2) -> StatusV1 | StatusV2:
        """:meth:`status` (``version=2``) or :meth:`status_v1` (``version=1``)."""
        if version == 2:
            return self.status()
        if version == 1:
            return self.status_v1()
        raise ValueError(f"Status payload version {version} is not 1 or 2")

    def with_profile(self, **changes: object) -> PressSimulator:
        """A fresh simulator (same kind, seed, start and start phase) whose profile has
        ``changes``, e.g. ``stop_every_s=10`` for a press that stops a lot."""
        sim = PressSimulator(self.kind, self.seed, self.start, self.total_impressions_start)
        sim.profile = replace(sim.profile, **changes)  # type: ignore[arg-type]
        sim.start_phase = self.start_phase
        sim._begin()
        return sim
