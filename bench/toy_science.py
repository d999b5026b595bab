"""The paper's findings at toy scale (long; not in CI): writes docs/results/toy_science.md and its
plots under docs/results/toy_science/.

    .venv/bin/python bench/toy_science.py                 # full: 3 seeds, 200 eval samples
    .venv/bin/python bench/toy_science.py --seeds 3 --n-eval 100 --rl-steps 8 --sft-epochs 1 --n-train 128
                                                          # what docs/results/toy_science.md holds (~1 h, 2 cores)
    .venv/bin/python bench/toy_science.py --report-only ...   # rewrite the report from WORK/evals.json

A seed's finished evals are recorded in WORK/evals.json; a rerun with the same --work skips the
finished seeds (so a crash late in seed 2 costs seed 2 only).

From the warm base (avar_ray/warm_base.py), per seed: procedural data (short chains) -> oracle
VARD synthesis -> cold start twice (AGTO: sft.alpha/beta as configured; plain SFT: alpha =
beta = 0) -> GRPO from the AGTO model at equal steps, one run per ``--rl-arms`` (VARS: lambda_v > 0;
accuracy only: lambda_v = 0; PAPO and VPPO, rl.perception at their papers' settings, lambda_v = 0;
VARS + VPPO) -> eval of every checkpoint, and of the base and the AGTO model with the
training-free intervention. Then:

(a) Pearson r of VAS (Q = U) against accuracy over every evaluated checkpoint, with p;
(b) the intervention's effect on accuracy and alpha_img at the base and the cold-start model,
    with paired-bootstrap 95% intervals over the eval samples;
(c) AGTO vs plain SFT and each GRPO arm vs accuracy-only (VARS + VPPO vs VARS): mean and
    spread over seeds of accuracy, VAS and alpha_img; each method's own perception figure (PAPO's
    KL, VPPO's dependency: ``bench/perception_probe.py``) measured on every arm's final model.

Every stage is the production code path (Ray Data synthesis, Ray Train + DeepSpeed SFT, the RL
actors, the eval runner) on an embedded local Ray.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


RL_ARMS = {  # name: (VARS on: lambda_v = --lambda-v, else 0; rl.perception settings)
    "vars": (True, {}), "acc-only": (False, {}), "papo": (False, {"papo_coef": 0.02}), "vppo": (False, {"vppo": True}),
    "vars+vppo": (True, {"vppo": True}),
}


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
    p.add_argument("--rl-arms", nargs="*", default=list(RL_ARMS), choices=list(RL_ARMS),
                   help="GRPO arms from the AGTO model (PAPO and VPPO at their papers' settings: rl.perception)")
    p.add_argument("--report-only", action="store_true",
                   help="only rewrite the report from the evals recorded in WORK/evals.json")
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


T0 = time.perf_counter()


def stage(seed: int, name: str, body):
    """Run ``body`` with a progress line before and after (the run is long; say where it is)."""
    began = time.perf_counter()
    print(f"[toy_science] seed {seed}: {name} (t+{began - T0:.0f}s)", flush=True)
    result = body()
    print(f"[toy_science] seed {seed}: {name} done in {time.perf_counter() - began:.0f}s", flush=True)
    return result


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
    # The demo's tasks (the warm base's: cfg.data.tasks); one eval set for every seed (seed
    # 10_000, never a training seed): the checkpoints are compared on the same rows.
    write_procedural(data, cfg.data.n_train, seed, cfg.data.image_size, "train", chain=CHAIN, tasks=cfg.data.tasks)
    write_procedural(data, cfg.data.n_eval, 10_000, cfg.data.image_size, "eval", chain=CHAIN, tasks=cfg.data.tasks)
    stage(seed, "synth", lambda: run_synthesis(cfg))
    layers = None if cfg.intervention.layers is None else tuple(cfg.intervention.layers)
    iv = Intervention(a_img=cfg.intervention.a_img, a_sys=cfg.intervention.a_sys, layers=layers)

    def evaluate(label: str, model: str, intervention=None) -> None:
        evals[label] = str(work / "eval" / label.replace("+", "_").replace(" ", "_"))
        if not (Path(evals[label]) / "results.json").exists():
            o = stage(seed, f"eval {label}", lambda: run_eval(model, cfg.data.eval, evals[label], cfg=cfg,
                                                               intervention=intervention, label=label))["overall"]
            print(f"[toy_science] {label}: accuracy {o['accuracy']:.3f}, VAS {o['vas']}, alpha_img {o['alpha_img']}",
                  flush=True)

    sft = {}
    for name, ab in (("agto", (cfg.sft.alpha, cfg.sft.beta)), ("plain", (0.0, 0.0))):
        scfg = with_paths(cfg, sft__out=str(work / f"sft_{name}"))
        scfg.sft.alpha, scfg.sft.beta = ab
        sft[name] = stage(seed, f"SFT {name}", lambda: run_sft(scfg)).export
        evaluate(f"s{seed} cold start ({name} SFT)", sft[name])
    evaluate(f"s{seed} cold start (agto SFT)+intervention", sft["agto"], iv)
    if seed == 0:
        evaluate("base", str(base))
        evaluate("base+intervention", str(base), iv)
    for name in args.rl_arms:
        rcfg = with_paths(cfg, rl__out=str(work / f"rl_{name}"), model__path=sft["agto"])
        vars_on, perception = RL_ARMS[name]
        rcfg.rl.reward.lambda_v = args.lambda_v if vars_on else 0.0
        rcfg.rl.perception = dataclasses.replace(rcfg.rl.perception, **perception)
        label, final = f"s{seed} RL ({name})", str(stage(seed, f"RL {name}", lambda: run_rl(rcfg)).final_model)
        evaluate(label, final)
        figures = Path(evals[label]) / "perception.json"  # PAPO's and VPPO's figures on this arm's model
        if not figures.exists():
            from bench.perception_probe import perception_figures

            got = stage(seed, f"perception figures {name}",
                        lambda: perception_figures(final, cfg.data.eval, Path(evals[label]) / "samples.jsonl"))
            figures.write_text(json.dumps(got))


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


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def scatter(points: list[tuple[str, float, float]], xlabel: str, r, p, path: Path) -> None:
    """One dot per checkpoint (x against accuracy %), for the companion figures; the headline
    VAS scatter is the production one (avar_ray.eval.plots.vas_accuracy_scatter)."""
    from avar_ray.eval.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    ax.scatter([x[1] for x in points], [x[2] * 100 for x in points], s=36)
    for lab, x, y in points:
        ax.annotate(lab, (x, y * 100), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_title(f"{xlabel} vs accuracy: r = {fmt(r, '.3f')} (p = {fmt(p, '.3g')})", fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ablation_plot(table: dict[str, list[dict]], path: Path) -> None:
    """Accuracy and alpha_img per variant: one dot per seed, a bar at the mean."""
    from avar_ray.eval.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = list(table)
    for ax, (key, scale, ylabel) in zip(axes, (("accuracy", 100, "accuracy (%)"), ("alpha_img", 1, "alpha_img (Q=U)"))):
        for i, name in enumerate(names):
            vals = [g[key] * scale for g in table[name] if g.get(key) is not None]
            if vals:
                ax.bar(i, statistics.mean(vals), color="lightgrey", edgecolor="grey")
                ax.scatter([i] * len(vals), vals, color="black", s=14, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=15, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def rl_halves(eval_dir: str, name: str):
    """(accuracy reward first half, last half, total reward first half, last half) of an RL run's
    metrics.jsonl (WORK/seedN/rl_NAME, beside the seed's eval directory); None when absent."""
    path = Path(eval_dir).parent.parent / f"rl_{name}" / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "reward/accuracy" in r]
    if len(rows) < 2:
        return None
    half = len(rows) // 2

    def mean(part, key):
        return statistics.mean(r[key] for r in part)

    first, last = rows[:half], rows[-half:]
    return mean(first, "reward/accuracy"), mean(last, "reward/accuracy"), mean(first, "reward/total"), \
        mean(last, "reward/total")


