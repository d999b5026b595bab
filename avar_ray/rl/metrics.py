"""Per-step RL metrics: the reward parts, accuracy, the responses' VAS and lengths (a pure
summary of the step's rollouts), plus the learner's statistics and the phase timings; written
through the tracker (``avar_ray.tracking``: ``metrics.jsonl``, TensorBoard, W&B, MLflow) and as a
progress line."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from actors.records import Rollout, Scored
from avar_ray.config import TrackingConfig
from avar_ray.tracking import METRICS, Tracker, read_metrics  # noqa: F401  (read_metrics: the driver's)

# The phases of a step, in order (the keys "time/<phase>" of every record).
PHASES = ("sample", "rollout", "reward", "advantage", "update", "weight_sync", "checkpoint")


def _mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def rollout_metrics(rollouts: Sequence[Rollout], scored: Sequence[Scored], advantages: Sequence[float]) -> dict:
    """What the step's rollouts and rewards say (no Ray, no model): means over rollouts."""
    lengths = [len(r.response_ids) for r in rollouts]
    versions = [r.policy_version for r in rollouts]
    return {
        "reward/total": _mean(s.total for s in scored),
        "reward/accuracy": _mean(s.accuracy for s in scored),
        "reward/format": _mean(s.format for s in scored),
        "reward/visual": _mean(s.visual for s in scored),
        "reward/errors": sum(1 for s in scored if s.error),
        "vas/response": _mean(s.vas for s in scored),  # every rollout, correct or not
        "response/length_mean": _mean(lengths),
        "response/length_max": max(lengths, default=0),
        "response/clipped": _mean(1.0 if r.finish_reason == "length" else 0.0 for r in rollouts),
        # the behaviour policy's (vLLM's) mean log-prob per sampled token
        "rollout/logprob_mean": _mean(lp for r in rollouts for lp in r.logprobs),
        "advantage/abs_mean": _mean(abs(a) for a in advantages),
        "rollout/count": len(rollouts),
        "rollout/policy_version_min": min(versions, default=-1),
        "rollout/policy_version_max": max(versions, default=-1),
    }


class MetricsWriter(Tracker):
    """The RL step metrics through the one tracker (``metrics.jsonl`` always, plus the
    backends of ``tracking``) and a tqdm bar. A
    resumed run keeps the records up to its checkpoint's step and drops any written after it
    (they are redone)."""

    def __init__(self, out: Path, total_steps: int, start_step: int,
                 tracking: Optional[TrackingConfig] = None, run_config: Optional[dict] = None) -> None:
        tracking = tracking if tracking is not None else TrackingConfig()
        super().__init__(tracking, out, "rl", run_config, start_step, total_steps, progress_line, always=("jsonl",))
        self.path = Path(out) / METRICS


def progress_line(record: dict) -> str:
    def f(key: str, fmt: str = ".3g") -> str:
        value = record.get(key)
        return "n/a" if value is None else format(value, fmt)

    return (f"reward {f('reward/total')} acc {f('reward/accuracy', '.2f')} vas {f('vas/response')} "
            f"len {f('response/length_mean', '.1f')} step {f('time/step', '.1f')}s")
