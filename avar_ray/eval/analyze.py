"""``run_analyze``: several evaluated models (``avar eval`` output directories) side by side: the
VAS-vs-accuracy scatter with Pearson's r and its p-value (the paper's r = 0.96 figure) and the
stage table (base → cold start → RL) with 95% intervals, as PNG and Markdown.

Intervals: Wilson's for an accuracy (from n and the rate), a seeded percentile bootstrap over the
samples (``samples.jsonl``) for the attention means; without ``samples.jsonl`` only the
accuracy gets one."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from avar_ray.eval import plots
from avar_ray.eval.report import STAGE_HEADER, analysis_report, stage_rows
from avar_ray.eval.files import RESULTS, SAMPLES, jsonable
from avar_ray.attention.vas import SYS_FLOOR

REPORT = "analysis.md"
SUMMARY = "analysis.json"
Z95 = 1.959963984540054
BOOTSTRAP = 2000
# Per-sample attention figures given intervals: (records key, span, key in the row).
SPAN_FIGURES = (("vas", "user", "vas"), ("vas_robust", "user", "vas_robust"), ("alpha_img", "user", "alpha_img"),
                ("vas_response", "response", "vas"), ("alpha_img_response", "response", "alpha_img"))


def wilson(rate: Optional[float], n: int) -> Optional[tuple[float, float]]:
    """Wilson's 95% interval of a proportion observed as ``rate`` over ``n`` trials."""
    if rate is None or n <= 0:
        return None
    centre = (rate + Z95 ** 2 / (2 * n)) / (1 + Z95 ** 2 / n)
    half = Z95 * math.sqrt(rate * (1 - rate) / n + Z95 ** 2 / (4 * n * n)) / (1 + Z95 ** 2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap(values: Sequence[float], seed: int = 0) -> Optional[tuple[float, float, float]]:
    """(mean, low, high): the mean of the finite values and its 95% percentile bootstrap interval."""
    import numpy as np

    x = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if len(x) == 0:
        return None
    means = x[np.random.default_rng(seed).integers(0, len(x), (BOOTSTRAP, len(x)))].mean(1)
    return float(x.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def intervals(run: dict) -> dict[str, Any]:
    """The 95% intervals of a run (see the module docstring) and how many heads are blind to S."""
    o = run["overall"]
    out: dict[str, Any] = {"accuracy": wilson(o["accuracy"], int(o["n"] or 0))}
    path = Path(run["dir"]) / SAMPLES
    if not path.is_file():
        return out
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for key, span, field in SPAN_FIGURES:
        out[key] = bootstrap([(r.get("attention") or {}).get(span, {}).get(field) for r in records])
    user = [(r.get("attention") or {}).get("user", {}) for r in records]
    heads = [(u.get("low_sys_heads"), u.get("heads")) for u in user if u.get("heads")]
    if heads:
        out["low_sys_heads"] = sum(a for a, _ in heads) / sum(b for _, b in heads)  # share of (layer, head) pairs
        out["low_sys_layers"] = max(u.get("low_sys_layers", 0) for u in user if u.get("heads"))
    out["low_sys_queries"] = bootstrap([u.get("low_sys_queries") for u in user])
    return out


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


def stage_figures(runs: Sequence[dict]) -> list[tuple[str, list]]:
    """The stage chart's panels: accuracy (%) and alpha_img of the user and response spans, each
    per run as (value, low, high) of its 95% interval, or the bare value where it has none."""
    def triple(value, ci, scale=1.0):
        if value is None:
            return None
        low, high = (ci[-2], ci[-1]) if ci else (value, value)
        return value * scale, low * scale, high * scale

    return [("accuracy (%)", [triple(run["overall"]["accuracy"], run["intervals"].get("accuracy"), 100) for run in runs]),
            ("alpha_img (Q=U)", [triple(run["overall"]["alpha_img"], run["intervals"].get("alpha_img")) for run in runs]),
            ("alpha_img (Q=R)", [triple(run["overall"].get("alpha_img_response"),
                                        run["intervals"].get("alpha_img_response")) for run in runs])]


def run_analyze(run_dirs: Sequence[str | Path], out_dir: str | Path,
                labels: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Read each run, write OUT/analysis.md, OUT/analysis.json, OUT/vas_vs_accuracy.png and
    OUT/stage_chart.png; return the summary (runs, r, p)."""
    if not run_dirs:
        raise ValueError("analyze: no run directories given")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"analyze: {len(labels)} labels for {len(run_dirs)} run directories")
    runs = [load_run(d, labels[i] if labels else None) for i, d in enumerate(run_dirs)]
    for run in runs:
        run["intervals"] = intervals(run)
    for run in runs:  # the robust companion: the mean of the per-sample ratios of means
        robust = run["intervals"].get("vas_robust")
        run["overall"].setdefault("vas_robust", robust[0] if robust else None)
    points = [(run["label"], run["overall"]["vas"], run["overall"]["accuracy"]) for run in runs
              if run["overall"]["vas"] is not None and run["overall"]["accuracy"] is not None]
    r, p = pearson([pt[1] for pt in points], [pt[2] for pt in points])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scored = [run for run in runs if run["overall"]["accuracy"] is not None]
    panels = [("VAS (Q=U)", [run["overall"]["vas"] for run in scored], r, p)]
    robust_points = [(run["overall"]["vas_robust"], run["overall"]["accuracy"]) for run in scored
                     if run["overall"]["vas_robust"] is not None]
    if robust_points:
        panels.append(("robust VAS (Q=U)", [run["overall"]["vas_robust"] for run in scored],
                       *pearson([x for x, _ in robust_points], [y for _, y in robust_points])))
    plots.vas_accuracy_scatter([run["label"] for run in scored], [run["overall"]["accuracy"] for run in scored],
                               panels, out / "vas_vs_accuracy.png")
    plots.stage_chart([run["label"] for run in runs], stage_figures(runs), out / "stage_chart.png")
    correlation = {"r": r, "p": p, "n": len(points)}
    figures = {"scatter": "vas_vs_accuracy.png", "stage_chart": "stage_chart.png"}
    (out / REPORT).write_text(analysis_report(runs, correlation, figures, SYS_FLOOR))
    summary = jsonable({
        "correlation": correlation,
        "runs": [{"label": run["label"], "dir": run["dir"], "model": run["model"], **{
            k: run["overall"][k] for k in ("n", "accuracy", "vas", "vas_response", "alpha_img")},
            "intervals": run["intervals"]} for run in runs],
    })
    (out / SUMMARY).write_text(json.dumps(summary, indent=2))
    return summary


def baselines_section(eval_file: str | Path, base: dict) -> str:
    """Markdown: the two chance baselines on the eval file (answering at random, always giving the
    most frequent answer) beside the warm base's own check (``base``: the demo's model stage)."""
    from avar_ray.data.schema import read_parquet
    from avar_ray.warm_base import baselines

    b = baselines(read_parquet(eval_file))
    lines = ["## Chance baselines on this eval set", "",
             f"- answering at random: {b['random'] * 100:.1f} %",
             f"- always answering `{b['most_frequent_answer']}` (the most frequent answer): "
             f"{b['most_frequent'] * 100:.1f} %", ""]
    if "check_accuracy" in base:
        cb = base["baselines"]
        lines += [f"The warm base (`{base.get('cache', '?')}`) answered {base['check_accuracy'] * 100:.1f} % of its "
                  f"own {base['check_n']} held-out procedural tasks (random {cb['random'] * 100:.1f} %, most frequent "
                  f"{cb['most_frequent'] * 100:.1f} %).", ""]
    return "\n".join(lines)
