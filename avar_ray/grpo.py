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


def padded_tokens(lengths: Sequence[int], rows: Sequence[int]) -> int:
    """Tokens a right-padded micro-batch of ``rows`` holds: rows x its longest row."""
    return len(rows) * max((lengths[i] for i in rows), default=0)


def padding_fraction(lengths: Sequence[int], micro_batches) -> float:
    """Share of the padded tokens of ``micro_batches`` (lists of row indices) that are padding."""
    padded = sum(padded_tokens(lengths, m) for m in micro_batches)
    return 1.0 - sum(lengths[i] for m in micro_batches for i in m) / padded if padded else 0.0


def _pack_sorted(lengths: Sequence[int], rows: list[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """``rows`` (longest first) cut into consecutive micro-batches of at most ``max_rows`` rows
    and, when ``max_tokens > 0``, at most ``max_tokens`` padded tokens (a longer row goes alone):
    rows of like length share a micro-batch, so little of it is padding."""
    micros: list[list[int]] = []
    for i in rows:
        m = micros[-1] if micros else None
        if m and len(m) < max_rows and (max_tokens <= 0 or (len(m) + 1) * lengths[m[0]] <= max_tokens):
            m.append(i)
        else:
            micros.append([i])
    return micros


def _to_multiple(lengths: Sequence[int], micros: list[list[int]], ranks: int) -> list[list[int]]:
    """As many micro-batches as a multiple of ``ranks`` (every rank runs the same forwards):
    the fullest ones halved (halves of sorted rows pad no more), or where every micro-batch is
    one row, neighbours merged (the only way left; the row cap may then be exceeded)."""
    micros = [list(m) for m in micros]
    while len(micros) % ranks or len(micros) < ranks:
        k = max(range(len(micros)), key=lambda k: (len(micros[k]), padded_tokens(lengths, micros[k])))
        if len(micros[k]) > 1:
            half = (len(micros[k]) + 1) // 2
            micros[k:k + 1] = [micros[k][:half], micros[k][half:]]
            continue
        while len(micros) % ranks:
            k = min(range(len(micros) - 1), key=lambda k: padded_tokens(lengths, micros[k] + micros[k + 1]))
            micros[k:k + 2] = [micros[k] + micros[k + 1]]
    return micros


def plan_micro_batches(lengths: Sequence[int], rows: Sequence[int], ranks: int, max_rows: int,
                       max_tokens: int) -> list[list[list[int]]]:
    """``rows`` as ``[rank][micro] -> row indices``: sorted by length and packed under the caps
    (``_pack_sorted``), the micro-batches then dealt to the ranks largest first, each to the
    least-loaded rank with a free place: every rank gets the same number of micro-batches and
    near-equal padded tokens, and the k-th micro-batches of the ranks (which run together) are
    of like size."""
    if len(rows) < ranks:
        raise ValueError(f"{len(rows)} rollouts cannot fill {ranks} learner ranks (rl.mini_batches, "
                         "rl.placement.learners)")
    ordered = sorted(rows, key=lambda i: (-lengths[i], i))
    micros = _to_multiple(lengths, _pack_sorted(lengths, ordered, max_rows, max_tokens), ranks)
    per_rank = len(micros) // ranks
    loads, plan = [0] * ranks, [[] for _ in range(ranks)]
    for m in sorted(micros, key=lambda m: -padded_tokens(lengths, m)):
        r = min((r for r in range(ranks) if len(plan[r]) < per_rank), key=lambda r: (loads[r], r))
        plan[r].append(sorted(m))
        loads[r] += padded_tokens(lengths, m)
    return plan


def plan_step(lengths: Sequence[int], ranks: int, mini_batches: int, max_rows: int,
              max_tokens: int) -> list[list[list[list[int]]]]:
    """The step's rollouts (tokens per row, prompt + response) as ``plan[rank][mini][micro] ->
    row indices``: cut into ``mini_batches`` of near-equal tokens (one optimizer step each),
    each mini-batch into micro-batches of like-length rows under the caps and dealt over the
    ranks (``plan_micro_batches``). Every rank gets the same number of micro-batches per
    mini-batch (ZeRO-3 gathers are collectives: all ranks must run the same forwards)."""
    if len(lengths) < ranks * mini_batches:
        raise ValueError(f"{len(lengths)} rollouts cannot fill {ranks} learner ranks x {mini_batches} "
                         "mini-batches (rl.mini_batches, rl.placement.learners)")
    plan: list = [[] for _ in range(ranks)]
    for part in balanced_split(lengths, mini_batches):
        for r, micros in enumerate(plan_micro_batches(lengths, part, ranks, max_rows, max_tokens)):
            plan[r].append(micros)
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
    the rank that trains on them (one mini-batch: ``plan_step``'s ranks): its prompt cache then
    serves the update."""
    n = len(lengths)
    rows = [i for i in range(n) if want[i]] if old_from_train else list(range(n))
    if rows and len(rows) < ranks:
        chosen = set(rows)
        rows = sorted(rows + [i for i in range(n) if i not in chosen][:ranks - len(rows)])
    forward = plan_micro_batches(lengths, rows, ranks, max_rows, max_tokens) if rows else [[] for _ in range(ranks)]
    skipped = set(range(n)) - set(rows)
    shares = [sorted(i for micro in rank for i in micro)
              for rank in plan_micro_batches(lengths, range(n), ranks, max_rows, max_tokens)]
    check = [[i for i in share if i in skipped] for share in shares]
    return forward, check
