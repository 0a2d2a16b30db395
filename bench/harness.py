"""What a benchmark module gets and gives back.

A module ``bench/bench_<name>.py`` defines ``run(ctx: BenchContext) -> list[Figure]``.
``ctx.sandbox()`` starts one real sandbox (auto-approve, free ports, temporary data dir)
shared by every benchmark of the run; ``ctx.sandbox(*options)`` with other ``sandbox up``
options gets one of its own. Compare against a peer measured in the same run and report
the ratio: the machine is shared and noisy.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tests.support.sandbox_process import SandboxProcess


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class BenchContext:
    def __init__(self, workdir: Path | None = None) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="iotref-bench-")
        self.workdir = workdir or Path(self._tmp.name)
        self._sandboxes: dict[tuple[str, ...], SandboxProcess] = {}

    def sandbox(self, *args: str) -> SandboxProcess:
        running = self._sandboxes.get(args)
        if running is None:
            data_dir = self.workdir / f"sandbox{len(self._sandboxes) or ''}"
            running = SandboxProcess(
                data_dir, ["--auto-approve", "--poll-interval", "0", *args]
            ).start()
            self._sandboxes[args] = running
        return running

    def close(self) -> None:
        for running in self._sandboxes.values():
            running.stop()
        self._sandboxes.clear()
        self._tmp.cleanup()


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation."""
    if not values:
        raise ValueError("no values")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[
        max(0, min(998, round(q * 10) - 1))
    ]
