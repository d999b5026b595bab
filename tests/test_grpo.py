"""GRPO maths (avar_ray/grpo.py) against verl's ``core_algos`` on the same tensors, and
against the formulas written out by hand (SPEC.md §5) so that a change in either shows.

Pure torch/numpy: no Ray, no model.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from verl.trainer.ppo import core_algos

from avar_ray.grpo import (balanced_split, batch_info, grpo_advantages, informative_groups, kl_loss, padding_fraction,
                           plan_score, plan_step, policy_loss, tis_weights)

# Three groups of four rollouts: mixed rewards, all-identical rewards, and a group of one.
SCORES = np.array([1.0, 0.0, 0.5, 1.3, 0.7, 0.7, 0.7, 0.7, 2.0], dtype=np.float32)
GROUPS = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2])
LENGTHS = [5, 3, 7, 1, 4, 6, 2, 7, 3]  # ragged responses
WIDTH = max(LENGTHS)


def response_mask(lengths=LENGTHS, width=WIDTH) -> torch.Tensor:
    return (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).float()


def token_level_rewards(scores, lengths=LENGTHS, width=WIDTH) -> torch.Tensor:
    """verl's layout: the outcome reward on each response's last token, zero elsewhere."""
    out = torch.zeros(len(scores), width)
    for i, (s, n) in enumerate(zip(scores, lengths)):
        out[i, n - 1] = float(s)
    return out


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_advantages_equal_verl_token_level(norm_by_std):
    ours = grpo_advantages(SCORES, GROUPS, norm_by_std=norm_by_std)
    mask = response_mask()
    theirs, returns = core_algos.compute_grpo_outcome_advantage(
        token_level_rewards(SCORES), mask, GROUPS, epsilon=1e-6, norm_adv_by_std_in_grpo=norm_by_std)
    # verl broadcasts one advantage over each response's tokens; ours is that scalar per rollout.
    expected = torch.from_numpy(ours).unsqueeze(1) * mask
    torch.testing.assert_close(theirs, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(returns, theirs)


def test_advantages_by_hand():
    adv = grpo_advantages(SCORES, GROUPS, eps=1e-6)
    g0 = SCORES[:4]
    np.testing.assert_allclose(adv[:4], (g0 - g0.mean()) / (g0.std(ddof=1) + 1e-6), rtol=1e-5)
    assert np.all(adv[4:8] == 0.0)  # identical rewards: no signal, and no NaN from std = 0
    assert adv[8] == pytest.approx(2.0)  # a group of one: verl uses mean 0, std 1
    dr = grpo_advantages(SCORES, GROUPS, norm_by_std=False)
    np.testing.assert_allclose(dr[:4], g0 - g0.mean(), rtol=1e-6)
    assert abs(adv[:4].sum()) < 1e-5 and np.abs(adv[:4]).max() > 0.5


@pytest.mark.parametrize("value", [0.1, 0.3, 1.0 + 0.5 * 1.34 / 2.34])
def test_a_group_of_equal_rewards_gets_exactly_zero_advantage(value):
    """Equal rewards not representable in float32 (an all-wrong group with the format right scores
    lambda_f = 0.1) once left a rounding residue that std + eps turned into a shared advantage
    (-0.0074 for 0.1, +0.029 for 0.3, -0.106 for the squashed visual bonus)."""
    scores = np.concatenate([np.full(8, value), [0.0, 1.0, 1.0, 0.0]])
    groups = np.array([0] * 8 + [1] * 4)
    for norm_by_std in (True, False):
        adv = grpo_advantages(scores, groups, norm_by_std=norm_by_std)
        assert np.all(adv[:8] == 0.0), adv[:8]
        assert np.abs(adv[8:]).min() > 0.4  # the informative group keeps its signal


def test_advantages_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="group_ids"):
        grpo_advantages(SCORES, GROUPS[:-1])


def _rollout_tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = response_mask()
    old = -torch.rand(len(LENGTHS), WIDTH, generator=g) * 3
    new = old + (torch.rand(len(LENGTHS), WIDTH, generator=g) - 0.5) * 0.8  # some ratios beyond 1 ± 0.2
    adv = torch.from_numpy(grpo_advantages(SCORES, GROUPS))
    return old * mask, new * mask, adv, mask


def clipped_loss_by_hand(old, new, adv, mask, clip):
    ratio = torch.exp(new - old)
    a = adv.unsqueeze(1).expand_as(new)
    per_token = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - clip, 1 + clip))
    return (per_token * mask).sum() / mask.sum()


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean"])
def test_policy_loss_equals_verl_vanilla(loss_agg_mode):
    old, new, adv, mask = _rollout_tensors()
    info = batch_info(1, int(mask.sum()), len(LENGTHS))
    ours, metrics = policy_loss(old, new, adv, mask, 0.2, 4, info, loss_agg_mode)
    from verl.workers.config import ActorConfig

    config = ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2,
                         clip_ratio_low=0.2, clip_ratio_high=0.2, loss_agg_mode=loss_agg_mode)
    config.global_batch_info.update(info)
    theirs, their_metrics = core_algos.compute_policy_loss_vanilla(
        old, new, adv.unsqueeze(1).expand_as(new) * mask, mask, loss_agg_mode, config)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(their_metrics["actor/pg_clipfrac"])
    assert metrics["actor/pg_clipfrac"] > 0  # the clip branch is exercised


def test_policy_loss_token_mean_by_hand_and_clip_matters():
    old, new, adv, mask = _rollout_tensors()
    info = batch_info(1, int(mask.sum()), len(LENGTHS))
    ours, _ = policy_loss(old, new, adv, mask, 0.2, 4, info)
    torch.testing.assert_close(ours, clipped_loss_by_hand(old, new, adv, mask, 0.2), rtol=1e-5, atol=1e-7)
    unclipped = clipped_loss_by_hand(old, new, adv, mask, 100.0)
    assert abs(float(ours - unclipped)) > 1e-4


def test_policy_loss_first_epoch_is_minus_mean_advantage_with_unit_gradient():
    """old == new (one PPO epoch): loss = -token-mean(A), d loss / d logprob = -A / tokens."""
    _, new, adv, mask = _rollout_tensors()
    new = new.clone().requires_grad_(True)
    info = batch_info(1, int(mask.sum()), len(LENGTHS))
    loss, _ = policy_loss(new.detach(), new, adv, mask, 0.2, 4, info)
    a = adv.unsqueeze(1) * mask
    assert float(loss.detach()) == pytest.approx(float(-a.sum() / mask.sum()), abs=1e-6)
    loss.backward()
    torch.testing.assert_close(new.grad, -a / mask.sum())


def test_micro_batch_and_rank_split_sums_to_the_global_token_mean():
    """The learner scales each micro-batch loss by the global token count and dp_size (verl's
    agg_loss): summed over micro-batches and averaged over ranks it is the whole-batch loss."""
    old, new, adv, mask = _rollout_tensors(seed=3)
    full, _ = policy_loss(old, new, adv, mask, 0.2, 4, batch_info(1, int(mask.sum()), len(LENGTHS)))
    dp = 3
    info = batch_info(dp, int(mask.sum()), len(LENGTHS))
    per_rank = []
    for rank in range(dp):
        rows = list(range(rank * 3, rank * 3 + 3))
        micro = [rows[:2], rows[2:]]
        per_rank.append(sum(policy_loss(old[m], new[m], adv[m], mask[m], 0.2, 4, info)[0] for m in micro))
    torch.testing.assert_close(sum(per_rank) / dp, full, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["low_var_kl", "kl", "mse", "abs"])
def test_kl_loss_equals_verl(kind):
    old, new, _, mask = _rollout_tensors(seed=1)
    info = batch_info(1, int(mask.sum()), len(LENGTHS))
    ours = kl_loss(new, old, mask, kind, info)
    per_token = core_algos.kl_penalty(new, old, kind)
    theirs = core_algos.agg_loss(per_token, mask, "token-mean", **info)
    torch.testing.assert_close(ours, theirs)
    assert float(ours) > 0  # the policies differ
    if kind == "low_var_kl":  # k3 = exp(ref - lp) - (ref - lp) - 1, clamped to [-10, 10]
        d = old - new
        k3 = torch.clamp(torch.exp(d) - d - 1, -10, 10)
        torch.testing.assert_close(ours, (k3 * mask).sum() / mask.sum(), rtol=1e-5, atol=1e-7)
    assert float(kl_loss(new, new, mask, kind, info)) == pytest.approx(0.0, abs=1e-7)


def test_tis_weights_truncate_and_scale_the_token_losses():
    old, new, adv, mask = _rollout_tensors(seed=2)
    rollout = old + (torch.rand(old.shape, generator=torch.Generator().manual_seed(5)) - 0.5)  # vLLM differs
    assert tis_weights(old, rollout, None) is None
    w = tis_weights(old, rollout, 1.5)
    torch.testing.assert_close(w, torch.exp(old - rollout).clamp(max=1.5))
    assert float(w.max()) == pytest.approx(1.5) and float(w.min()) < 1.0
    info = batch_info(1, int(mask.sum()), len(LENGTHS))
    plain, _ = policy_loss(old, new, adv, mask, 0.2, 4, info)
    weighted, _ = policy_loss(old, new, adv, mask, 0.2, 4, info, is_weights=w)
    ratio = torch.exp(new - old)
    a = adv.unsqueeze(1).expand_as(new)
    per_token = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 0.8, 1.2)) * w
    torch.testing.assert_close(weighted, (per_token * mask).sum() / mask.sum(), rtol=1e-5, atol=1e-7)
    assert abs(float(weighted - plain)) > 1e-4


def test_informative_groups_drop_equal_rewards():
    assert informative_groups(SCORES, GROUPS).tolist() == [0]  # group 1 all equal, group 2 a single rollout
    assert informative_groups(np.zeros(4), np.array([0, 0, 1, 1])).tolist() == []


def test_balanced_split_and_step_plan():
    lengths = [100, 10, 90, 20, 50, 50, 30, 70]
    parts = balanced_split(lengths, 2)
    assert sorted(i for p in parts for i in p) == list(range(8))
    assert abs(sum(lengths[i] for i in parts[0]) - sum(lengths[i] for i in parts[1])) <= 10
    plan = plan_step(lengths, ranks=2, mini_batches=2, max_rows=4, max_tokens=60)
    assert sorted(i for rank in plan for mini in rank for micro in mini for i in micro) == list(range(8))
    for m in range(2):  # every rank runs as many micro-batches (ZeRO-3 collectives)
        assert len(plan[0][m]) == len(plan[1][m]) >= 2
    # without a token budget: rows only, one micro-batch per mini-batch here
    assert [len(mini) for mini in plan_step(lengths, 2, 2, 4, 0)[0]] == [1, 1]
    with pytest.raises(ValueError, match="mini_batches"):
        plan_step([5, 5], ranks=2, mini_batches=2, max_rows=4, max_tokens=0)


def _rows(plan) -> list[int]:
    return sorted(i for rank in plan for micro in rank for i in micro)


def test_score_plan_forwards_only_the_rows_that_want_statistics():
    lengths = [100, 10, 90, 20, 50, 50, 30, 70]
    want = [False, True, False, False, True, True, False, False]
    forward, check = plan_score(lengths, want, ranks=2, max_rows=4, max_tokens=0, old_from_train=True)
    assert _rows(forward) == [1, 4, 5]
    assert len(forward[0]) == len(forward[1]) >= 1  # the same forwards on every rank (ZeRO-3)
    assert sorted(i for rank in check for i in rank) == [0, 2, 3, 6, 7]  # checked, not forwarded
    # a check row goes to the rank that trains on it
    shares = [[i for micro in rank[0] for i in micro] for rank in plan_step(lengths, 2, 1, 4, 0)]
    assert all(set(check[r]) <= set(shares[r]) for r in range(2))
    # no row wants statistics: no forward at all, every row only checked
    forward, check = plan_score(lengths, [False] * 8, 2, 4, 0, old_from_train=True)
    assert forward == [[], []] and sorted(i for rank in check for i in rank) == list(range(8))
    # one wanted row, two ranks: topped up with one other row so that each rank runs one forward
    forward, _ = plan_score(lengths, [False, False, False, True, False, False, False, False], 2, 4, 0, True)
    assert 3 in _rows(forward) and len(_rows(forward)) == 2 and all(len(rank) == 1 for rank in forward)
    # several optimizer steps: every row's old log-probs come from this pass
    forward, check = plan_score(lengths, want, 2, 4, 0, old_from_train=False)
    assert _rows(forward) == list(range(8)) and check == [[], []]
    assert forward == [rank[0] for rank in plan_step(lengths, 2, 1, 4, 0)]  # today's plan


def real_job_lengths(seed: int = 0, prompts: int = 256, n: int = 8) -> list[int]:
    """Issue 24's 7B step: prompts of 300-1,500 tokens, n responses each, lognormal up to 2,048."""
    rng = np.random.default_rng(seed)
    prompt = np.repeat(rng.integers(300, 1501, prompts), n)
    response = np.minimum(rng.lognormal(np.log(300), 1.0, prompts * n).astype(int) + 1, 2048)
    return (prompt + response).tolist()


