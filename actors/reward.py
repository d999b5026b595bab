"""The reward actor: accuracy, format and r_visual per rollout, combined as SPEC.md §5.

r_visual comes from the attention statistics of the response span, computed by an HF scorer
model that holds the current policy weights (it receives every weight sync, like the rollout
workers). A rollout whose scoring raises gets reward 0, is counted and logged with its sample
id; the rest of the batch goes on. The maths are the pure functions of ``rewards``.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from actors.policy import encode_rollouts
from actors.records import Rollout, Scored
from actors.recovery import ActorSet
from actors.weight_sync import WeightHandle, fetch_buckets, iter_buckets, load_into_module
from avar_ray.data.schema import Sample

log = logging.getLogger(__name__)


@dataclass
class ScorerSpec:
    model_path: str
    dtype: str = "float32"
    lambda_v: float = 0.3
    lambda_f: float = 0.1
    visual_norm: str = "none"
    visual_layers: Optional[list[int]] = None
    eps: float = 1e-6
    batch_size: int = 8
    visual_gate: bool = True  # False: r_visual for wrong answers too (an ablation of SPEC.md §5's gate)
    chunk_size: int = 256
    system_prompt: Optional[str] = None


def text_rewards(rollout: Rollout, sample: Sample) -> tuple[float, float]:
    """(r_acc, r_format) of one rollout."""
    from rewards import accuracy_reward, format_reward

    acc = accuracy_reward(rollout.text, sample.answer, sample.answer_type, sample.choices or None, sample.precision)
    return float(acc), float(format_reward(rollout.text))


class RewardScorer:
    """Holds the scorer model; ``score`` turns a step's rollouts into one scalar each."""

    def __init__(self, spec: ScorerSpec):
        from avar_ray.modeling import load_model, load_processor

        torch.manual_seed(0)
        self.spec = spec
        self.version = 0
        self.processor = load_processor(spec.model_path)
        self.model = load_model(spec.model_path, dtype=spec.dtype, attn_implementation="avar").eval()
        self.errors_total = 0

    def ready(self) -> dict:
        return {"pid": os.getpid(), "version": self.version}

    def update_weights(self, handle: WeightHandle) -> float:
        start = time.perf_counter()
        load_into_module(self.model, iter_buckets(fetch_buckets(handle)))
        self.version = handle.version
        return time.perf_counter() - start

    def response_vas(self, samples: Sequence[Sample], rollouts: Sequence[Rollout]) -> list[float]:
        """The response-span VAS of each rollout (one forward with attention statistics)."""
        from avar_ray.attention import attention_statistics
        from rewards import visual_ratio

        encoded = encode_rollouts(self.processor, samples, [r.response_ids for r in rollouts], self.spec.system_prompt)
        with torch.no_grad():
            _, stats = attention_statistics(self.model, encoded, query="response", layers=self.spec.visual_layers,
                                            chunk_size=self.spec.chunk_size)
        out = []
        for b in range(len(rollouts)):
            mass_v, mass_s = stats.sample(b)
            out.append(visual_ratio(mass_v, mass_s, eps=self.spec.eps))
        return out

    def _vas_isolating(self, samples, rollouts, ids) -> tuple[list[float], dict[int, str]]:
        """VAS of a chunk; if the batched pass raises, row by row, so that one bad rollout
        costs only its own reward."""
        try:
            return self.response_vas(samples, rollouts), {}
        except Exception:  # noqa: BLE001 - isolate below, then report per rollout
            if len(rollouts) == 1:
                raise
        values, errors = [], {}
        for i, (sample, rollout) in enumerate(zip(samples, rollouts)):
            try:
                values.extend(self.response_vas([sample], [rollout]))
            except Exception as exc:  # noqa: BLE001 - a scoring failure is this rollout's, not the batch's
                values.append(math.nan)
                errors[ids[i]] = f"{type(exc).__name__}: {exc}"
        return values, errors

    def score(self, rollouts: list[Rollout], samples: dict[str, Sample]) -> list[Scored]:
        """One ``Scored`` per rollout, in order; GRPO groups are the rollouts' ``prompt_index``."""
        from rewards import combine_rewards

        n = len(rollouts)
        acc, fmt, vas = np.zeros(n), np.zeros(n), np.full(n, math.nan)
        errors: dict[int, str] = {}
        for i, r in enumerate(rollouts):
            try:
                acc[i], fmt[i] = text_rewards(r, samples[r.sample_id])
            except Exception as exc:  # noqa: BLE001
                errors[i] = f"{type(exc).__name__}: {exc}"
        size = self.spec.batch_size
        for start in range(0, n, size):
            ids = [i for i in range(start, min(start + size, n)) if i not in errors]
            if not ids:
                continue
            try:
                values, bad = self._vas_isolating([samples[rollouts[i].sample_id] for i in ids],
                                                  [rollouts[i] for i in ids], ids)
            except Exception as exc:  # noqa: BLE001
                values, bad = [math.nan], {ids[0]: f"{type(exc).__name__}: {exc}"}
            errors.update(bad)
            for i, v in zip(ids, values):
                vas[i] = v
        gate = acc >= 0.5 if self.spec.visual_gate else np.ones(n, dtype=bool)
        visual = np.where(gate & np.isfinite(vas), vas, 0.0)
        ok = np.array([i not in errors for i in range(n)])
        group_ids = np.array([r.prompt_index for r in rollouts])
        total = combine_rewards(np.where(ok, acc, 0.0), np.where(ok, fmt, 0.0), np.where(ok, visual, 0.0),
                                lambda_v=self.spec.lambda_v, lambda_f=self.spec.lambda_f,
                                visual_norm=self.spec.visual_norm, group_ids=group_ids)
        for i, message in sorted(errors.items()):
            log.warning("reward: scoring rollout %d of sample %s failed, reward 0: %s", i, rollouts[i].sample_id, message)
        self.errors_total += len(errors)
        return [Scored(float(total[i]) if ok[i] else 0.0, float(acc[i]) if ok[i] else 0.0,
                       float(fmt[i]) if ok[i] else 0.0, float(visual[i]) if ok[i] else 0.0,
                       float(vas[i]), errors.get(i, "")) for i in range(n)]


class RewardService(ActorSet):
    """The reward actor, driven from the driver; restarted and re-synced if it dies."""

    def __init__(self, spec: ScorerSpec, actor_options: dict, max_attempts: int = 3):
        super().__init__(RewardScorer, [(spec,)], actor_options, max_attempts, "reward actor")

    def score(self, rollouts: list[Rollout], samples: dict[str, Sample]) -> list[Scored]:
        return self.call([(0, "score", (rollouts, samples))])[0]
