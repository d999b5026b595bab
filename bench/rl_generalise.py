"""Does RL generalise in the toy world? The demo's setting run for several hundred RL steps (long;
not in CI): writes docs/results/rl_generalise.md and its plot.

    .venv/bin/python bench/rl_generalise.py                       # 2 data seeds x 200 RL steps
    .venv/bin/python bench/rl_generalise.py --seeds 0 --steps 100 # one seed, shorter
    .venv/bin/python bench/rl_generalise.py --report-only         # rewrite the report from WORK

Per data seed this is `avar demo --keep data.seed=S rl.steps=N rl.eval_every=E` (the demo's whole
pipeline and settings: warm base, procedural data, oracle synthesis, cold-start SFT, GRPO on
fresh training prompts, eval; the held-out curve every E steps on the 200 evaluation rows). A rerun
with the same --work continues: the demo's --keep reuses finished stages and resumes the RL stage
from its newest checkpoint. The report reads each run's held-out curve (rl/heldout.jsonl), its
training reward (rl/metrics.jsonl) and the held-out answers per task at the first and last
evaluation (rl/heldout/step_N.jsonl: pass@1, sampled accuracy with its 95% interval, pass@k, tabled
as the demo's analysis does).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CURVE_KEYS = (("greedy", "eval/accuracy"), ("sampled", "eval/accuracy_sampled"), ("pass@k", "eval/pass_at_k"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "docs" / "results"))
    p.add_argument("--work", default="/tmp/avar_rl_generalise", help="one demo output per data seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="data.seed of each run")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from the runs in --work")
    p.add_argument("overrides", nargs="*", help="dotted config overrides after the demo's settings")
    return p.parse_args(argv)


def run_seed(args, seed: int) -> float:
    """The demo with a long RL stage for one data seed; returns its wall seconds."""
    out = Path(args.work) / f"seed_{seed}"
    cmd = [sys.executable, "-m", "avar_ray.cli", "demo", "--out", str(out), "--keep", f"data.seed={seed}",
           f"rl.steps={args.steps}", f"rl.eval_every={args.eval_every}", "rl.save_every=50", *args.overrides]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    seconds = time.perf_counter() - t0
    (out / "bench_seconds.txt").write_text(f"{seconds:.0f}\n")
    return seconds


def smooth(values: list[float], k: int = 10) -> list[float]:
    """Trailing mean over ``k`` steps (the per-step training reward is noisy: 64 rollouts)."""
    return [float(np.mean(values[max(0, i - k + 1):i + 1])) for i in range(len(values))]


def seed_report(run: Path) -> dict:
    from avar_ray.tracking import read_metrics

    curve = read_metrics(run / "rl" / "heldout.jsonl")
    train = read_metrics(run / "rl" / "metrics.jsonl")
    return {"run": run, "curve": curve, "train": [(r["step"], r["reward/accuracy"]) for r in train]}


def plot(reports: dict[int, dict], path: Path) -> Path:
    from avar_ray.eval.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(reports), figsize=(6.0 * len(reports), 4.2), squeeze=False)
    for ax, (seed, rep) in zip(axes[0], reports.items()):
        steps, values = zip(*rep["train"]) if rep["train"] else ((), ())
        ax.plot(steps, smooth(list(values)), color="grey", lw=1, label="training rollouts (accuracy reward, 10-step mean)")
        for name, key in CURVE_KEYS:
            ax.plot([r["step"] for r in rep["curve"]], [r[key] for r in rep["curve"]], marker="o", ms=3,
                    label=f"held-out: {name}")
        ax.set(xlabel="RL step", ylabel="accuracy", ylim=(0, 1), title=f"data.seed={seed}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(args, reports: dict[int, dict], seconds: dict[int, float]) -> Path:
    from avar_ray.commands.demo import per_task_section

    out = Path(args.out)
    png = plot(reports, out / "rl_generalise" / "curves.png")
    lines = ["# RL generalisation in the toy world (bench/rl_generalise.py)", "",
             f"Command: `.venv/bin/python bench/rl_generalise.py --seeds {' '.join(map(str, reports))} "
             f"--steps {args.steps} --eval-every {args.eval_every}"
             + (" " + " ".join(args.overrides) if args.overrides else "") + "` (2 cores; per seed: "
             + ", ".join(f"seed {s} {seconds[s] / 60:.0f} min" for s in seconds) + ").", "",
             "Each run is `avar demo` with a long RL stage: the held-out curve is the RL policy on the demo's "
             "200 evaluation rows (never trained on), greedy, and 4 samples per row at the rollout temperature.", "",
             f"![curves]({png.relative_to(out)})", ""]
    for seed, rep in reports.items():
        lines += [f"## data.seed={seed}", "", "| step | greedy | sampled | pass@k |", "|---|---|---|---|"]
        lines += [f"| {r['step']} | " + " | ".join(f"{r[key]:.3f}" for _, key in CURVE_KEYS) + " |" for r in rep["curve"]]
        lines += ["", per_task_section(rep["run"] / "rl", rep["curve"][0]["step"], rep["curve"][-1]["step"])]
    path = out / "rl_generalise.md"
    marker = "<!-- findings -->"  # hand-written findings below the marker survive a rewrite
    kept = path.read_text().split(marker, 1)[1] if path.exists() and marker in path.read_text() else "\n"
    path.write_text("\n".join(lines) + "\n" + marker + kept)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    seconds = {}
    for seed in args.seeds:
        recorded = Path(args.work) / f"seed_{seed}" / "bench_seconds.txt"
        seconds[seed] = float(recorded.read_text()) if args.report_only else run_seed(args, seed)
    reports = {seed: seed_report(Path(args.work) / f"seed_{seed}") for seed in args.seeds}
    print(f"wrote {write_report(args, reports, seconds)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
