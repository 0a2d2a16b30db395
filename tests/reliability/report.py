"""``make reliability``: run the reliability scenarios at soak size together with the
hostile-input, isolation and secrets tests, and write ``docs/reliability.md`` from the
figures they recorded (never by hand).

``python -m tests.reliability.report [--short] [--runs N] [--output PATH]``

The tests append their figures as JSON lines to ``$IOTREF_RELIABILITY_RESULTS``
(:func:`tests.reliability.harness.record`); every test's outcome comes from pytest's JUnit
XML. The document is written even when a test fails (the failure is in it), and the
command exits with pytest's exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Any

from tests.support.figures import RESULTS_ENV

ROOT = Path(__file__).resolve().parents[2]
TEST_PATHS = [
    "tests/unit/test_fault_proxy.py",
    "tests/reliability",
    "tests/integration/test_device_hostile_input.py",
    "tests/integration/test_isolation.py",
    "tests/integration/test_secrets.py",
    "tests/integration/test_api_fuzz.py",
]
SECURITY_FILES = ("test_isolation", "test_secrets", "test_device_hostile_input")


def run_tests(results: Path, junit: Path, *, soak: bool, runs: int) -> int:
    """Run the tests with the recording switched on; returns pytest's exit code."""
    env = dict(os.environ)
    env[RESULTS_ENV] = str(results)
    env["IOTREF_SOAK"] = "1" if soak else "0"
    env["IOTREF_SOAK_RUNS"] = str(runs)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               f"--junitxml={junit}", *TEST_PATHS]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, env=env, check=False).returncode


def load_results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_outcomes(path: Path) -> list[dict[str, str]]:
    """Every test case of the JUnit XML: file, name, outcome, message."""
    if not path.exists():
        return []
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "FAILED", child.get("message", "")
            elif child.tag == "skipped":
                kind = child.get("type", "")
                outcome = "xfail (known bug)" if "xfail" in kind else "skipped"
                message = child.get("message", "")
        cases.append(
            {
                "file": case.get("classname", "").rsplit(".", 1)[-1],
                "name": case.get("name", ""),
                "outcome": outcome,
                "message": message.replace("\n", " ")[:400],
                "time": case.get("time", "0"),
            }
        )
    return cases


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _fmt_s(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} / {max(values):.2f}"


def _figures(record: dict[str, Any]) -> str:
    """A defaults record's figures as ``name: value`` pairs."""
    parts = []
    for key, value in record.items():
        if key in ("kind", "scenario"):
            continue
        shown = json.dumps(value) if isinstance(value, (dict, list)) else value
        parts.append(f"{key.replace('_', ' ')}: {shown}")
    return "; ".join(parts)


