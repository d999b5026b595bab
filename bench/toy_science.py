"""The paper's findings at toy scale (long; not in CI): writes docs/results/toy_science.md and its
plots under docs/results/toy_science/.

    .venv/bin/python bench/toy_science.py                 # full: 3 seeds, 200 eval samples
    .venv/bin/python bench/toy_science.py --seeds 1 --n-eval 64 --rl-steps 4 --sft-epochs 1   # reduced

From the warm base (avar_ray/warm_base.py), per seed: procedural data (short chains) -> oracle
VARD synthesis -> cold start twice (AGTO: sft.alpha/beta as configured; plain SFT: alpha =
beta = 0) -> GRPO twice from the AGTO model at equal steps (VARS: lambda_v > 0; accuracy only:
lambda_v = 0) -> eval of every checkpoint, and of the base and the AGTO model with the
training-free intervention. Then:

(a) Pearson r of VAS (Q = U) against accuracy over every evaluated checkpoint, with p;
(b) the intervention's effect on accuracy and alpha_img at the base and the cold-start model,
    with paired-bootstrap 95% intervals over the eval samples;
(c) AGTO vs plain SFT and VARS vs accuracy-only GRPO: mean and spread over seeds of accuracy,
    VAS and alpha_img.

Every stage is the production code path (Ray Data synthesis, Ray Train + DeepSpeed SFT, the RL
actors, the eval runner) on an embedded local Ray.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "docs" / "results"))
    p.add_argument("--work", default="/tmp/avar_toy_science", help="runs (models, data, evals)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--sft-epochs", type=int, default=2)
    p.add_argument("--rl-steps", type=int, default=12)
    p.add_argument("--lambda-v", type=float, default=0.3)
    p.add_argument("overrides", nargs="*", help="dotted config overrides after the demo's settings")
    return p.parse_args(argv)


def seed_config(args, seed: int, work: Path):
    from avar_ray.commands.demo import demo_config

    extra = [f"seed={seed}", f"data.seed={seed}", f"sft.seed={seed}", f"rl.seed={seed}", f"eval.seed={seed}",
             f"data.n_train={args.n_train}", f"data.n_eval={args.n_eval}", f"sft.epochs={args.sft_epochs}",
             f"rl.steps={args.rl_steps}", f"rl.save_every={args.rl_steps}", *args.overrides]
    return demo_config(None, work, extra)


def with_paths(cfg, **paths):
    out = copy.deepcopy(cfg)
    for dotted, value in paths.items():
        section, key = dotted.split("__")
        setattr(getattr(out, section), key, value)
    return out


def one_seed(args, seed: int, base: Path, evals: dict) -> None:
    """Every stage of one seed; ``evals[label] = eval dir``."""
    from avar_ray.attention import Intervention
    from avar_ray.commands.demo import CHAIN
    from avar_ray.data.procedural import write_procedural
    from avar_ray.eval.runner import run_eval
    from avar_ray.rl import run_rl
    from avar_ray.sft.trainer import run_sft
    from avar_ray.synth.pipeline import run_synthesis

    work = Path(args.work) / f"seed{seed}"
    cfg = seed_config(args, seed, work)
    cfg.model.path = str(base)
    data = Path(cfg.data.train).parent
    write_procedural(data, cfg.data.n_train, seed, cfg.data.image_size, "train", chain=CHAIN)
    # One eval set for every seed (seed 10_000): the checkpoints are compared on the same rows.
    write_procedural(data, cfg.data.n_eval, 10_000, cfg.data.image_size, "eval", chain=CHAIN)
    run_synthesis(cfg)
    iv = Intervention(a_img=cfg.intervention.a_img, a_sys=cfg.intervention.a_sys)

    def evaluate(label: str, model: str, intervention=None) -> None:
        evals[label] = str(work / "eval" / label.replace("+", "_").replace(" ", "_"))
        if not (Path(evals[label]) / "results.json").exists():
            run_eval(model, cfg.data.eval, evals[label], cfg=cfg, intervention=intervention, label=label)

    sft = {}
    for name, ab in (("agto", (cfg.sft.alpha, cfg.sft.beta)), ("plain", (0.0, 0.0))):
        scfg = with_paths(cfg, sft__out=str(work / f"sft_{name}"))
        scfg.sft.alpha, scfg.sft.beta = ab
        sft[name] = run_sft(scfg).export
        evaluate(f"s{seed} cold start ({name} SFT)", sft[name])
    evaluate(f"s{seed} cold start (agto SFT)+intervention", sft["agto"], iv)
    if seed == 0:
        evaluate("base", str(base))
        evaluate("base+intervention", str(base), iv)
    for name, lam in (("vars", args.lambda_v), ("acc-only", 0.0)):
        rcfg = with_paths(cfg, rl__out=str(work / f"rl_{name}"), model__path=sft["agto"])
        rcfg.rl.reward.lambda_v = lam
        evaluate(f"s{seed} RL ({name})", str(run_rl(rcfg).final_model))


def records(run_dir: str) -> list[dict]:
    path = Path(run_dir) / "samples.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def paired_effect(a_dir: str, b_dir: str, key, seed: int = 0) -> tuple[float, float, float]:
    """Mean of b - a over the samples both runs scored, with a 95% paired bootstrap interval."""
    a = {r["id"]: key(r) for r in records(a_dir)}
    b = {r["id"]: key(r) for r in records(b_dir)}
    d = np.array([b[i] - a[i] for i in a if i in b and a[i] is not None and b[i] is not None], dtype=float)
    means = d[np.random.default_rng(seed).integers(0, len(d), (2000, len(d)))].mean(1)
    return float(d.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def summarise(args, evals: dict, seconds: float) -> str:
    from avar_ray.eval.analyze import load_run, pearson
    from avar_ray.eval.plots import vas_accuracy_scatter

    figs = Path(args.out) / "toy_science"
    figs.mkdir(parents=True, exist_ok=True)
    runs = {label: load_run(d, label) for label, d in evals.items()}
    ckpts = [lab for lab in runs if "intervention" not in lab]
    pts = [(lab, runs[lab]["overall"]["vas"], runs[lab]["overall"]["accuracy"]) for lab in ckpts
           if runs[lab]["overall"]["vas"] is not None]
    r, p = pearson([x[1] for x in pts], [x[2] for x in pts])
    vas_accuracy_scatter([x[0] for x in pts], [x[1] for x in pts], [x[2] for x in pts], r, p, figs / "vas_vs_accuracy.png")
    robust = [(lab, runs[lab]["overall"]["alpha_img"] / runs[lab]["overall"]["alpha_sys"]) for lab in ckpts
              if runs[lab]["overall"].get("alpha_sys")]
    r_rob, p_rob = pearson([x[1] for x in robust], [runs[x[0]]["overall"]["accuracy"] for x in robust])
    lines = ["# The paper's findings at toy scale", "",
             f"Regenerate: `.venv/bin/python bench/toy_science.py --seeds {args.seeds} --n-eval {args.n_eval} "
             f"--rl-steps {args.rl_steps} --sft-epochs {args.sft_epochs} --n-train {args.n_train}` "
             f"({seconds / 60:.0f} min on this machine). The full run is "
             "`.venv/bin/python bench/toy_science.py` (3 seeds, 200 eval samples).", "",
             "## (a) VAS against accuracy across checkpoints", "",
             f"Pearson r = {r if r is None else round(r, 3)}, p = {p if p is None else f'{p:.3g}'} over {len(pts)} "
             f"checkpoints (paper: r = 0.96 over ~10 open 7B models). With the robust companion (sum V / sum S): "
             f"r = {r_rob if r_rob is None else round(r_rob, 3)}, p = {p_rob if p_rob is None else f'{p_rob:.3g}'}.", "",
             "![VAS vs accuracy](toy_science/vas_vs_accuracy.png)", "",
             "| checkpoint | accuracy % | VAS (Q=U) | sum V / sum S | alpha_img (U) |", "| --- | --- | --- | --- | --- |"]
    for lab in ckpts:
        o = runs[lab]["overall"]
        rob = o["alpha_img"] / o["alpha_sys"] if o.get("alpha_sys") else None
        lines.append(f"| {lab} | {o['accuracy'] * 100:.1f} | {o['vas']:.3g} | {rob if rob is None else f'{rob:.3g}'} | "
                     f"{o['alpha_img']:.4f} |")
    lines += ["", "## (b) The training-free intervention", "",
              "Paired differences (intervened - plain) over the same eval samples, 95% paired bootstrap.", "",
              "| model | Δ accuracy (points) | Δ alpha_img (U) |", "| --- | --- | --- |"]
    pairs = [("base", "base", "base+intervention")] + [
        (f"cold start seed {s}", f"s{s} cold start (agto SFT)", f"s{s} cold start (agto SFT)+intervention")
        for s in range(args.seeds)]
    for name, a, b in pairs:
        if a in evals and b in evals:
            acc = paired_effect(evals[a], evals[b], lambda rec: rec["accuracy"])
            alpha = paired_effect(evals[a], evals[b], lambda rec: rec["attention"]["user"]["alpha_img"])
            lines.append(f"| {name} | {acc[0] * 100:+.1f} [{acc[1] * 100:+.1f}, {acc[2] * 100:+.1f}] | "
                         f"{alpha[0]:+.4f} [{alpha[1]:+.4f}, {alpha[2]:+.4f}] |")
    lines += ["", f"## (c) Ablations at equal steps over {args.seeds} seed(s)", "",
              "| variant | accuracy % (mean ± sd) | VAS (Q=U) | alpha_img (U) | alpha_img (R) |",
              "| --- | --- | --- | --- | --- |"]
    for variant in ("cold start (agto SFT)", "cold start (plain SFT)", "RL (vars)", "RL (acc-only)"):
        got = [runs[f"s{s} {variant}"]["overall"] for s in range(args.seeds) if f"s{s} {variant}" in runs]
        if not got:
            continue

        def ms(key, scale=1.0, digits=2):
            vals = [g[key] * scale for g in got if g.get(key) is not None]
            if not vals:
                return "n/a"
            sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
            return f"{statistics.mean(vals):.{digits}f} ± {sd:.{digits}f}"

        lines.append(f"| {variant} | {ms('accuracy', 100, 1)} | {ms('vas', 1, 3)} | {ms('alpha_img', 1, 4)} | "
                     f"{ms('alpha_img_response', 1, 4)} |")
    lines += ["", "Runs: " + ", ".join(f"`{d}`" for d in evals.values()), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    from avar_ray.config import load_config
    from avar_ray.ray_utils import init_ray
    from avar_ray.warm_base import ensure_warm_base

    args = parse_args(argv)
    start = time.perf_counter()
    cfg = load_config(REPO / "configs" / "tiny_local.yaml")
    base = ensure_warm_base(cfg.warm_base, image_size=cfg.data.image_size)
    init_ray(cfg.ray)
    evals: dict = {}
    for seed in range(args.seeds):
        one_seed(args, seed, base, evals)
    text = summarise(args, evals, time.perf_counter() - start)
    out = Path(args.out) / "toy_science.md"
    out.write_text(text)
    print(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
