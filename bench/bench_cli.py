"""CLI start-up: whole-process wall time of ``iotref --help`` and of ``iotref validate`` of
one file, beside ``python -c "import click"`` (the floor: the CLI is a click program)
measured in the same run.

The three commands run round-robin, so that the machine's noise falls on all of them; each
figure is the median of the rounds, and the ratio to the click baseline is the figure to
compare across runs. Goal: <= 0.2 s.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import BenchContext, Figure
from iotref.device.telemetry.messages import (
    Asset,
    AssetType,
    Sender,
    SenderType,
    StatusV2,
    build_message,
)

ROUNDS = 21
GOAL_S = 0.2


def _wall_time(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=60
    )
    return time.perf_counter() - started


def run(ctx: BenchContext) -> list[Figure]:
    message = build_message(
        Sender(SenderType.PRESS, "bench-gateway", "1.0.0"),
        Asset("asset-1", "SN-0001", AssetType.SHEETFED_PRESS),
        StatusV2("Production", 12000, 1_000_000),
    )
    path = Path(ctx.workdir) / "message.json"
    path.write_text(json.dumps(message))
    iotref = str(Path(sys.executable).with_name("iotref"))
    commands = {
        "click": [sys.executable, "-c", "import click"],
        "help": [iotref, "--help"],
        "validate": [iotref, "validate", str(path)],
    }
    for argv in commands.values():  # warm the file cache and the bytecode
        _wall_time(argv)
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(ROUNDS):
        for name, argv in commands.items():
            samples[name].append(_wall_time(argv))
    median = {name: statistics.median(values) for name, values in samples.items()}
    how = f"whole process, median of {ROUNDS} round-robin runs"
    figures = [
        Figure("cli.startup.import_click", median["click"], "s", f'python -c "import click"; {how}')
    ]
    for name, label in (("help", "iotref --help"), ("validate", "iotref validate FILE")):
        figures.append(
            Figure(f"cli.startup.{name}", median[name], "s", f"{label}; {how}; goal <= {GOAL_S}")
        )
        figures.append(
            Figure(
                f"cli.startup.{name}_vs_click",
                median[name] / median["click"],
                "x",
                f"{label} / import click, same run",
            )
        )
    return figures
