"""avar-ray's GRPO step next to TRL's ``GRPOTrainer`` on the same CPU work.

    .venv/bin/python bench/peer_trl.py [--steps 8] [--warmup 1] [--repeats 3] [--prompts 2] [--n 4]
                                       [--max-new-tokens 32] [--lr 1e-5] [--cpus 1] [--set KEY=VALUE ...]

TRL is not a dependency of the package: ``make bench`` installs ``trl==1.16.0`` (with
accelerate, datasets, multiprocess; nothing already installed changes). Both sides get:

* the same tiny Qwen2.5-VL (built here, seed 0, float32) and the same procedural prompts
  (image + question), in the same order: avar-ray's seeded sampler (``PromptSampler``) decides
  the order, and TRL reads a dataset laid out in that order with shuffling off;
* the same samples per prompt (``--n``), prompts per step, new tokens (both stop early only at
  end of turn; both ban the template tokens of ``avar_ray.spans``), learning rate, temperature 1,
  no KL, one PPO epoch, token-mean loss (TRL ``loss_type="dapo"``), group-normalised advantages;
* the same CPUs: each side runs alone (one after the other, each in a subprocess) on the same
  machine; TRL with ``torch.set_num_threads(--cpus)``, avar-ray's actors with Ray's one thread
  per actor (its local Ray gets ``max(--cpus, 4)`` logical CPUs: they only gate placement, and a
  rollout worker, a reward actor and a learner need 3 slots).

Rewards: TRL gets avar-ray's accuracy and format functions (``rewards``); avar-ray also computes
r_visual from its learners' statistics pass for the rollouts SPEC.md §5's gate lets through (the
correct ones: none for the random tiny model, so its step runs no such pass; with one optimizer
step its old log-probs come from the update's forward, as TRL's at ``num_iterations=1``).
Step time: the median over the steps after ``--warmup`` of all ``--repeats`` runs (the sides
alternate: avar-ray, TRL, avar-ray, TRL, ...), beside each run's median and the spread of the
per-run ratios; avar-ray's from its ``metrics.jsonl``
(``time/step`` less ``time/checkpoint``: the last step saves one and TRL saves none, so the
compared step is the same work; the raw figure is printed too), TRL's from a callback around
each optimizer step, with its generation (``GRPOTrainer._generate``, timed) split from the rest.
The weight sync is split into the learners' publish and the vLLM worker's load
(``sync/publish_s``, ``sync/load_s``). The load average is printed before and after each run. The machine may be shared:
read the ratio and the phases, not the absolute seconds. TRL's ``--cpus 2`` is one process with
two OpenMP threads: while another job holds a core, every parallel op waits for the descheduled
thread and its steps take 10-45 s instead of 0.4-0.8 s (``bench/results/peer_trl.md``);
``--cpus 1`` (the default) gives TRL one thread, the figure to read on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def prompt_order(n_rows: int, steps: int, prompts: int, seed: int) -> list[int]:
    """Row indices in the order avar-ray's sampler draws them, step after step."""
    from avar_ray.rl.pipeline import PromptSampler

    sampler = PromptSampler(size=n_rows, seed=seed)
    return [i for _ in range(steps) for i in sampler.next_indices(prompts)]


def run_avar(args, model: Path, data: Path, out: Path) -> dict:
    overrides = [f"model.path={model}", f"data.train={data}", f"rl.out={out}", f"rl.steps={args.steps}",
                 f"rl.prompts_per_step={args.prompts}", f"rl.n_samples={args.n}",
                 f"rl.max_new_tokens={args.max_new_tokens}", f"rl.lr={args.lr}", "rl.kl_coef=0.0", "rl.ppo_epochs=1",
                 "rl.temperature=1.0", "rl.save_every=0", f"ray.num_cpus={max(args.cpus, 4)}", f"rl.seed={args.seed}",
                 *args.set]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "avar_ray", "rl", "-c", str(REPO / "configs" / "tiny_local.yaml"),
                           *overrides], capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"avar rl failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    actors = [line for line in proc.stdout.splitlines() if line.startswith("rl: actors up in")]
    return {"rows": rows, "wall_s": wall, "actors_line": actors[0] if actors else ""}


