"""Write the measured figures of ``bench/results.json`` into ``docs/benchmarks.md``.

The table between the ``<!-- figures:begin -->`` and ``<!-- figures:end -->`` markers is
replaced; the prose around it is kept. ``make bench`` runs this after the benchmarks, so
the figures in the documentation always come from a run, never from hand. A figure the
results do not have (a partial run, ``make bench BENCH=cli``, in a checkout without
``bench/results.json``) keeps its row from the earlier run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results.json"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- figures:begin -->"
END = "<!-- figures:end -->"


def _value(value: float) -> str:
    if value == 0 or 0.01 <= abs(value) < 100_000:
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:.3g}"


def earlier_rows(table: str) -> dict[str, str]:
    """The rows of a rendered table, by figure name."""
    rows = {}
    for line in table.splitlines():
        if line.startswith("| `") and "` |" in line:
            rows[line[3 : line.index("` |")]] = line
    return rows


def render(results: dict[str, object], earlier: dict[str, str] | None = None) -> str:
    figures = results.get("figures", {})
    assert isinstance(figures, dict)
    machine = results.get("machine", {})
    kept = {name: row for name, row in (earlier or {}).items() if name not in figures}
    lines = [
        BEGIN,
        "",
        f"Run of {results.get('generated_at', '?')} on {machine.get('platform', '?')}"  # type: ignore[union-attr]
        f" (Python {machine.get('python', '?')})"  # type: ignore[union-attr]
        + (
            f"; {len(kept)} figures not measured in that run are kept from an earlier run."
            if kept
            else "."
        ),
        "",
        "| figure | value | unit | how |",
        "| --- | ---: | --- | --- |",
    ]
    rows = dict(kept)
    for name, fig in figures.items():
        note = str(fig.get("note", "")).replace("|", "\\|")
        rows[name] = f"| `{name}` | {_value(float(fig['value']))} | {fig['unit']} | {note} |"
    lines += [rows[name] for name in sorted(rows)]
    lines += ["", END]
    return "\n".join(lines)


def main() -> int:
    if not RESULTS.exists():
        print(f"no {RESULTS}; run 'make bench' first", file=sys.stderr)
        return 1
    results = json.loads(RESULTS.read_text())
    text = DOC.read_text() if DOC.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    old_table, tail = rest.split(END, 1)
    DOC.write_text(head + render(results, earlier_rows(old_table)) + tail)
    print(f"updated {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
