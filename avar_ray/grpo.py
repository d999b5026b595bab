"""GRPO maths, pure (torch/numpy, verl's ``core_algos``; no Ray, no model): imported by the
learner actors and the RL driver alike, so that imports flow one way (actors never import
``avar_ray.rl``).

From ``verl.trainer.ppo.core_algos`` (ARCHITECTURE.md: don't rewrite it): group-normalised
outcome advantages, the clipped policy loss (with verl's ``rollout_is_weights`` for the
truncated importance-sampling correction), the KL estimators and the loss aggregation. Ours:
the TIS weights, DAPO's informative-group filter, and how a step's rollouts are split over
learner ranks, mini-batches and token-budget micro-batches.

Loss scaling across learners and micro-batches: every micro-batch loss is
``sum(token losses) / global_tokens * dp_size`` (verl's ``agg_loss`` with ``batch_num_tokens``
and ``dp_size``, the global count being that of the mini-batch); summed over a rank's
micro-batches and averaged over ranks by DeepSpeed's gradient all-reduce this is the token
mean over the whole mini-batch, whatever the split.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
import torch


def grpo_advantages(scores: np.ndarray, group_ids: np.ndarray, eps: float = 1e-6,
                    norm_by_std: bool = True) -> np.ndarray:
    """One advantage per rollout: ``(r - mean_group) / (std_group + eps)`` (verl's GRPO;
    ``norm_by_std=False`` is Dr.GRPO). ``scores`` and ``group_ids`` are ``[N]``."""
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    # float64: in float32 a group of equal rewards such as 0.1 (an all-wrong group with format
    # right, lambda_f 0.1) leaves a rounding residue in mean and std that the division by
    # std + eps turns into a shared advantage of up to ~0.2.
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    group_ids = np.asarray(group_ids).reshape(-1)
    if scores.shape != group_ids.shape:
        raise ValueError(f"scores {scores.shape} and group_ids {group_ids.shape} differ")
    # An outcome reward is one token-level reward on a one-token response (verl sums over tokens).
    rewards = torch.from_numpy(scores).unsqueeze(-1)
    advantages, _ = compute_grpo_outcome_advantage(rewards, torch.ones_like(rewards), group_ids,
                                                   epsilon=eps, norm_adv_by_std_in_grpo=norm_by_std)
    advantages = advantages.squeeze(-1).numpy()
    for g in dict.fromkeys(group_ids.tolist()):  # equal rewards: no signal, exactly 0 (a group of one
        members = group_ids == g                    # keeps verl's mean 0, std 1)
        if members.sum() > 1 and np.ptp(scores[members]) == 0:
            advantages[members] = 0.0
    return advantages.astype(np.float32)


def informative_groups(scores: np.ndarray, group_ids: np.ndarray, tol: float = 1e-9) -> np.ndarray:
    """The group ids whose rewards are not all equal (DAPO's dynamic sampling keeps only these:
    a group of equal rewards has zero advantages, no GRPO signal)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    group_ids = np.asarray(group_ids).reshape(-1)
    return np.array([g for g in dict.fromkeys(group_ids.tolist()) if np.ptp(scores[group_ids == g]) > tol])


@lru_cache(maxsize=8)
def _actor_config(clip_ratio: float, rollout_n: int, loss_agg_mode: str):
    from verl.workers.config import ActorConfig

    # verl's config object carries the clip range; strategy/micro-batch only satisfy its checks.
    return ActorConfig(strategy="fsdp", rollout_n=rollout_n, ppo_micro_batch_size_per_gpu=1,
                       clip_ratio=clip_ratio, clip_ratio_low=clip_ratio, clip_ratio_high=clip_ratio,
                       loss_agg_mode=loss_agg_mode)


def batch_info(dp_size: int, global_tokens: int, global_sequences: int) -> dict:
    return {"dp_size": dp_size, "batch_num_tokens": global_tokens, "global_batch_size": global_sequences}


def tis_weights(old_logprob: torch.Tensor, rollout_logprob: torch.Tensor, cap: Optional[float]) -> Optional[torch.Tensor]:
    """Truncated importance-sampling weights ``min(pi_old / pi_rollout, cap)`` per token (the
    correction for vLLM's sampler differing from the learner's policy); None when ``cap`` is
    None (off). Detached: a weight, not a path for gradients."""
    if cap is None:
        return None
    return torch.exp(old_logprob.detach() - rollout_logprob.detach()).clamp(max=float(cap))


def policy_loss(old_logprob: torch.Tensor, logprob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_ratio: float, rollout_n: int, info: dict, loss_agg_mode: str = "token-mean",
                is_weights: Optional[torch.Tensor] = None):
    """verl's clipped ("vanilla") PPO/GRPO policy loss on ``[B, R]`` tensors; ``advantages`` may
    be ``[B]`` (one per rollout: broadcast over its tokens); ``is_weights`` (``[B, R]``) scale
    each token's loss (TIS). Returns ``(loss, metrics)``."""
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand_as(logprob)
    config = _actor_config(float(clip_ratio), int(rollout_n), loss_agg_mode)
    config.global_batch_info.clear()
    config.global_batch_info.update(info)
    return get_policy_loss_fn("vanilla")(old_logprob, logprob, advantages, mask.float(), loss_agg_mode, config,
                                         rollout_is_weights=is_weights)