TRL_CHILD = r'''
import json, os, sys, time
import torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["cpus"])
from datasets import Dataset
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from avar_ray.data.readers import read_samples
from avar_ray.data.schema import build_messages, pil_images
from avar_ray.spans import banned_token_ids
from rewards import accuracy_reward, format_reward

samples, _ = read_samples(args["data"])
rows = []
for i in args["order"]:
    s = samples[i]
    rows.append({"prompt": build_messages(s), "images": pil_images(s), "answer": s.answer,
                 "answer_type": s.answer_type, "choices": list(s.choices), "precision": s.precision})

def text(c):
    return c[0]["content"] if isinstance(c, list) else c

def r_acc(completions, answer, answer_type, choices, precision, **_):
    return [accuracy_reward(text(c), a, t, ch or None, p) for c, a, t, ch, p in
            zip(completions, answer, answer_type, choices, precision)]

def r_fmt(completions, **_):
    return [format_reward(text(c)) for c in completions]

class StepClock(TrainerCallback):
    def __init__(self):
        self.times, self.gen, self.t0 = [], [], None
    def on_step_begin(self, *a, **k):
        self.t0 = time.perf_counter()
        self.gen.append(0.0)
    def on_step_end(self, *a, **k):
        self.times.append(time.perf_counter() - self.t0)

clock = StepClock()
untimed_generate = GRPOTrainer._generate

def timed_generate(self, *a, **k):  # the step's generation seconds, the rest being scoring and the update
    t = time.perf_counter()
    try:
        return untimed_generate(self, *a, **k)
    finally:
        clock.gen[-1] += time.perf_counter() - t

GRPOTrainer._generate = timed_generate

model = AutoModelForImageTextToText.from_pretrained(args["model"], dtype=torch.float32)
# Left padding, as TRL's own processor loading sets it: GRPOTrainer pads prompt_ids on the left but
# takes mm_token_type_ids from the processor's call, so a right-padding processor shifts the image
# positions of the shorter prompt in a batch (wrong M-RoPE positions, or get_rope_index's "shape
# mismatch" once the shift passes the image; huggingface/trl#5785).
processor = AutoProcessor.from_pretrained(args["model"], padding_side="left", truncation_side="left")
# One optimizer step per step of P prompts x n samples, as avar-ray: one generation batch, then
# micro-batches of n rollouts (avar-ray's rl.micro_batch_size is 4 = n here).
config = GRPOConfig(output_dir=args["out"], per_device_train_batch_size=args["n"],
                    gradient_accumulation_steps=args["prompts"],
                    num_generations=args["n"], max_completion_length=args["max_new_tokens"],
                    learning_rate=args["lr"], max_steps=args["steps"], num_iterations=1, beta=0.0,
                    temperature=1.0, loss_type="dapo", scale_rewards="group", shuffle_dataset=False,
                    use_cpu=True, bf16=False, logging_steps=1, report_to=[], save_strategy="no",
                    seed=args["seed"], lr_scheduler_type="constant", warmup_steps=0,
                    # avar-ray's sampler bans the same template tokens (a sampled <|image_pad|> breaks the next forward)
                    generation_kwargs={"suppress_tokens": banned_token_ids(processor)})
t0 = time.perf_counter()
trainer = GRPOTrainer(model=model, reward_funcs=[r_acc, r_fmt], args=config,
                      train_dataset=Dataset.from_list(rows), processing_class=processor, callbacks=[clock])
start_s = time.perf_counter() - t0
trainer.train()
print("TRL_RESULT", json.dumps({"step_s": clock.times, "generate_s": clock.gen, "start_s": start_s}))
'''


