"""VARS as the paper runs it (SPEC.md §5), end to end: GRPO steps of the RL driver from the warm
base (which answers correctly often enough for the gate to let rollouts through) with the gate
on, lambda_v 0.3 and lambda_f 0.1; step 1 with the paper's raw r_visual, step 2 with the squash,
step 3 with group_z (the reward actor swapped between steps, the rest of the run kept). Per
rollout of each step:

* a wrong answer gets r_visual 0, and the learners computed no statistics for it (the gate);
* a correct one gets r_visual equal to an eager ``output_attentions`` computation of the same
  rollout (head-averaged attention, mass on V over mass on S per layer and response token,
  averaged: tests/test_rl_real_job.py's ``_eager_vas``), at least two of them per step;
* the total equals r_acc + 0.3 norm(r_visual) + 0.1 r_format, with norm computed here (none:
  raw; squash: r / (1 + r); group_z: z-score over the group's correct ones, population sd).

``rl.lr=0``: every step scores the warm base's own weights, which the eager reference loads.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from test_rl_real_job import _eager_vas  # noqa: E402 - tests/ is on sys.path under pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny_local.yaml")
PROMPTS, N = 2, 8
LAMBDA_V, LAMBDA_F = 0.3, 0.1
NORMS = {1: "none", 2: "squash", 3: "group_z"}
# At temperature 1 a group's correct answers of the warm base are mostly one text, so one
# r_visual, and group_z gives them all 0 (tests/test_learning.py's docstring); at 1.5 they differ.
TEMPERATURE = "rl.temperature=1.5"


@pytest.fixture(scope="module")
def vars_steps(ray_local, warm_base_dir, tmp_path_factory):
    """The three steps' rollouts, rewards and learner passes, and the config."""
    from actors.placement import reward_options
    from actors.reward import RewardService
    from avar_ray.config import load_config
    from avar_ray.data.procedural import generate_samples
    from avar_ray.data.schema import write_parquet
    from avar_ray.rl.driver import Run
    from avar_ray.rl.pipeline import PromptSampler
    from avar_ray.rl.prompts import load_prompts
    from avar_ray.rl.system import RLSystem
    from avar_ray.warm_base import read_info

    out = tmp_path_factory.mktemp("vars_paper")
    settings = read_info(warm_base_dir)["settings"]
    data = write_parquet(generate_samples(PROMPTS * 3, seed=4242, image_size=settings["image_size"], chain="short",
                                          tasks=settings["tasks"]), out / "train.parquet")
    cfg = load_config(CONFIG, [
        f"model.path={warm_base_dir}", f"data.train={data}", f"rl.out={out}", f"rl.prompts_per_step={PROMPTS}",
        f"rl.n_samples={N}", "rl.max_new_tokens=40", "rl.steps=3", "rl.lr=0", "rl.save_every=0", "rl.export_hf=false",
        "rl.reward.visual_gate=true", f"rl.reward.lambda_v={LAMBDA_V}", f"rl.reward.lambda_f={LAMBDA_F}",
        "rl.reward.visual_norm=none", "rl.reward.accuracy_weight=1", TEMPERATURE])
    prompts = load_prompts(cfg)
    system = RLSystem(cfg, cfg.model.path)
    try:
        run = Run(cfg, system, prompts, PromptSampler(len(prompts.samples), cfg.rl.seed), out, None)
        collected, collect = {}, run._collect

        def recording(step, clock):  # what the step trains on, as the driver produced it
            collected[step] = got = collect(step, clock)
            return got

        run._collect = recording
        records = {}
        for step, norm in NORMS.items():
            if norm != cfg.rl.reward.visual_norm:
                system.reward.shutdown()
                cfg.rl.reward = dataclasses.replace(cfg.rl.reward, visual_norm=norm)
                placement = cfg.rl.placement
                system.reward = RewardService(cfg.rl.reward, reward_options(placement), placement.max_restarts + 1,
                                              placement.reward_workers)
            records[step] = run.step(step)
        yield dict(cfg=cfg, collected=collected, records=records)
    finally:
        system.shutdown()


def _group_z(values: np.ndarray, groups: np.ndarray, correct: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """z-score over each group's correct rollouts (population sd, ``eps`` in the denominator as
    rewards.normalise_visual has it), 0 elsewhere. Correct answers whose r_visual differ by float
    noise only (~1e-7, the same text scored in another batch row) are a tie: z 0 (before the
    zero-spread tolerance their totals differed by up to 0.17: 1.157 vs 0.987 in a run)."""
    out = np.zeros_like(values)
    for g in np.unique(groups):
        sel = (groups == g) & correct
        if sel.sum() >= 2 and np.ptp(values[sel]) > 1e-5 * np.abs(values[sel]).max():
            out[sel] = (values[sel] - values[sel].mean()) / (values[sel].std() + eps)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("step", sorted(NORMS))
def test_vars_rewards_per_rollout_match_eager_attention_and_the_spec(vars_steps, warm_base_dir, step):
    from avar_ray.modeling import load_processor

    cfg = vars_steps["cfg"]
    batch, rollouts, scored, passes, counts = vars_steps["collected"][step]
    record = vars_steps["records"][step]
    assert len(rollouts) == PROMPTS * N and record["reward/errors"] == 0
    acc = np.array([s.accuracy for s in scored])
    fmt = np.array([s.format for s in scored])
    correct = acc >= 0.5
    assert correct.sum() >= 2, f"step {step}: {correct.sum()} correct rollouts; texts: {[r.text for r in rollouts][:4]}"
    # the gate: wrong answers get 0 and no statistics; every correct one was measured
    assert all(s.visual == 0.0 for s, c in zip(scored, correct) if not c)
    assert all(math.isnan(p.vas) for p, c in zip(passes, correct) if not c)
    assert counts["learner/visual_stats_rollouts"] == correct.sum()

    from actors.records import TrainItem

    items = [TrainItem(batch[r.prompt_index][0], r.response_ids, 0.0, r.logprobs, r.prompt_ids)
             for r, c in zip(rollouts, correct) if c]
    eager = np.zeros(len(rollouts))
    eager[correct] = _eager_vas(warm_base_dir, {}, load_processor(str(warm_base_dir)), items,
                                cfg.attention.layers, cfg.attention.eps)
    assert (eager[correct] > 0).all()
    np.testing.assert_allclose([s.visual for s in scored], eager, rtol=1e-4)

    # the sum, from the recorded parts (r_visual just checked against eager)
    visual = np.array([s.visual for s in scored])
    groups = np.array([r.prompt_index for r in rollouts])
    norm = NORMS[step]
    shaped = {"none": visual, "squash": visual / (1 + visual), "group_z": _group_z(visual, groups, correct)}[norm]
    if norm == "group_z":
        assert np.abs(shaped).max() > 0.1, "no group with two correct answers of different r_visual"
    detail = [(int(g), repr(v), r.text) for g, r, v, c in zip(groups, rollouts, visual, correct) if c]
    np.testing.assert_allclose([s.total for s in scored], acc + LAMBDA_V * shaped + LAMBDA_F * fmt, atol=1e-3,
                               err_msg=f"correct rollouts (group, r_visual, text): {detail}")
