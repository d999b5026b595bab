"""Names of the files an eval run writes, and strict-JSON output (shared by eval and analyze)."""
from __future__ import annotations

import math
from typing import Any

RESULTS = "results.json"
SAMPLES = "samples.jsonl"
REPORT = "report.md"
PLOTS = "plots"


def jsonable(value: Any) -> Any:
    """NaN / inf -> None, recursively (results stay strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