def render(
    results: list[dict[str, Any]], outcomes: list[dict[str, str]], *, soak: bool, took: float
) -> str:
    """The Markdown of ``docs/reliability.md``."""
    scenarios = [r for r in results if r["kind"] == "scenario"]
    by_name: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in scenarios:
        by_name[r["scenario"]].append(r)
    out = [
        "# Reliability and security figures",
        "",
        "Written by `make reliability` (`python -m tests.reliability.report`) from the figures "
        "the tests recorded; do not edit by hand.",
        "",
        f"- when: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"size: {'soak' if soak else 'short'}; whole run {took / 60:.1f} min; "
        f"machine: {os.cpu_count()} CPUs",
        "- sender: the device library (Connection + ShadowSync + Telemetry over the durable "
        "outbox) through a TCP fault proxy, with the shipped settings except a shortened "
        "keepalive (3 s, ping timeout 2 s, so that half-open stalls show within seconds); "
        "several assets; an operator changes desired state "
        "through the shadow REST API all along; an independent subscriber (operator "
        "identity, platform listener) counts deliveries; the sandbox's ingestion stores each "
        "`sendereventuuid` once in `telemetry.db`.",
        "- lost = accepted by `Telemetry.send` but never delivered (must be 0); duplicates "
        "delivered = extra deliveries of a message (QoS 1 allows them after a lost "
        "connection); duplicates stored = extra rows in the platform's store (must be 0); "
        "dropped by the platform = duplicates the ingestion recognised by `sendereventuuid`.",
        "",
        "## Scenarios",
        "",
    ]
    rows = []
    for name, runs in by_name.items():
        faults: dict[str, int] = defaultdict(int)
        for run in runs:
            for f in run["faults"]:
                faults[f["kind"]] += 1
        reconnects = [f["reconnect_s"] for r in runs for f in r["faults"] if f["reconnect_s"]]
        stored = all(r["stored_available"] for r in runs)
        rows.append(
            [
                name,
                len(runs),
                ", ".join(f"{k} x{n}" for k, n in faults.items()),
                sum(r["sent"] for r in runs),
                sum(r["received"] for r in runs),
                sum(r["lost"] for r in runs),
                sum(r["order_violations"] for r in runs),
                sum(r["duplicates_delivered"] for r in runs),
                sum(r["duplicates_stored"] for r in runs) if stored else "n/a",
                sum(r["stored_lost"] for r in runs) if stored else "n/a",
                sum(r["duplicates_dropped_by_platform"] for r in runs) if stored else "n/a",
                sum(r["desired_changes"] for r in runs),
                "yes" if all(r["final_reported_equals_desired"] for r in runs) else "NO",
                _fmt_s(reconnects),
                f"{runs[0]['backoff_bound_s']:g}",
            ]
        )
    out += _table(
        ["scenario", "runs", "faults injected", "sent", "received", "lost", "order violations",
         "duplicates delivered", "duplicates stored", "missing from store",
         "duplicates dropped by platform", "desired changes", "final reported == desired",
         "reconnect s (median / max)", "bound s (max backoff + connect timeout)"],
        rows,
    )  # fmt: skip
    if not rows:
        out += ["No scenario recorded figures (see the test outcomes below).", ""]

    defaults = [r for r in results if r["kind"] == "defaults"]
    out += [
        "## Faults under the shipped defaults",
        "",
        "Nothing shortened: the device library and `iotref run` as they ship "
        "(`tests/reliability/test_shipped_defaults.py`). Delivery is counted in the "
        "platform's store (`telemetry.db`, read directly), reconnect times from an "
        "independent probe of the broker's port to the device's CONNECTED.",
        "",
    ]
    out += _table(
        ["scenario", "figures"],
        [[d["scenario"], _figures(d)] for d in defaults],
    )
    if not defaults:
        out += ["Not run.", ""]

    out += ["## Faults", ""]
    fault_rows: dict[str, dict[str, Any]] = {}
    for r in scenarios:
        for f in r["faults"]:
            entry = fault_rows.setdefault(
                f["kind"], {"detail": f["detail"], "n": 0, "down": 0, "times": [], "bound": 0.0}
            )
            entry["n"] += 1
            entry["down"] += int(f["disconnected"])
            if f["reconnect_s"] is not None:
                entry["times"].append(f["reconnect_s"])
            entry["bound"] = f["bound_s"]
    out += _table(
        ["fault", "what was injected", "injected", "connection dropped",
         "reconnect s after healing (median / max)", "within bound"],
        [[k, v["detail"], v["n"], v["down"], _fmt_s(v["times"]),
          "yes" if all(t <= v["bound"] for t in v["times"]) else "NO"]
         for k, v in fault_rows.items()],
    )  # fmt: skip

    out += damaged_outbox_section(results)
    out += oversize_section(results)
    out += api_fuzz_section(results)

    hostile = [r for r in results if r["kind"] == "hostile_input"]
    out += ["## Hostile input on the device's shadow topics", ""]
    hostile_outcome = next(
        (o["outcome"] for o in outcomes if "malformed_shadow_answers" in o["name"]), "not run"
    )
    out += _table(
        ["input class", "payloads", "messages published", "result", "what the device did"],
        [[h["input_class"], h["payloads"], h["messages"], hostile_outcome, h["outcome"]]
         for h in hostile],
    )  # fmt: skip
    reports = [r for r in results if r["kind"] == "hostile_input_reports"]
    if reports:
        last = reports[-1]
        out += [
            f"Reported by the device: {last['ignored_warnings']} 'ignoring a non-JSON message' "
            f"warnings, {last['handler_errors']} handler errors logged.",
            "",
        ]

    out += ["## Security checks", ""]
    security = [r for r in results if r["kind"] == "security"]
    out += _table(["check", "outcome"], [[s["check"], s["outcome"]] for s in security])
    out += ["### Every test of the security and hostile-input files", ""]
    out += _table(
        ["file", "test", "result", "note"],
        [[o["file"], o["name"], o["outcome"], o["message"]]
         for o in outcomes if o["file"] in SECURITY_FILES],
    )  # fmt: skip

    findings = [o for o in outcomes if o["outcome"].startswith(("xfail", "FAILED"))]
    out += ["## Findings (known bugs, marked xfail until fixed) and failures", ""]
    out += _table(
        ["test", "result", "reason"],
        [[f"{o['file']}::{o['name']}", o["outcome"], o["message"]] for o in findings],
    )
    other = [r for r in results if r["kind"] == "finding"]
    for f in other:
        out += [f"- {f['name']}: injected {f['injected']}; outcome: {f['outcome']}"]
    out += ["", "## All tests run", ""]
    counts: dict[str, int] = defaultdict(int)
    for o in outcomes:
        counts[o["outcome"]] += 1
    out += [", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "none", ""]
    return "\n".join(out)


def damaged_outbox_section(results: list[dict[str, Any]]) -> list[str]:
    """``iotref run`` on a store whose outbox was damaged (tests/reliability/
    test_outbox_scenarios.py)."""
    runs = [
        r
        for r in results
        if r["kind"] == "outbox_scenario" and r.get("scenario") == "damaged outbox"
    ]
    out = [
        "## Damaged outbox",
        "",
        "`iotref run --stdin` with the shipped defaults on a provisioned store whose outbox "
        "held 300 queued messages and was then damaged; 20 new messages fed. Delivered and "
        "stored are counted by the independent subscriber and in the platform's store, by "
        "`sendereventuuid`; recovered is what the device said in its one warning line; "
        "lost = queued - delivered (unreadable from the damaged files).",
        "",
    ]
    if not runs:
        return [*out, "Not run.", ""]
    return out + _table(
        ["damage", "queued", "recovered (said)", "delivered from the queue",
         "stored from the queue", "lost", "new fed / delivered", "order violations",
         "duplicates stored", "left in outbox", "damaged files kept", "warning lines",
         "exit code", "iotref status reports it"],
        [[r["detail"], r["queued"], r["recovered_said"], r["delivered_from_queue"],
          r["stored_from_queue"], r["lost"], f"{r['new_fed']} / {r['new_delivered']}",
          r["order_violations"], r["duplicates_stored"], r["left_in_outbox"], r["kept_files"],
          r["warning_lines"], r["exit_code"], "yes" if r["status_reports_it"] else "NO"]
         for r in runs],
    )  # fmt: skip


def oversize_section(results: list[dict[str, Any]]) -> list[str]:
    """``iotref run --stdin`` with oversize lines and an outbox holding messages the
    broker refuses for good (tests/reliability/test_outbox_scenarios.py)."""
    runs = [
        r
        for r in results
        if r["kind"] == "outbox_scenario" and r.get("scenario") == "oversize message"
    ]
    out = [
        "## Oversize and refused messages",
        "",
        "`iotref run --stdin` fed 500 messages, every 100th of them 200 KB (over the "
        "128 KB payload limit); its outbox held 10 messages left by an earlier run, 2 for a "
        "topic the broker refuses (PUBACK 0x87) and 1 over the limit. Delivered, lost and "
        "order are counted by the independent subscriber, stored in the platform's store.",
        "",
    ]
    if not runs:
        return [*out, "Not run.", ""]
    return out + _table(
        ["fed", "oversize fed", "refused at send (size named)", "earlier queue",
         "refused for good, kept", "expected", "delivered", "lost", "stored",
         "refused ones delivered", "order violations", "duplicates stored",
         "left in outbox", "exit code"],
        [[r["fed"], r["oversize_fed"],
          f"{r['refused_at_send']} ({'yes' if r['sizes_named'] else 'NO'})", r["seeded"],
          f"{r['refused_by_platform_kept']} ({', '.join(r['refusal_reasons'])})",
          r["expected"], r["delivered"], r["lost"], r["stored"], r["oversize_delivered"],
          r["order_violations"], r["duplicates_stored"], r["left_in_outbox"], r["exit_code"]]
         for r in runs],
    )  # fmt: skip


def api_fuzz_section(results: list[dict[str, Any]]) -> list[str]:
    """The HTTP API fuzzing of tests/integration/test_api_fuzz.py: requests and answers."""
    runs = [r for r in results if r["kind"] == "api_fuzz_checks"]
    out = [
        "## HTTP API fuzzing",
        "",
        "Schemathesis against the sandbox's OpenAPI description (every operation, positive "
        "and negative inputs, with valid, missing and wrong credentials), the success "
        "answers random inputs do not reach, and hostile bodies; every answer tallied by "
        "status class, every Schemathesis check applied (tests/integration/test_api_fuzz.py).",
        "",
    ]
    if not runs:
        return [*out, "Not run.", ""]
    return out + _table(
        ["operations", "examples per operation (seed)", "requests sent", "2xx", "3xx",
         "4xx", "5xx", "check failures"],
        [[r["operations"], f"{r['examples_per_operation']} ({r['seed']})", r["requests"],
          r["by_class"].get("2xx", 0), r["by_class"].get("3xx", 0),
          r["by_class"].get("4xx", 0), r["server_errors"], r["failures"]]
         for r in runs],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="short size (as in make test)")
    parser.add_argument("--runs", type=int, default=2, help="runs of each scenario")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "reliability.md")
    args = parser.parse_args(argv)
    soak = not args.short
    with tempfile.TemporaryDirectory(prefix="iotref-reliability-") as tmp:
        results, junit = Path(tmp) / "results.jsonl", Path(tmp) / "junit.xml"
        started = time.monotonic()
        code = run_tests(results, junit, soak=soak, runs=args.runs)
        text = render(
            load_results(results),
            load_outcomes(junit),
            soak=soak,
            took=time.monotonic() - started,
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {args.output} (pytest exit code {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
