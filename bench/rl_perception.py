"""The learner phase with PAPO and VPPO (``rl.perception``; issue 23) against VARS alone and
accuracy-only, on the same rollouts, each arm a learner group of its own measured in the same
run (``bench/rl_step.py --perception`` runs this).

    .venv/bin/python bench/rl_step.py --perception [--model DIR | --layers 28] [--prompts 4] [--n 4]
                                      [--max-new-tokens 64] [--repeats 3] [--learners 1] [--zero-stage 2]

The learner phase = the score pass (no grad) + the update (one optimizer step, the default), as
the driver calls them: accuracy-only runs no score forward (the update takes its own old
log-probs); VARS forwards every rollout with attention statistics (the gate off: the most
statistics a step can want); PAPO as its code runs (masked log-probs in the score pass) and with
its masked forward with grad (``papo_masked_grad``); VPPO (the score pass on every rollout: old
and masked log-probs). Responses are random allowed tokens of ``--max-new-tokens`` each (no vLLM:
the learner's cost alone). Every arm's group is up at once and the arms run in interleaved rounds
(``--repeats``, after a warm-up): the fastest round per arm; the machine may be shared: read the ratios.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.rl_common import add_workload_args, bench_model, init_ray  # noqa: E402 - sets the workers' env

PAPO, VPPO = {"papo_coef": 0.02}, {"vppo": True}
ARMS = {  # name: (VARS statistics wanted, rl.perception settings)
    "accuracy-only": (False, {}),
    "VARS": (True, {}),
    "PAPO": (False, PAPO),
    "PAPO masked grad": (False, {**PAPO, "papo_masked_grad": True}),
    "VPPO": (False, VPPO),
    "VARS + PAPO": (True, PAPO),
    "VARS + VPPO": (True, VPPO),
}


def make_items(model_dir: str, args):
    import ray
    import torch

    from actors.policy import banned_token_ids
    from actors.records import TrainItem
    from avar_ray.config import ModelConfig
    from avar_ray.data.procedural import generate_samples
    from avar_ray.modeling import load_processor

    processor = load_processor(model_dir, ModelConfig(path=model_dir))
    banned = set(banned_token_ids(processor))
    allowed = [i for i in range(len(processor.tokenizer)) if i not in banned]
    gen = torch.Generator().manual_seed(0)
    refs = [ray.put(s) for s in generate_samples(args.prompts, seed=0)]
    return [TrainItem(refs[p], [allowed[int(j)] for j in torch.randint(0, len(allowed), (args.max_new_tokens,),
                                                                        generator=gen)],
                      1.0 if k % 2 else -1.0, [0.0] * args.max_new_tokens)
            for p in range(args.prompts) for k in range(args.n)]


def learner_phase(group, items, want: bool, step: int) -> tuple[float, float, dict]:
    """(score seconds, update seconds, the update's metrics) of one step."""
    from dataclasses import replace

    start = time.perf_counter()
    passes, _ = group.score(items, [want] * len(items), step=step)
    score_s = time.perf_counter() - start
    items = [replace(it, old_logprobs=p.old_logprobs, masked_logprobs=p.masked_logprobs)
             for it, p in zip(items, passes)]
    start = time.perf_counter()
    metrics = group.train_step(items, step)
    return score_s, time.perf_counter() - start, metrics


def make_group(model_dir: str, settings: dict, args):
    from actors.learner_group import LearnerGroup
    from avar_ray.config import AttentionConfig, ModelConfig, PerceptionConfig, PlacementConfig, RLConfig

    rl = RLConfig(zero_stage=args.zero_stage, micro_batch_size=4, n_samples=args.n,
                  placement=PlacementConfig(learners=args.learners, learner_cpus=0.5),
                  perception=PerceptionConfig(**settings))
    return LearnerGroup(rl, ModelConfig(path=model_dir), AttentionConfig())


def run_arms(model_dir: str, items, args) -> dict:
    """Every arm's group alive at once; rounds of one learner phase per arm, the arms' order
    rotated each round (a load spike on the shared machine hits the arms alike); per arm the
    fastest round."""
    groups = {name: make_group(model_dir, ARMS[name][1], args) for name in args.arms}
    runs: dict = {name: [] for name in args.arms}
    try:
        for name, group in groups.items():
            learner_phase(group, items, ARMS[name][0], 0)  # warm-up
        for r in range(args.repeats):
            for name in args.arms[r % len(args.arms):] + args.arms[:r % len(args.arms)]:
                runs[name].append(learner_phase(groups[name], items, ARMS[name][0], 1 + r))
    finally:
        for group in groups.values():
            group.shutdown()
    out = {}
    for name, got in runs.items():
        best = min(got, key=lambda r: r[0] + r[1])
        out[name] = {"score": best[0], "update": best[1], "total": best[0] + best[1],
                     "median": statistics.median(r[0] + r[1] for r in got),
                     "metrics": {k: v for k, v in got[-1][2].items() if k.startswith("perception/")}}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--learners", type=int, default=1)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    args = parser.parse_args(argv)

    import ray

    model = bench_model(args, Path(tempfile.mkdtemp(prefix="rl_perception_")))
    init_ray()
    try:
        results = run_arms(model, make_items(model, args), args)
    finally:
        ray.shutdown()
    base = {k: results[k]["total"] for k in ("VARS", "accuracy-only") if k in results}
    print(f"\n== learner phase (score pass + update), {args.prompts} prompts x {args.n} rollouts x "
          f"{args.max_new_tokens} tokens, {args.learners} learner(s) ZeRO-{args.zero_stage}, model {model}; "
          f"fastest of {args.repeats} interleaved rounds (median in brackets)")
    print("| arm | score s | update s | total s | / VARS | / accuracy-only |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        ratios = [f"{r['total'] / base[k]:.2f}" if k in base else "-" for k in ("VARS", "accuracy-only")]
        print(f"| {name} | {r['score']:.2f} | {r['update']:.2f} | {r['total']:.2f} ({r['median']:.2f}) | "
              f"{' | '.join(ratios)} |")
    for name, r in results.items():
        if r["metrics"]:
            print(f"{name}: " + ", ".join(f"{k.removeprefix('perception/')}={v:.4g}" for k, v in r["metrics"].items()))


if __name__ == "__main__":
    main()
