"""``run_analyze``: several evaluated models (``avar eval`` output directories) side by side: the
VAS-vs-accuracy scatter with Pearson's r and its p-value (the paper's r = 0.96 figure) and the
stage table (base → cold start → RL), as PNG and Markdown."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from avar_ray.eval import plots
from avar_ray.eval.report import STAGE_HEADER, analysis_report, stage_rows
from avar_ray.eval.files import RESULTS, jsonable

REPORT = "analysis.md"
SUMMARY = "analysis.json"


def load_run(run_dir: str | Path, label: Optional[str] = None) -> dict[str, Any]:
    """A run's results.json with its label (``label``, else the one eval stored, else the
    directory name) and directory; a clear error when the file is missing or malformed."""
    run_dir = Path(run_dir)
    path = run_dir / RESULTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {RESULTS} (is {run_dir} an `avar eval` output directory?)")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    overall = results.get("overall") if isinstance(results, dict) else None
    if not isinstance(overall, dict):
        raise ValueError(f"{path}: missing the 'overall' section")
    for key in ("accuracy", "vas", "vas_response", "alpha_img", "n"):
        if key not in overall:
            raise ValueError(f"{path}: overall.{key} is missing")
    return {**results, "label": label or results.get("label") or run_dir.name, "dir": str(run_dir),
            "model": results.get("model", "?"), "benchmarks": results.get("benchmarks", {})}


def pearson(x: Sequence[float], y: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    """Pearson's r and its two-sided p-value (scipy.stats.pearsonr); (None, None) when it is not
    defined: fewer than 2 points or a constant variable."""
    from scipy import stats

    if len(x) != len(y):
        raise ValueError(f"pearson: {len(x)} x values but {len(y)} y values")
    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return None, None
    result = stats.pearsonr(x, y)
    r, p = float(result.statistic), float(result.pvalue)
    return (r if math.isfinite(r) else None), (p if math.isfinite(p) else None)


def run_analyze(run_dirs: Sequence[str | Path], out_dir: str | Path,
                labels: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Read each run, write OUT/analysis.md, OUT/analysis.json, OUT/vas_vs_accuracy.png and
    OUT/stage_table.png; return the summary (runs, r, p)."""
    if not run_dirs:
        raise ValueError("analyze: no run directories given")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"analyze: {len(labels)} labels for {len(run_dirs)} run directories")
    runs = [load_run(d, labels[i] if labels else None) for i, d in enumerate(run_dirs)]
    points = [(run["label"], run["overall"]["vas"], run["overall"]["accuracy"]) for run in runs
              if run["overall"]["vas"] is not None and run["overall"]["accuracy"] is not None]
    r, p = pearson([pt[1] for pt in points], [pt[2] for pt in points])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots.vas_accuracy_scatter([pt[0] for pt in points], [pt[1] for pt in points], [pt[2] for pt in points], r, p,
                               out / "vas_vs_accuracy.png")
    plots.table_png(STAGE_HEADER, stage_rows(runs), "stages: accuracy and VAS", out / "stage_table.png")
    correlation = {"r": r, "p": p, "n": len(points)}
    figures = {"scatter": "vas_vs_accuracy.png", "stage_table": "stage_table.png"}
    (out / REPORT).write_text(analysis_report(runs, correlation, figures))
    summary = jsonable({
        "correlation": correlation,
        "runs": [{"label": run["label"], "dir": run["dir"], "model": run["model"], **{
            k: run["overall"][k] for k in ("n", "accuracy", "vas", "vas_response", "alpha_img")}} for run in runs],
    })
    (out / SUMMARY).write_text(json.dumps(summary, indent=2))
    return summary
