"""The figures of an API fuzzing run, counted from outside the sandbox: every request the
test's HTTP sessions sent, the answers by status class, and the checks' failures.

``FuzzTally.hook`` goes into a ``requests.Session``'s response hooks; ``failed()`` takes a
Schemathesis ``FailureGroup``. ``write()`` puts the figures into the JSON file named by
``$IOTREF_FUZZ_REPORT`` (when set) and records them for ``make reliability``
(kind ``api_fuzz_checks``, see :func:`tests.support.figures.record`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from tests.support.figures import record

REPORT_ENV = "IOTREF_FUZZ_REPORT"


class FuzzTally:
    def __init__(self, checks: list[str]) -> None:
        self.checks = checks
        self.requests = 0
        self.by_class: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.failed_operations: Counter[str] = Counter()

    def hook(self, response: Any, *_: Any, **__: Any) -> Any:
        self.requests += 1
        self.by_class[f"{response.status_code // 100}xx"] += 1
        return response

    def failed(self, group: Any, operation: str) -> None:
        """Count the failures of a Schemathesis ``FailureGroup`` (its ``exceptions``)."""
        for failure in group.exceptions:
            self.failures[str(getattr(failure, "title", type(failure).__name__))] += 1
        self.failed_operations[operation] += 1

    def figures(self, **extra: Any) -> dict[str, Any]:
        return {
            **extra,
            "checks": self.checks,
            "requests": self.requests,
            "by_class": dict(sorted(self.by_class.items())),
            "server_errors": self.by_class["5xx"],
            "failures": sum(self.failures.values()),
            "failures_by_check": dict(sorted(self.failures.items())),
            "failed_operations": dict(sorted(self.failed_operations.items())),
        }

    def write(self, **extra: Any) -> dict[str, Any]:
        figures = self.figures(**extra)
        target = os.environ.get(REPORT_ENV)
        if target:
            Path(target).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
        record("api_fuzz_checks", figures)
        return figures
