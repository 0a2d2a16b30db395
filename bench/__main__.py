"""Run every benchmark module and write ``bench/results.json``.

``python -m bench [NAME ...]`` runs the modules ``bench/bench_NAME.py`` (all by default).
"""

from __future__ import annotations

import importlib
import json
import platform
import sys
import time
import traceback
from pathlib import Path

from bench.harness import BenchContext, Figure

HERE = Path(__file__).parent


def main(argv: list[str]) -> int:
    names = argv or sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    ctx = BenchContext()
    figures: list[Figure] = []
    failed: list[str] = []
    try:
        for name in names:
            module = importlib.import_module(f"bench.bench_{name}")
            print(f"== {name}", flush=True)
            started = time.perf_counter()
            try:
                got: list[Figure] = module.run(ctx)
            except Exception:
                traceback.print_exc()
                failed.append(name)
                continue
            for fig in got:
                print(f"  {fig.name:<50} {fig.value:>14.4g} {fig.unit}  {fig.note}", flush=True)
            figures.extend(got)
            print(f"   ({time.perf_counter() - started:.1f} s)", flush=True)
    finally:
        ctx.close()
    merged: dict[str, dict[str, object]] = {}
    results_path = HERE / "results.json"
    if argv and results_path.exists():
        # A partial run (named benchmarks) updates its figures and keeps the others.
        merged = json.loads(results_path.read_text()).get("figures", {})
    merged.update({f.name: {"value": f.value, "unit": f.unit, "note": f.note} for f in figures})
    results = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "figures": merged,
    }
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {HERE / 'results.json'} ({len(figures)} figures)")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
