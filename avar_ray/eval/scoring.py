"""Scoring one response and aggregating per-sample records into benchmark and overall figures.
Pure functions (no model): the rewards package decides what "correct" means, as in RL."""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from avar_ray.data.schema import Sample
from rewards import accuracy_reward, extract_answer, format_reward, is_correct

# Per-span metrics averaged into the summaries.
SPAN_METRICS = ("vas", "alpha_img", "eps_img", "alpha_sys")


def score_response(sample: Sample, response: str) -> dict[str, Any]:
    accuracy = accuracy_reward(response, sample.answer, sample.answer_type, sample.choices or None, sample.precision)
    return {"prediction": extract_answer(response), "correct": is_correct(accuracy), "accuracy": float(accuracy),
            "format": float(format_reward(response))}


def nanmean(values: Iterable[Optional[float]]) -> Optional[float]:
    """Mean of the finite values; None when there are none (JSON-friendly)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(finite)) if finite else None


def mean_profile(profiles: Sequence[Sequence[Optional[float]]]) -> list[Optional[float]]:
    """Element-wise ``nanmean`` of equal-length per-layer lists."""
    if not profiles:
        return []
    return [nanmean(column) for column in zip(*profiles)]


def summarise(records: Sequence[dict]) -> dict[str, Any]:
    """Accuracy, format rate and mean attention metrics of per-sample records.

    Keys: ``n``, ``accuracy``, ``format``; ``vas``/``alpha_img``/``eps_img``/``alpha_sys`` of
    the user span (the paper's VAS) and the same with a ``_response`` suffix; ``per_layer`` and
    ``per_layer_response`` (mean VAS per layer); ``layers``.
    """
    out: dict[str, Any] = {
        "n": len(records),
        "accuracy": nanmean(r["accuracy"] for r in records),
        "format": nanmean(r["format"] for r in records),
    }
    for span, suffix in (("user", ""), ("response", "_response")):
        for key in SPAN_METRICS:
            out[key + suffix] = nanmean(r["attention"][span][key] for r in records)
        out["per_layer" + suffix] = mean_profile([r["attention"][span]["per_layer"] for r in records])
    out["layers"] = records[0]["attention"]["user"]["layers"] if records else []
    return out


def results_summary(per_benchmark: dict[str, list[dict]], bad_rows: dict[str, dict]) -> dict[str, Any]:
    """``{"benchmarks": {name: summary + bad_rows}, "overall": summary over all samples +
    macro_accuracy (mean of the benchmarks' accuracies) + bad row totals}``."""
    benchmarks = {}
    for name, records in per_benchmark.items():
        benchmarks[name] = {**summarise(records), "bad_rows": bad_rows[name]}
    everything = [r for records in per_benchmark.values() for r in records]
    overall = summarise(everything)
    overall["macro_accuracy"] = nanmean(b["accuracy"] for b in benchmarks.values())
    reasons: dict[str, int] = {}
    for b in bad_rows.values():
        for reason, count in b["reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + count
    overall["bad_rows"] = {"count": sum(b["count"] for b in bad_rows.values()), "reasons": reasons}
    return {"benchmarks": benchmarks, "overall": overall}