def _padding_by_hand(lengths, micros) -> float:
    padded = sum(len(m) * max(lengths[i] for i in m) for m in micros)
    return (padded - sum(lengths[i] for m in micros for i in m)) / padded


@pytest.mark.parametrize("max_rows,max_tokens,mini_batches", [(4, 0, 1), (8, 16384, 1), (4, 8192, 2)])
def test_step_plan_at_the_real_job_shapes_pads_little_within_the_caps(max_rows, max_tokens, mini_batches):
    """256 prompts x 8 rollouts over 8 ranks: like lengths share a micro-batch (issue 24: 34.5%
    padding at 4 rows, 43.3% at 8 rows / 16k tokens when each micro-batch held one of the
    longest rows), every rank runs as many micro-batches with near-equal tokens, no cap broken."""
    lengths = real_job_lengths()
    plan = plan_step(lengths, ranks=8, mini_batches=mini_batches, max_rows=max_rows, max_tokens=max_tokens)
    assert sorted(i for rank in plan for mini in rank for micro in mini for i in micro) == list(range(len(lengths)))
    micros = [micro for rank in plan for mini in rank for micro in mini]
    assert padding_fraction(lengths, micros) == pytest.approx(_padding_by_hand(lengths, micros))
    assert padding_fraction(lengths, micros) <= 0.10
    assert max(len(m) for m in micros) <= max_rows
    if max_tokens:  # a row longer than the budget goes alone
        assert all(len(m) * max(lengths[i] for i in m) <= max_tokens or len(m) == 1 for m in micros)
    for m in range(mini_batches):
        assert len({len(rank[m]) for rank in plan}) == 1  # the same forwards on every rank (ZeRO-3)
        tokens = [sum(lengths[i] for micro in rank[m] for i in micro) for rank in plan]
        assert max(tokens) <= 1.05 * min(tokens)


def test_step_plan_evens_out_micro_batch_counts_without_breaking_the_row_cap():
    # 9 rows, 2 ranks, 4 rows each at most: 3 packed micro-batches -> 4, none above 4 rows
    lengths = [90, 80, 70, 60, 50, 40, 30, 20, 10]
    plan = plan_step(lengths, ranks=2, mini_batches=1, max_rows=4, max_tokens=0)
    assert len(plan[0][0]) == len(plan[1][0]) == 2
    assert max(len(micro) for rank in plan for micro in rank[0]) <= 4
    # one row per micro-batch and an odd count: neighbours merge (the only way to even it out)
    plan = plan_step([30, 20, 10], ranks=2, mini_batches=1, max_rows=1, max_tokens=0)
    assert [len(rank[0]) for rank in plan] == [1, 1]
    assert sorted(i for rank in plan for micro in rank[0] for i in micro) == [0, 1, 2]