def by_type(run_dir: str) -> dict[str, float]:
    """Accuracy per answer type (the easy tasks: choice = largest_colour, integer = count_colour)."""
    groups: dict[str, list[float]] = {}
    for rec in records(run_dir):
        groups.setdefault(rec.get("answer_type", "?"), []).append(rec["accuracy"])
    return {k: statistics.mean(v) for k, v in sorted(groups.items())}


def agreement(a_dir: str, b_dir: str) -> float:
    """Share of the eval rows on which two models' extracted predictions are equal."""
    a = {r["id"]: r.get("prediction") for r in records(a_dir)}
    b = {r["id"]: r.get("prediction") for r in records(b_dir)}
    both = [i for i in a if i in b]
    return sum(a[i] == b[i] for i in both) / max(len(both), 1)


def interval_text(eff: tuple[float, float, float], scale: float, spec: str) -> str:
    mean, low, high = (v * scale for v in eff)
    verdict = "excludes 0" if low > 0 or high < 0 else "includes 0"
    return f"{mean:{spec}} [{low:{spec}}, {high:{spec}}] ({verdict})"


def summarise(args, evals: dict, seconds: float) -> str:
    from avar_ray.attention.vas import SYS_FLOOR
    from avar_ray.eval.analyze import intervals, load_run, pearson, wilson
    from avar_ray.eval.plots import vas_accuracy_scatter

    figs = Path(args.out) / "toy_science"
    figs.mkdir(parents=True, exist_ok=True)
    runs = {label: load_run(d, label) for label, d in evals.items()}
    for run in runs.values():
        run["intervals"] = intervals(run)
        robust = run["intervals"].get("vas_robust")
        run["overall"]["vas_robust"] = robust[0] if robust else None  # mean of the per-sample ratios of means
    ckpts = [lab for lab in runs if "intervention" not in lab]

    def corr(key):
        pts = [(lab, runs[lab]["overall"][key], runs[lab]["overall"]["accuracy"]) for lab in ckpts
               if runs[lab]["overall"].get(key) is not None]
        return (pts, *pearson([x[1] for x in pts], [x[2] for x in pts]))

    pts, r, p = corr("vas")
    pts_rob, r_rob, p_rob = corr("vas_robust")
    pts_img, r_img, p_img = corr("alpha_img")
    trained = [x for x in pts if x[0] != "base"]
    r_trained, p_trained = pearson([x[1] for x in trained], [x[2] for x in trained])
    vas_accuracy_scatter([x[0] for x in pts], [x[2] for x in pts], [("VAS (Q=U)", [x[1] for x in pts], r, p)],
                         figs / "vas_vs_accuracy.png")
    scatter(pts_rob, "robust VAS (Q=U)", r_rob, p_rob, figs / "robust_vas_vs_accuracy.png")
    scatter(pts_img, "alpha_img (Q=U)", r_img, p_img, figs / "alpha_img_vs_accuracy.png")
    vas_values = [x[1] for x in pts]
    spread = max(vas_values) / max(min(vas_values), 1e-30) if vas_values else None
    found = []
    type_ranges: dict[str, list[float]] = {}
    for lab in ckpts:
        for k, v in by_type(evals[lab]).items():
            type_ranges.setdefault(k, []).append(v)
    accs = [runs[lab]["overall"]["accuracy"] for lab in ckpts]
    n_eval = int(runs[ckpts[0]]["overall"]["n"] or 0) if ckpts else 0
    ci_mid = wilson(statistics.median(accs), n_eval) if accs else None
    found.append(
        f"**(a) VAS vs accuracy** (paper: r = 0.96): r = {fmt(r, '.3f')}, p = {fmt(p, '.3g')} over {len(pts)} "
        f"checkpoints: {'reproduces' if r is not None and r > 0 and p is not None and p < 0.05 else 'does not reproduce'} "
        f"at toy scale (robust VAS: r = {fmt(r_rob, '.3f')}, p = {fmt(p_rob, '.3g')}). "
        + ("" if not accs or ci_mid is None else
           f"The checkpoints' accuracies span {(max(accs) - min(accs)) * 100:.1f} points while one checkpoint's 95% "
           f"interval is {(ci_mid[1] - ci_mid[0]) * 100:.0f} points wide at n = {n_eval}: accuracy barely "
           "separates them (per answer type, in the table: "
           + "; ".join(f"{k} {min(v) * 100:.0f}-{max(v) * 100:.0f}%" for k, v in type_ranges.items()) + "). ")
        + f"The paper's VAS spans a factor {fmt(spread, '.3g')} across them at about the same share of blind "
        f"queries: it is set by how small the few smallest system masses are; without the base checkpoint "
        f"(the largest VAS) r = {fmt(r_trained, '.3f')}, p = {fmt(p_trained, '.3g')} over {len(trained)}, whose "
        f"accuracies span {(max(x[2] for x in trained) - min(x[2] for x in trained)) * 100 if trained else 0:.1f} "
        "points, less than one checkpoint's interval.")
    cmd = (f".venv/bin/python bench/toy_science.py --seeds {args.seeds} --n-eval {args.n_eval} --rl-steps "
           f"{args.rl_steps} --sft-epochs {args.sft_epochs} --n-train {args.n_train} --lambda-v {args.lambda_v}"
           f" --rl-arms {' '.join(args.rl_arms)}"
           + "".join(f" {o}" for o in args.overrides))
    lines = ["# The paper's findings at toy scale", "",
             f"Regenerate: `{cmd}` ({seconds / 60:.0f} min on the shared 2-core machine). Every stage is the "
             "production code path, from the warm base (avar_ray/warm_base.py) with the demo's settings "
             "(avar_ray/commands/demo.py DEMO_SETTINGS, short chains, the warm base's tasks), per seed: oracle VARD "
             "synthesis -> cold start with AGTO and with plain SFT (alpha = beta = 0) -> GRPO from the AGTO model "
             f"with VARS (lambda_v = {args.lambda_v}), accuracy only (lambda_v = 0), PAPO and VPPO (rl.perception at "
             f"their papers' settings, lambda_v = 0) and VARS + VPPO at equal steps "
             f"({args.rl_steps}). Eval: the same {args.n_eval} procedural samples (seed 10000) for every checkpoint.",
             "", "## (a) VAS against accuracy across checkpoints", "",
             f"Headline (the paper's VAS, mean over samples of the mean of per-query V/S ratios): Pearson r = "
             f"{fmt(r, '.3f')}, p = {fmt(p, '.3g')} over {len(pts)} checkpoints (paper: r = 0.96 over open 7B "
             f"models). Robust companion (per-sample sum V / sum S, averaged): r = {fmt(r_rob, '.3f')}, "
             f"p = {fmt(p_rob, '.3g')}. alpha_img alone: r = {fmt(r_img, '.3f')}, p = {fmt(p_img, '.3g')}.",
             "", f"The headline VAS spans a factor {fmt(spread, '.3g')} across the checkpoints. \"blind heads\": "
             f"share of (layer, head) pairs whose mean attention mass on the system span is below {SYS_FLOOR:g} "
             "(with the most layers holding one in a sample); \"blind queries\": share of single (layer, head, "
             "query) entries below it. Either makes a V/S ratio huge and so dominates the paper's mean.", "",
             "![VAS vs accuracy](toy_science/vas_vs_accuracy.png) "
             "![robust VAS vs accuracy](toy_science/robust_vas_vs_accuracy.png) "
             "![alpha_img vs accuracy](toy_science/alpha_img_vs_accuracy.png)", "",
             "| checkpoint | accuracy % [95% CI] | by answer type % | VAS (Q=U) | robust VAS (Q=U) | blind heads | blind queries | "
             "alpha_img (U) | alpha_img (R) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for lab in runs:
        o, ci = runs[lab]["overall"], runs[lab]["intervals"]
        acc_ci = wilson(o["accuracy"], int(o["n"] or 0)) or (float("nan"),) * 2
        blind = ci.get("low_sys_heads")
        blind = "n/a" if blind is None else f"{blind * 100:.0f}% ({ci.get('low_sys_layers')} layers)"
        queries = ci.get("low_sys_queries")
        queries = "n/a" if queries is None else f"{queries[0] * 100:.1f}%"
        types = ", ".join(f"{k} {v * 100:.0f}" for k, v in by_type(evals[lab]).items())
        lines.append(f"| {lab} | {o['accuracy'] * 100:.1f} [{acc_ci[0] * 100:.1f}, {acc_ci[1] * 100:.1f}] | {types} | "
                     f"{fmt(o['vas'], '.3g')} | {fmt(o['vas_robust'], '.3g')} | "
                     f"{blind} | {queries} | "
                     f"{fmt(o['alpha_img'], '.4f')} | {fmt(o.get('alpha_img_response'), '.4f')} |")
    lines += ["", "Rows with \"+intervention\" are not checkpoints and are left out of the correlations.", "",
              "## (b) The training-free intervention", "",
              "Paired differences (intervened - plain) over the same eval samples, mean and 95% paired bootstrap "
              "interval (2000 resamples). Plain runs generate with vLLM, intervened ones with transformers "
              "(vLLM cannot apply the key bias); both greedy.", "",
              "| model | Δ accuracy (points) | Δ alpha_img (U) |", "| --- | --- | --- |"]
    pairs = [("base", "base", "base+intervention")] + [
        (f"cold start (AGTO) seed {s}", f"s{s} cold start (agto SFT)", f"s{s} cold start (agto SFT)+intervention")
        for s in range(args.seeds)]
    effects = []
    for name, a, b in pairs:
        if a in evals and b in evals:
            acc = paired_effect(evals[a], evals[b], lambda rec: rec["accuracy"])
            alpha = paired_effect(evals[a], evals[b], lambda rec: rec["attention"]["user"]["alpha_img"])
            effects.append((acc, alpha))
            lines.append(f"| {name} | {interval_text(acc, 100, '+.1f')} | {interval_text(alpha, 1, '+.4f')} |")
    if effects:
        up = sum(al[1] > 0 for _, al in effects)
        better, worse = sum(ac[1] > 0 for ac, _ in effects), sum(ac[2] < 0 for ac, _ in effects)
        found.append(
            f"**(b) The intervention** (paper: more attention on the image and higher accuracy, no training): "
            f"alpha_img rises with an interval above 0 in {up} of {len(effects)} models (mean "
            f"{statistics.mean(al[0] for _, al in effects):+.4f}); accuracy changes by "
            + ", ".join(f"{ac[0] * 100:+.1f}" for ac, _ in effects)
            + f" points, an interval above 0 in {better} and below 0 in {worse} of {len(effects)}: the attention "
            f"shift {'reproduces' if up == len(effects) else 'does not reproduce'}, the accuracy gain "
            f"{'reproduces' if better == len(effects) else 'does not reproduce'} at toy scale.")
    lines += ["", f"## (c) Ablations at equal steps over {args.seeds} seed(s)", "",
              "Mean ± sd over seeds (sd n/a with one seed). Each seed has its own training data, SFT and RL "
              "seeds; the eval set is shared.", "",
              "| variant | accuracy % | VAS (Q=U) | robust VAS (Q=U) | alpha_img (U) | alpha_img (R) |",
              "| --- | --- | --- | --- | --- | --- |"]
    table = {}
    for variant in ("cold start (agto SFT)", "cold start (plain SFT)", *(f"RL ({a})" for a in RL_ARMS)):
        table[variant] = [runs[f"s{s} {variant}"]["overall"] for s in range(args.seeds) if f"s{s} {variant}" in runs]
    for variant, got in table.items():
        if not got:
            continue

        def ms(key, scale=1.0, spec=".2f"):
            vals = [g[key] * scale for g in got if g.get(key) is not None]
            if not vals:
                return "n/a"
            sd = f"{statistics.stdev(vals):{spec}}" if len(vals) > 1 else "n/a"
            return f"{statistics.mean(vals):{spec}} ± {sd}"

        lines.append(f"| {variant} ({len(got)}) | {ms('accuracy', 100, '.1f')} | {ms('vas', 1, '.3g')} | "
                     f"{ms('vas_robust', 1, '.3g')} | {ms('alpha_img', 1, '.4f')} | {ms('alpha_img_response', 1, '.4f')} |")
    lines += ["", "Per-seed differences (same seed, same eval rows):", "",
              "| comparison | Δ accuracy (points) per seed | mean | Δ alpha_img (U) per seed | same prediction |",
              "| --- | --- | --- | --- | --- |"]
    for name, a, b in (("AGTO - plain SFT", "cold start (agto SFT)", "cold start (plain SFT)"),
                       ("VARS - accuracy-only GRPO", "RL (vars)", "RL (acc-only)"),
                       ("PAPO - accuracy-only GRPO", "RL (papo)", "RL (acc-only)"),
                       ("VPPO - accuracy-only GRPO", "RL (vppo)", "RL (acc-only)"),
                       ("VARS + VPPO - VARS", "RL (vars+vppo)", "RL (vars)")):
        d = [(runs[f"s{s} {a}"]["overall"], runs[f"s{s} {b}"]["overall"]) for s in range(args.seeds)
             if f"s{s} {a}" in runs and f"s{s} {b}" in runs]
        if d:
            dacc = [(x["accuracy"] - y["accuracy"]) * 100 for x, y in d]
            dimg = [x["alpha_img"] - y["alpha_img"] for x, y in d]
            same = [agreement(evals[f"s{s} {a}"], evals[f"s{s} {b}"]) for s in range(args.seeds)
                    if f"s{s} {a}" in runs and f"s{s} {b}" in runs]
            lines.append(f"| {name} | {', '.join(f'{v:+.1f}' for v in dacc)} | {statistics.mean(dacc):+.1f} | "
                         f"{', '.join(f'{v:+.4f}' for v in dimg)} | {', '.join(f'{v * 100:.0f}%' for v in same)} |")
            sd = statistics.stdev(dacc) if len(dacc) > 1 else float("nan")
            found.append(
                f"**(c) {name}** at equal steps over {len(d)} seed(s): accuracy {statistics.mean(dacc):+.1f} points "
                f"(sd {sd:.1f}; higher in {sum(v > 0 for v in dacc)}, lower in {sum(v < 0 for v in dacc)} seeds), "
                f"alpha_img (U) {statistics.mean(dimg):+.4f} (higher in {sum(v > 0 for v in dimg)} seeds); the two "
                f"models give the same prediction on {statistics.mean(same) * 100:.0f}% of the eval rows.")
    lines += ["", "GRPO's own training curve (mean over the first and the last half of the steps, over seeds):", "",
              "| run | accuracy reward first -> last half | total reward first -> last half |", "| --- | --- | --- |"]
    for name in RL_ARMS:
        halves = [rl_halves(evals[f"s{s} RL ({name})"], name) for s in range(args.seeds) if f"s{s} RL ({name})" in evals]
        halves = [h for h in halves if h]
        if halves:
            m = [statistics.mean(h[i] for h in halves) for i in range(4)]
            lines.append(f"| RL ({name}) | {m[0]:.3f} -> {m[1]:.3f} | {m[2]:.3f} -> {m[3]:.3f} |")
    lines += ["", "Each method's own perception figure on every arm's final model (its greedy eval responses; "
              "bench/perception_probe.py), mean over seeds: PAPO's masked-vs-real KL (mask 0.6), VPPO's mean token "
              "dependency (mask 0.5).", "", "| run | PAPO KL | VPPO dependency |", "| --- | --- | --- |"]
    for name in RL_ARMS:
        paths = [Path(evals[f"s{s} RL ({name})"]) / "perception.json" for s in range(args.seeds)
                 if f"s{s} RL ({name})" in evals]
        got = [json.loads(path.read_text()) for path in paths if path.exists()]
        if got:
            lines.append(f"| RL ({name}) ({len(got)}) | {statistics.mean(g['papo_kl'] for g in got):.4f} | "
                         f"{statistics.mean(g['vppo_dependency'] for g in got):.4f} |")
    ablation_plot(table, figs / "ablations.png")
    lines += ["", "![ablations](toy_science/ablations.png)", "",
              "Runs (under --work): " + ", ".join(f"`{d}`" for d in evals.values()), ""]
    at = lines.index("## (a) VAS against accuracy across checkpoints")
    return "\n".join(lines[:at] + ["## Findings (computed from the tables below)", ""]
                     + [f"- {f}" for f in found] + [""] + lines[at:])


def main(argv=None) -> int:
    from avar_ray.config import load_config
    from avar_ray.ray_utils import init_ray
    from avar_ray.warm_base import ensure_warm_base

    args = parse_args(argv)
    # WORK/evals.json records the finished seeds (a rerun with the same --work skips them) and the
    # seconds they took, so the report can be rewritten alone (--report-only).
    record = Path(args.work) / "evals.json"
    state = json.loads(record.read_text()) if record.exists() else {"evals": {}, "seconds": 0.0, "seeds": []}
    if not args.report_only:
        cfg = load_config(REPO / "configs" / "tiny_local.yaml")
        base = ensure_warm_base(cfg.warm_base, image_size=cfg.data.image_size)
        init_ray(cfg.ray)
        for seed in range(args.seeds):
            if seed in state["seeds"]:
                print(f"[toy_science] seed {seed}: finished in an earlier run, reused", flush=True)
                continue
            began = time.perf_counter()
            one_seed(args, seed, base, state["evals"])
            state["seeds"].append(seed)
            state["seconds"] += time.perf_counter() - began
            record.write_text(json.dumps(state, indent=2))
            print(f"[toy_science] seed {seed} finished in {time.perf_counter() - began:.0f}s", flush=True)
    done = [lab for lab in state["evals"] if lab[0] != "s" or int(lab[1:].split(" ")[0]) < args.seeds]
    text = summarise(args, {lab: state["evals"][lab] for lab in done}, state["seconds"])
    out = Path(args.out) / "toy_science.md"
    out.write_text(text)
    print(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
