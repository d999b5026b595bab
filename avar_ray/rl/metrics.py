"""Per-step RL metrics: the reward parts, accuracy, the responses' VAS and lengths (a pure
summary of the step's rollouts), plus the learner's statistics and the phase timings; written
as one JSON object per step to ``metrics.jsonl``, as TensorBoard scalars, and as a progress
line."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from actors.records import Rollout, Scored

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
        "advantage/abs_mean": _mean(abs(a) for a in advantages),
        "rollout/count": len(rollouts),
        "rollout/policy_version_min": min(versions, default=-1),
        "rollout/policy_version_max": max(versions, default=-1),
    }


def _clean(value):
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsWriter:
    """``metrics.jsonl`` + TensorBoard + a tqdm bar. A resumed run keeps the records up to its
    checkpoint's step and drops any written after it (they are redone)."""

    def __init__(self, out: Path, total_steps: int, start_step: int, tensorboard: bool) -> None:
        from tqdm import tqdm

        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        kept = read_metrics(self.path, upto=start_step) if start_step else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.jsonl = self.path.open("a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="rl", unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(f"rl/{key}", value, step)
            self.tb.flush()
        self.bar.update(1)
        self.bar.set_postfix_str(progress_line(record), refresh=True)

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.jsonl.close()


def progress_line(record: dict) -> str:
    def f(key: str, fmt: str = ".3g") -> str:
        value = record.get(key)
        return "n/a" if value is None else format(value, fmt)

    return (f"reward {f('reward/total')} acc {f('reward/accuracy', '.2f')} vas {f('vas/response')} "
            f"len {f('response/length_mean', '.1f')} step {f('time/step', '.1f')}s")


def read_metrics(path: Path, upto: int | None = None) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if upto is None or r["step"] <= upto]
