"""The reward actor: the text rewards (accuracy, format) per rollout, and their combination
with r_visual as SPEC.md §5. It holds no model: r_visual comes from the learners' own no-grad
pass (``actors.learner.Learner.score``), for the rollouts the gate lets through.

A step calls it twice: ``text`` first (so that, with the gate on, the learners compute the
attention statistics of the correct answers only), then ``combine``. A rollout whose scoring
raised or overran its time limit gets reward 0, is counted and logged with its sample id; the
rest go on. The text rewards run in a pool of processes (``actors.reward_pool``); the maths are
the pure functions of ``rewards``, the combination in one place (``rewards.combine_rewards``).
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np

from actors.records import Rollout, Scored
from actors.recovery import ActorSet
from avar_ray.data.schema import Sample

log = logging.getLogger(__name__)


def needs_visual(text: Sequence[tuple[float, float, str]], gate: bool) -> list[bool]:
    """Which rollouts need r_visual: the correct ones under the gate (SPEC.md §5), all without it."""
    from rewards import is_correct

    return [not err and (not gate or is_correct(acc)) for acc, _, err in text]


class RewardScorer:
    """``reward`` is the ``rl.reward`` config section; ``workers`` the scoring processes
    (``rl.placement.reward_workers``, started at the first ``text`` call)."""

    def __init__(self, reward, workers: int = 1):
        self.reward, self.workers = reward, workers
        self.errors_total = 0
        self.pool = None

    def ready(self) -> dict:
        from avar_ray.ray_utils import where_am_i

        return where_am_i()

    def text(self, rollouts: list[Rollout], samples: dict[str, Sample]) -> list[tuple[float, float, str]]:
        """``(r_acc, r_format, error)`` per rollout, in order, scored in parallel by the pool
        (``actors.reward_pool``; a verification past ``reward.verify_timeout_s`` scores 0)."""
        from actors.reward_pool import TextScorerPool

        if self.pool is None:
            self.pool = TextScorerPool(self.workers, self.reward.verify_timeout_s)
        jobs = [(r.text, s.answer, s.answer_type, s.choices, s.precision)
                for r, s in ((r, samples[r.sample_id]) for r in rollouts)]
        return self.pool.score(jobs, [r.sample_id for r in rollouts])

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def combine(self, rollouts: list[Rollout], text: Sequence[tuple[float, float, str]], vas: Sequence[float],
                errors: Sequence[str]) -> list[Scored]:
        """One ``Scored`` per rollout: SPEC.md §5's sum, GRPO groups = ``prompt_index``.
        ``vas``: the learners' response VAS (nan where not computed); ``errors``: theirs."""
        from rewards import combine_rewards

        cfg = self.reward
        n = len(rollouts)
        acc = np.array([t[0] for t in text], dtype=np.float64)
        fmt = np.array([t[1] for t in text], dtype=np.float64)
        vas = np.array(vas, dtype=np.float64)
        messages = {i: t[2] or errors[i] for i, t in enumerate(text) if t[2] or errors[i]}
        wanted = np.array(needs_visual(text, cfg.visual_gate))
        visual = np.where(wanted & np.isfinite(vas), vas, 0.0)
        ok = np.array([i not in messages for i in range(n)])
        total = combine_rewards(np.where(ok, acc, 0.0), np.where(ok, fmt, 0.0), np.where(ok, visual, 0.0),
                                lambda_v=cfg.lambda_v, lambda_f=cfg.lambda_f, visual_norm=cfg.visual_norm,
                                group_ids=np.array([r.prompt_index for r in rollouts]),
                                accuracy_weight=cfg.accuracy_weight)
        for i, message in sorted(messages.items()):
            log.warning("reward: rollout %d of sample %s failed, reward 0: %s", i, rollouts[i].sample_id, message)
        self.errors_total += len(messages)
        return [Scored(float(total[i]) if ok[i] else 0.0, float(acc[i]) if ok[i] else 0.0,
                       float(fmt[i]) if ok[i] else 0.0, float(visual[i]) if ok[i] else 0.0,
                       float(vas[i]) if math.isfinite(vas[i]) else math.nan, messages.get(i, "")) for i in range(n)]


class RewardService(ActorSet):
    """The reward actor, driven from the driver; restarted if it dies (it holds no weights)."""

    def __init__(self, reward, actor_options: dict, max_attempts: int, workers: int = 1):
        super().__init__(RewardScorer, [(reward, workers)], actor_options, max_attempts, "reward actor")

    def text(self, rollouts: list[Rollout], samples: dict[str, Sample]) -> list[tuple[float, float, str]]:
        return self.call([(0, "text", (rollouts, samples))])[0]

    def combine(self, rollouts: list[Rollout], text, vas: Sequence[float], errors: Sequence[str]) -> list[Scored]:
        return self.call([(0, "combine", (rollouts, text, list(vas), list(errors)))])[0]