def kl_loss(logprob: torch.Tensor, ref_logprob: torch.Tensor, mask: torch.Tensor, kind: str, info: dict,
            loss_agg_mode: str = "token-mean") -> torch.Tensor:
    """verl's KL estimator to the frozen reference, aggregated like the policy loss."""
    from verl.trainer.ppo.core_algos import agg_loss, kl_penalty

    kl = kl_penalty(logprob, ref_logprob, kind)
    return agg_loss(kl, mask.float(), loss_agg_mode, **info)


# ----------------------------------------------------------------------------- batch splits
def balanced_split(lengths: Sequence[int], parts: int) -> list[list[int]]:
    """Indices of ``lengths`` in ``parts`` groups of near-equal token sums (longest first, each
    to the lightest group; ties keep order), each group's indices ascending. Every group is
    non-empty when there are at least ``parts`` items."""
    loads = [0] * parts
    groups: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        g = min(range(parts), key=lambda g: (loads[g], len(groups[g])))
        groups[g].append(i)
        loads[g] += lengths[i]
    return [sorted(g) for g in groups]


def micro_batch_count(lengths: Sequence[int], max_rows: int, max_tokens: int) -> int:
    """Micro-batches one rank needs for ``lengths`` (tokens per row): at most ``max_rows`` rows
    and, when ``max_tokens > 0``, about ``max_tokens`` tokens each (a longer row goes alone)."""
    if not lengths:
        return 0
    count = math.ceil(len(lengths) / max_rows)
    if max_tokens > 0:
        count = max(count, math.ceil(sum(lengths) / max_tokens))
    return min(count, len(lengths))


def plan_step(lengths: Sequence[int], ranks: int, mini_batches: int, max_rows: int,
              max_tokens: int) -> list[list[list[list[int]]]]:
    """The step's rollouts (tokens per row, prompt + response) as ``plan[rank][mini][micro] ->
    row indices``: length-balanced over ranks, each rank's share cut into ``mini_batches``
    (one optimizer step each), each mini-batch into micro-batches under the token budget. Every
    rank gets the same number of micro-batches per mini-batch (ZeRO-3 gathers are collectives:
    all ranks must run the same forwards)."""
    shares = balanced_split(lengths, ranks)
    minis = [[[share[i] for i in part] for part in balanced_split([lengths[i] for i in share], mini_batches)]
             for share in shares]
    plan: list = [[] for _ in range(ranks)]
    for m in range(mini_batches):
        parts = [minis[r][m] for r in range(ranks)]
        count = max(micro_batch_count([lengths[i] for i in p], max_rows, max_tokens) for p in parts)
        count = min([count] + [len(p) for p in parts])
        if count < 1:
            raise ValueError(f"{len(lengths)} rollouts cannot fill {ranks} learner ranks x {mini_batches} "
                             "mini-batches (rl.mini_batches, rl.placement.learners)")
        for r, part in enumerate(parts):
            plan[r].append([[part[i] for i in micro] for micro in balanced_split([lengths[i] for i in part], count)])
    return plan


def plan_score(lengths: Sequence[int], want: Sequence[bool], ranks: int, max_rows: int, max_tokens: int,
               old_from_train: bool) -> tuple[list[list[list[int]]], list[list[int]]]:
    """The learners' no-grad pass over a step's rollouts as ``(forward, check)``: ``forward[rank]
    [micro] -> row indices`` to run through the model, ``check[rank] -> row indices`` whose
    prompt ids are only compared with vLLM's (no forward). Every row is in exactly one of them.

    ``old_from_train`` (one optimizer step per update: the train forward's own detached
    log-probs are the old ones) forwards only the rows that ``want`` attention statistics,
    topped up with other rows to one per rank (ZeRO-3: every rank runs the same forwards), and
    none when no row wants them; otherwise every row (its old log-probs). The check rows go to
    the rank that trains on them (``balanced_split``, as ``plan_step``): its prompt cache then
    serves the update."""
    n = len(lengths)
    rows = [i for i in range(n) if want[i]] if old_from_train else list(range(n))
    if rows and len(rows) < ranks:
        chosen = set(rows)
        rows = sorted(rows + [i for i in range(n) if i not in chosen][:ranks - len(rows)])
    forward: list = [[] for _ in range(ranks)]
    if rows:
        sub = plan_step([lengths[i] for i in rows], ranks, 1, max_rows, max_tokens)
        forward = [[[rows[j] for j in micro] for micro in rank[0]] for rank in sub]
    skipped = set(range(n)) - set(rows)
    check = [[i for i in share if i in skipped] for share in balanced_split(lengths, ranks)]
    return forward, check
