"""GRPO maths, all of it from ``verl.trainer.ppo.core_algos`` (ARCHITECTURE.md: don't rewrite
it): group-normalised outcome advantages, the clipped policy loss, the KL estimators and the
loss aggregation. This module only adapts our shapes to verl's.

Loss scaling across learners and micro-batches: every micro-batch loss is
``sum(token losses) / global_tokens * dp_size`` (verl's ``agg_loss`` with ``batch_num_tokens``
and ``dp_size``); summed over a rank's micro-batches and averaged over ranks by DeepSpeed's
gradient all-reduce this is the token mean over the whole step batch, whatever the split.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch


def grpo_advantages(scores: np.ndarray, group_ids: np.ndarray, eps: float = 1e-6,
                    norm_by_std: bool = True) -> np.ndarray:
    """One advantage per rollout: ``(r - mean_group) / (std_group + eps)`` (verl's GRPO;
    ``norm_by_std=False`` is Dr.GRPO). ``scores`` and ``group_ids`` are ``[N]``."""
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    group_ids = np.asarray(group_ids).reshape(-1)
    if scores.shape != group_ids.shape:
        raise ValueError(f"scores {scores.shape} and group_ids {group_ids.shape} differ")
    # An outcome reward is one token-level reward on a one-token response (verl sums over tokens).
    rewards = torch.from_numpy(scores).unsqueeze(-1)
    advantages, _ = compute_grpo_outcome_advantage(rewards, torch.ones_like(rewards), group_ids,
                                                   epsilon=eps, norm_adv_by_std_in_grpo=norm_by_std)
    return advantages.squeeze(-1).numpy()


@lru_cache(maxsize=8)
def _actor_config(clip_ratio: float, rollout_n: int, loss_agg_mode: str):
    from verl.workers.config import ActorConfig

    # verl's config object carries the clip range; strategy/micro-batch only satisfy its checks.
    return ActorConfig(strategy="fsdp", rollout_n=rollout_n, ppo_micro_batch_size_per_gpu=1,
                       clip_ratio=clip_ratio, clip_ratio_low=clip_ratio, clip_ratio_high=clip_ratio,
                       loss_agg_mode=loss_agg_mode)


def batch_info(dp_size: int, global_tokens: int, global_sequences: int) -> dict:
    return {"dp_size": dp_size, "batch_num_tokens": global_tokens, "global_batch_size": global_sequences}


def policy_loss(old_logprob: torch.Tensor, logprob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_ratio: float, rollout_n: int, info: dict, loss_agg_mode: str = "token-mean"):
    """verl's clipped ("vanilla") PPO/GRPO policy loss on ``[B, R]`` tensors; ``advantages`` may
    be ``[B]`` (one per rollout: broadcast over its tokens). Returns ``(loss, metrics)``."""
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand_as(logprob)
    config = _actor_config(float(clip_ratio), int(rollout_n), loss_agg_mode)
    config.global_batch_info.clear()
    config.global_batch_info.update(info)
    return get_policy_loss_fn("vanilla")(old_logprob, logprob, advantages, mask.float(), loss_agg_mode, config)


def kl_loss(logprob: torch.Tensor, ref_logprob: torch.Tensor, mask: torch.Tensor, kind: str, info: dict,
            loss_agg_mode: str = "token-mean") -> torch.Tensor:
    """verl's KL estimator to the frozen reference, aggregated like the policy loss."""
    from verl.trainer.ppo.core_algos import agg_loss, kl_penalty

    kl = kl_penalty(logprob, ref_logprob, kind)
    return agg_loss(kl, mask.float(), loss_agg_mode, **info)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    mask = mask.float()
    return float((values * mask).sum() / mask.sum().clamp(min=1))