def run_trl(args, model: Path, data: Path, out: Path, order: list[int]) -> dict:
    payload = json.dumps({"model": str(model), "data": str(data), "out": str(out), "order": order,
                          "steps": args.steps, "prompts": args.prompts, "n": args.n, "seed": args.seed,
                          "max_new_tokens": args.max_new_tokens, "lr": args.lr, "cpus": args.cpus})
    env = {**os.environ, "OMP_NUM_THREADS": str(args.cpus), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", TRL_CHILD, payload], capture_output=True, text=True, cwd=REPO, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("TRL_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"TRL run failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(lines[-1].removeprefix("TRL_RESULT "))


def actors_up_s(line: str) -> float | None:
    """The seconds of avar-ray's ``rl: actors up in 41.3s (...)`` line."""
    found = re.search(r"actors up in ([0-9.]+)s", line)
    return float(found.group(1)) if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="steps per run (8 - 1 warm-up: a median of 7 per run)")
    parser.add_argument("--warmup", type=int, default=1, help="steps left out of the median")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating avar-ray, TRL, ...")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-5)
    # 1: with 2, TRL's one process runs two OpenMP threads, and on a shared machine each of its
    # small ops waits for the descheduled one (10-45 s steps, bench/results/peer_trl.md)
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more avar-ray config overrides (e.g. rl.weight_sync_backend=object_store)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "peer_trl.json"))
    args = parser.parse_args()
    if args.steps <= args.warmup or args.repeats < 1:
        raise SystemExit("--steps must exceed --warmup and --repeats be at least 1")

    from avar_ray.data.procedural import write_procedural
    from avar_ray.data.readers import read_samples
    from avar_ray.rl.driver import PHASES
    from avar_ray.tiny_model import build_tiny_model

    load = [os.getloadavg()]
    runs = []  # (avar-ray's run, TRL's run) per repeat, alternating so that load drifts hit both sides
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_model(tmp / "tiny", seed=0)
        data = write_procedural(tmp / "data", n=32, seed=0)
        samples = read_samples(data)[0]
        order = prompt_order(len(samples), args.steps, args.prompts, args.seed)
        trl_ids = [samples[i].id for i in order]
        for r in range(args.repeats):
            avar = run_avar(args, model, data, tmp / f"avar{r}")
            runs.append((avar, run_trl(args, model, data, tmp / f"trl{r}", order)))
            load.append(os.getloadavg())
            print(f"run {r + 1}/{args.repeats} done, load average {load[-1][0]:.2f}", flush=True)

    same = all([i for r in avar["rows"] for i in (r.get("data/prompt_ids") or [])] == trl_ids for avar, _ in runs)
    timed = [r for avar, _ in runs for r in avar["rows"][args.warmup:]]  # all runs' timed steps
    raw_steps = [r["time/step"] for r in timed]
    avar_steps = [r["time/step"] - r["time/checkpoint"] for r in timed]  # TRL saves no checkpoint
    trl_steps = [s for _, trl in runs for s in trl["step_s"][args.warmup:]]
    trl_gen = [s for _, trl in runs for s in trl["generate_s"][args.warmup:]]
    a, t = statistics.median(avar_steps), statistics.median(trl_steps)
    per_run = []
    for (avar, trl), after in zip(runs, load[1:]):
        rows = avar["rows"][args.warmup:]
        ra = statistics.median(r["time/step"] - r["time/checkpoint"] for r in rows)
        rt = statistics.median(trl["step_s"][args.warmup:])
        per_run.append({"avar_s": ra, "trl_s": rt, "ratio": ra / rt, "load_after": after[0],
                        "avar_rollout_s": statistics.median(r["time/rollout"] for r in rows),
                        "trl_generate_s": statistics.median(trl["generate_s"][args.warmup:]),
                        "avar_actors_up_s": actors_up_s(avar["actors_line"]), "trl_start_s": trl["start_s"]})
    ratios = [p["ratio"] for p in per_run]

    def median(key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in timed)
    print(f"\nGRPO step on the tiny model, {args.prompts} prompts x {args.n} samples, {args.max_new_tokens} new tokens, "
          f"float32, lr {args.lr:g}, {args.cpus} CPUs; median of steps {args.warmup + 1}..{args.steps} of "
          f"{args.repeats} run(s) per side ({len(avar_steps)} steps each), the sides alternating")
    actors = " / ".join(str(p["avar_actors_up_s"]) for p in per_run)
    built = " / ".join(f"{p['trl_start_s']:.1f}" for p in per_run)
    print(f"  avar-ray  {a:7.2f} s/step   without its checkpoint ({statistics.median(raw_steps):.2f} with it); "
          f"actors up in {actors} s")
    print(f"  TRL       {t:7.2f} s/step   (trainer built in {built} s)")
    print(f"  ratio avar-ray / TRL: {a / t:.2f}x  ({'avar-ray slower' if a > t else 'avar-ray faster'}); "
          f"per-run ratios {min(ratios):.2f}-{max(ratios):.2f}")
    for k, p in enumerate(per_run, 1):
        print(f"  run {k}: avar-ray {p['avar_s']:.2f} (rollout {p['avar_rollout_s']:.2f}), TRL {p['trl_s']:.2f} "
              f"(generate {p['trl_generate_s']:.2f}), ratio {p['ratio']:.2f}, load after {p['load_after']:.2f}")
    print("avar-ray's step by phase (median s over all runs):")
    phases = {p: median(f"time/{p}") for p in PHASES}
    for p, s in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"  {p:12} {s:7.2f}  {100 * s / a:5.1f}%")
    print(f"  other        {a + phases['checkpoint'] - sum(phases.values()):7.2f}  (driver, scheduling)")
    print("  (the step compared with TRL's leaves out the checkpoint)")
    detail = {k: median(k) for k in ("learner/score_rollouts", "time/old_logprob_forward", "sync/publish_s",
                                      "sync/load_s", "sync/mb", "sync/buckets", "actor/logprob_diff_max")}
    print(f"  score pass: {detail['learner/score_rollouts']:.0f} of {args.prompts * args.n} rollouts forwarded "
          f"({detail['time/old_logprob_forward']:.3f} s); weight sync of {detail['sync/mb']:.1f} MiB in "
          f"{detail['sync/buckets']:.0f} bucket(s): learners' publish {detail['sync/publish_s']:.3f} s, vLLM load "
          f"{detail['sync/load_s']:.3f} s")
    diff = max(r.get("actor/logprob_diff_max", float("nan")) for r in timed)
    print(f"  vLLM vs learner log-probs after each sync: max |diff| {diff:.2e}")
    print(f"TRL's step (median s): generate {statistics.median(trl_gen):.2f}, the rest (rewards, log-probs, loss, "
          f"backward, optimizer) {t - statistics.median(trl_gen):.2f}; avar-ray: rollout {phases['rollout']:.2f}, "
          f"the rest {a - phases['rollout']:.2f}")
    print(f"same prompts in the same order on both sides, every run: {same}")
    print("load average (1, 5, 15 min) before, then after each run: "
          + ", ".join(f"{x[0]:.2f} {x[1]:.2f} {x[2]:.2f}" for x in load))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "avar_step_s": avar_steps,
                                          "avar_step_with_checkpoint_s": raw_steps, "trl_step_s": trl_steps,
                                          "ratio": a / t, "ratio_per_run_min_max": [min(ratios), max(ratios)],
                                          "runs": per_run, "avar_phases_s": phases, "avar_detail": detail,
                                          "loadavg_before_after_each": load, "trl_generate_s": trl_gen,
                                          "order": order, "same_prompts": same}, indent=1) + "\n")


if __name__ == "__main__":
    main()
