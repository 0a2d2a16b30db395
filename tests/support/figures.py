"""The figures tests record for ``make reliability`` (docs/reliability.md): one JSON line per
record, appended to the file named by ``$IOTREF_RELIABILITY_RESULTS`` when that is set,
read back by ``tests/reliability/report.py``."""

from __future__ import annotations

import json
import os
from typing import Any

RESULTS_ENV = "IOTREF_RELIABILITY_RESULTS"


def record(kind: str, data: dict[str, Any]) -> None:
    """Append one JSON line ``{"kind", **data}`` to ``$IOTREF_RELIABILITY_RESULTS``."""
    target = os.environ.get(RESULTS_ENV)
    if not target:
        return
    line = json.dumps({"kind": kind, **data}, sort_keys=True, default=str)
    with open(target, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
