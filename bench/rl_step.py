"""Stage 3's costs, each against a baseline measured in the same run (issues 5 and 10); with
``--shape real``, the learner phase and rewards at the real job's shapes (``bench/rl_step_real.py``);
with ``--perception``, the learner phase with PAPO and VPPO vs VARS and accuracy-only (``bench/rl_perception.py``).

    .venv/bin/python bench/rl_step.py [--model DIR | --layers 28] [--prompts 4] [--n 4]
                                      [--max-new-tokens 64] [--image-size 0] [--steps 3] [--repeats 3]
                                      [--vocab 151936] [--mem-tokens 1024] [--mem-response 512]

On an embedded local Ray, with real actors: one vLLM rollout worker, one DeepSpeed learner
(ZeRO-2), the reward actor; the tiny Qwen2.5-VL (built here unless ``--model``; ``--layers N``
gives it N text layers) and procedural prompts.

  (a) rollout tokens/s on the same prompts and sampling: the vLLM worker vs transformers
      ``generate`` in a Ray actor with the same ``num_cpus=1``; ratio = vLLM / transformers.
  (b) one GRPO step by phase, median over ``--steps`` after a warm-up, before vs after on the
      same rollouts. Before (issue 10's starting point, kept here only): r_visual from a second
      copy of the policy in the reward actor (``OldScorer``: an HF model, statistics for every
      rollout, one more weight-sync receiver). After: the text rewards on the reward actor and
      one no-grad pass of the learners giving the old log-probs and the statistics. Both then
      run the same update and the rollout worker's sync. Also: the learners' pass with vs
      without statistics (issue 10's target: statistics add at most 10%).
  (c) peak memory of the log-prob computation (forward + backward, as in training) at
      vocabulary ``--vocab``: full ``[B, T, V]`` logits as the learner computed them before vs
      the response-only chunked head (``actors.policy.hidden_logprobs``). Each in a fresh
      process; peak = growth of the process's max RSS. Target: chunked <= 1/3 of full.
  (d) image bytes the driver sends per step: before (samples pickled into the rollout, reward
      and learner calls) vs after (each prompt ``ray.put`` once; the reward actor gets text);
      and the old log-probs' round trip (learners -> driver -> learners), in pickled bytes.
  (e) the learners' image preprocessing per step, on the step's rollouts and the learner
      group's own micro-batch plans (the score pass, then the update): before, every rollout
      of every micro-batch through the HF processor (fetched and decoded each time) vs after,
      the per-step prompt cache (``actors.learner_batches``); processor calls and seconds,
      measured in the driver process, plus the calls the learners report.

The machine may be shared and has 2 cores: read ratios, not absolute times.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.rl_common import add_workload_args, bench_model, init_ray  # noqa: E402 - sets the workers' env

T0 = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {message}", flush=True)


def median_time(fn, repeats: int) -> tuple[float, list]:
    times, results = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        results.append(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), results


# ----------------------------------------------------------------------------- baselines (bench only)
class OldScorer:
    """The reward actor before issue 10: a second HF copy of the policy that receives every
    weight sync and computes the response-span statistics of every rollout."""

    def __init__(self, model_dir: str):
        import torch

        from avar_ray.modeling import load_model, load_processor

        torch.manual_seed(0)
        self.model = load_model(model_dir, attn_implementation="avar").eval()
        self.processor = load_processor(model_dir)

    def score(self, rollouts, samples: dict) -> list[float]:
        import torch

        from actors.policy import encode_rollouts
        from actors.reward import RewardScorer
        from avar_ray.attention import attention_statistics
        from avar_ray.config import RewardConfig
        from rewards import visual_ratio

        RewardScorer(RewardConfig()).text(rollouts, samples)  # the same text rewards
        out = []
        for start in range(0, len(rollouts), 8):  # its former batch size
            chunk = rollouts[start:start + 8]
            encoded = encode_rollouts(self.processor, [samples[r.sample_id] for r in chunk],
                                      [r.response_ids for r in chunk])
            with torch.no_grad():
                _, stats = attention_statistics(self.model, encoded, query="response")
            out.extend(visual_ratio(*stats.sample(b)) for b in range(len(chunk)))
        return out

    def update_weights(self, handle) -> float:
        from actors.weight_sync import fetch_buckets, iter_buckets, load_into_module

        start = time.perf_counter()
        load_into_module(self.model, iter_buckets(fetch_buckets(handle)))
        return time.perf_counter() - start


def full_logits_logprobs(logits, input_ids, positions, mask, temperature=1.0, banned_ids=()):
    """The learner's log-probs before issue 10: from the model's full [B, T, V] logits, entropy
    with grad."""
    import torch

    rows = torch.arange(logits.shape[0]).unsqueeze(1)
    picked = logits[rows, (positions - 1).clamp(min=0)].float() / temperature  # [B, R, V]
    if banned_ids:
        picked[..., list(banned_ids)] = float("-inf")
    logp = torch.log_softmax(picked, dim=-1)
    out = logp.gather(-1, input_ids[rows, positions].unsqueeze(-1)).squeeze(-1)
    p = logp.exp()
    entropy = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
    return torch.where(mask, out, torch.zeros_like(out)), torch.where(mask, entropy, torch.zeros_like(entropy))


def logprob_memory_child(kind: str, vocab: int, tokens: int, response: int, hidden: int) -> dict:
    """Peak RSS growth (MB) of one forward + backward of the log-prob computation."""
    import resource

    import torch

    from actors.policy import hidden_logprobs, response_index

    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    states = torch.randn(1, tokens, hidden, requires_grad=True)
    ids = torch.randint(0, vocab, (1, tokens))
    positions, mask = response_index([tokens - response], [response])
    banned = list(range(vocab - 8, vocab))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if kind == "full":
        logprob, entropy = full_logits_logprobs(head(states), ids, positions, mask, 1.0, banned)
    else:
        logprob, entropy = hidden_logprobs(head, states, ids, positions, mask, 1.0, banned, with_entropy=True)
    (logprob.sum() + (entropy.sum() if entropy.requires_grad else 0)).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mb": (peak - base) / 1024, "s": time.perf_counter() - start, "logprob_sum": float(logprob.sum())}


def bench_memory(args) -> dict:
    out = {}
    for kind in ("full", "chunked"):
        proc = subprocess.run([sys.executable, __file__, "--memory-child", kind, "--vocab", str(args.vocab),
                               "--mem-tokens", str(args.mem_tokens), "--mem-response", str(args.mem_response)],
                              capture_output=True, text=True, check=True)
        out[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# ----------------------------------------------------------------------------- actors
def start_actors(model: str, args):
    import ray

    from actors.learner_group import LearnerGroup
    from actors.reward import RewardScorer
    from actors.rollout import RolloutWorker
    from avar_ray.config import AttentionConfig, ModelConfig, PlacementConfig, RewardConfig, RLConfig

    worker = ray.remote(RolloutWorker).options(num_cpus=1).remote(
        RLConfig(), ModelConfig(path=model, max_model_len=1024), 0)
    old = ray.remote(OldScorer).options(num_cpus=1).remote(model)
    reward = ray.remote(RewardScorer).options(num_cpus=1).remote(RewardConfig(visual_gate=False))
    rl = RLConfig(zero_stage=2, lr=1e-5, micro_batch_size=4, n_samples=args.n, placement=PlacementConfig(learners=1),
                  reward=RewardConfig(visual_gate=False))
    learners = LearnerGroup(rl, ModelConfig(path=model), AttentionConfig())
    info = ray.get([worker.ready.remote(), reward.ready.remote()])
    say(f"actors up: vLLM worker {info[0]['start_s']:.1f} s, learner {learners.info[0]['setup_s']:.1f} s")
    return worker, old, reward, learners


class HFGenerator:
    """The baseline sampler: transformers ``generate`` on the rollout prompts."""

    def __init__(self, model_dir: str):
        import torch

        from actors.policy import banned_token_ids
        from avar_ray.modeling import load_model, load_processor

        torch.manual_seed(0)
        self.model = load_model(model_dir, attn_implementation="sdpa").eval()
        self.processor = load_processor(model_dir)
        self.banned = banned_token_ids(self.processor)

    def generate(self, samples, n: int, max_new_tokens: int) -> dict:
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
                                      suppress_tokens=self.banned, pad_token_id=tok.pad_token_id)
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
    sampling = SamplingSpec(n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0)

    def vllm():
        return sum(len(r.response_ids) for r in ray.get(worker.generate.remote(requests, sampling)))

    hf = ray.remote(HFGenerator).options(num_cpus=1).remote(model_dir)

    def transformers():
        return ray.get(hf.generate.remote(samples, args.n, args.max_new_tokens))

    vllm(), transformers()  # warm-up
    t_vllm, tok_vllm = median_time(vllm, args.repeats)
    t_hf, runs = median_time(transformers, args.repeats)
    ray.kill(hf)
    return {"vllm_tok_s": statistics.median(tok_vllm) / t_vllm, "vllm_tokens": tok_vllm[0],
            "hf_tok_s": statistics.median(r["tokens"] for r in runs) / t_hf, "hf_tokens": runs[0]["tokens"],
            "hf_threads": runs[0]["threads"]}


def image_bytes(obj) -> int:
    """Image bytes in ``obj`` pickled as one call argument: the images of every Sample it
    reaches (through dataclasses, dicts, lists), each Sample once as pickle's memo ships a
    shared object once; an object ref carries none. Payload only: pickle frames each image
    with 7 more bytes (BINBYTES opcode, 4-byte length, MEMOIZE, APPEND), not counted."""
    from avar_ray.data.schema import Sample

    found: dict[int, int] = {}

    def walk(x):
        if isinstance(x, Sample):
            found[id(x)] = sum(len(b) for b in x.images)
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            for f in dataclasses.fields(x):
                walk(getattr(x, f.name))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(obj)
    return sum(found.values())


def preprocess_costs(learners, model_dir: str, items) -> dict:
    """Processor calls and seconds of one step's learner-side encoding (the score pass, then the
    update's micro-batches; one rank after the other), on the learner group's own plans:
    before, every rollout of every micro-batch fetched, decoded and processed (the encoding
    the learner had; its update encoded each micro-batch once for all PPO epochs) vs after,
    one ``PromptCache`` per rank and step. Both on this process's CPU, same processor."""
    from actors.learner_batches import CountingProcessor, PromptCache
    from actors.records import conversation, resolve_samples
    from avar_ray.config import ModelConfig
    from avar_ray.modeling import encode_batch, load_processor

    processor = load_processor(model_dir, ModelConfig(path=model_dir))
    PromptCache(processor).encode(items[:1])  # warm-up: a fresh processor's first call is slower
    score = [rank[0] for rank in learners._plan(items, 1)]
    train = learners._plan(items, learners.rl.mini_batches)
    per_rank = [score[r] + [micro for mini in train[r] for micro in mini] for r in range(learners.world_size)]
    out = {}
    for kind in ("before", "after"):
        counting = CountingProcessor(processor)
        start = time.perf_counter()
        for micros in per_rank:
            cache = PromptCache(counting)
            for micro in micros:
                batch = [items[i] for i in micro]
                if kind == "after":
                    cache.encode(batch)
                    continue
                messages, images = zip(*(conversation(s) for s in resolve_samples([it.sample for it in batch])))
                encode_batch(counting, list(messages), list(images), response_ids=[it.response_ids for it in batch])
        out[kind] = {"calls": counting.calls, "s": time.perf_counter() - start}
    out["rollouts"], out["prompts"] = len(items), len({it.sample.binary() for it in items})
    return out


def grpo_step(worker, old, reward, learners, samples, version: int, args) -> dict:
    """One GRPO step; the reward phase both ways (before: old scorer; after: the learners'
    pass). Returns seconds per phase and the bytes each way would send from the driver."""
    import numpy as np
    import ray

    from actors.records import PromptRequest, TrainItem
    from actors.rollout import SamplingSpec
    from avar_ray.grpo import grpo_advantages

    t, by_id = {}, {s.id: s for s in samples}
    start = time.perf_counter()
    refs = [ray.put(s) for s in samples]
    requests = [PromptRequest(i, ref, seed=1000 * version + i) for i, ref in enumerate(refs)]
    sampling = SamplingSpec(n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0)
    rollouts = ray.get(worker.generate.remote(requests, sampling))
    t["rollout"] = time.perf_counter() - start
    # before: a second policy copy scores every rollout
    start = time.perf_counter()
    ray.get(old.score.remote(rollouts, by_id))
    t["before/reward_scorer_copy"] = time.perf_counter() - start
    # after: text rewards, then the learners' pass (old log-probs + statistics), then the sum
    start = time.perf_counter()
    text_only = {s.id: dataclasses.replace(s, images=[]) for s in samples}
    text = ray.get(reward.text.remote(rollouts, text_only))
    t["after/reward_text"] = time.perf_counter() - start
    items = [TrainItem(refs[r.prompt_index], r.response_ids, 0.0, r.logprobs, r.prompt_ids) for r in rollouts]
    start = time.perf_counter()
    passes, _ = learners.score(items, [True] * len(items), with_old=True)  # a full pass: old log-probs too
    t["after/learner_pass_with_stats"] = time.perf_counter() - start
    start = time.perf_counter()
    scored = ray.get(reward.combine.remote(rollouts, text, [p.vas for p in passes], [p.error for p in passes]))
    t["after/reward_combine"] = time.perf_counter() - start
    start = time.perf_counter()
    learners.score(items, [False] * len(items), with_old=True)  # (one optimizer step skips this pass: rl.md)
    t["learner_pass_without_stats"] = time.perf_counter() - start
    advantages = grpo_advantages(np.array([s.total for s in scored]), np.array([r.prompt_index for r in rollouts]))
    for it, a, p in zip(items, advantages, passes):
        it.advantage, it.old_logprobs = float(a), p.old_logprobs
    start = time.perf_counter()
    trained = learners.train_step(items)
    t["update"] = time.perf_counter() - start
    preprocess = preprocess_costs(learners, args.model_dir, items)
    # the learners' own count: both score passes above and the update, all from the cache
    preprocess["learners_calls"] = trained["learner/prompt_encodes"]
    preprocess["learners_s"] = trained["learner/prompt_encode_s"]
    start = time.perf_counter()
    handle = learners.publish_weights(version, 64.0)
    ray.get(worker.update_weights.remote(handle))
    t["sync_rollout_worker"] = time.perf_counter() - start
    start = time.perf_counter()
    ray.get(old.update_weights.remote(handle))
    t["before/sync_scorer_copy"] = time.perf_counter() - start
    # bytes the driver sends: before, samples inside the rollout, reward and learner calls
    with_samples = [dataclasses.replace(it, sample=by_id[samples[r.prompt_index].id]) for it, r in zip(items, rollouts)]
    old_requests = [PromptRequest(i, s, 0) for i, s in enumerate(samples)]
    volume = {"before": image_bytes(old_requests) + image_bytes(by_id) + image_bytes(with_samples),
              "after": sum(image_bytes(s) for s in samples)  # the ray.put of each prompt
              + image_bytes(requests) + image_bytes(text_only) + 2 * image_bytes(items),  # refs: 0
              "unique_images": sum(len(b) for s in samples for b in s.images),
              # old log-probs: back to the driver (ScoredPass) and out again (TrainItem)
              "old_logprobs": 2 * len(pickle.dumps([p.old_logprobs for p in passes], protocol=5)),
              "train_items": len(pickle.dumps(items, protocol=5))}
    return {"t": t, "bytes": volume, "preprocess": preprocess}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--perception" in argv:  # the learner phase with PAPO / VPPO vs VARS and accuracy-only (its own flags)
        from bench.rl_perception import main as perception

        return perception([a for a in argv if a != "--perception"])
    if "--shape" in argv:  # --shape real: bench/rl_step_real.py (its own flags); --shape tiny: this bench
        shape = argv[argv.index("--shape") + 1]
        argv = argv[:argv.index("--shape")] + argv[argv.index("--shape") + 2:]
        if shape == "real":
            from bench.rl_step_real import main as real

            return real(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(parser)
    parser.add_argument("--image-size", type=int, default=0, help="procedural image side in pixels (0: the data default)")
    parser.add_argument("--steps", type=int, default=3, help="timed GRPO steps (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=151_936, help="(c): vocabulary size")
    parser.add_argument("--mem-tokens", type=int, default=1024, help="(c): sequence length")
    parser.add_argument("--mem-response", type=int, default=512, help="(c): response tokens")
    parser.add_argument("--skip-rollout", action="store_true", help="leave out (a)")
    parser.add_argument("--memory-child", choices=("full", "chunked"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        print(json.dumps(logprob_memory_child(args.memory_child, args.vocab, args.mem_tokens, args.mem_response, 128)))
        return

    import ray

    from avar_ray.data.procedural import generate_samples
    from avar_ray.data.schema import pil_images

    memory = bench_memory(args)
    say("log-prob memory measured")
    model = bench_model(args, Path(tempfile.mkdtemp(prefix="rl_bench_")))
    args.model_dir = model
    samples = generate_samples(args.prompts, seed=0, **({"image_size": args.image_size} if args.image_size else {}))
    init_ray()
    try:
        worker, old, reward, learners = start_actors(model, args)
        roll = None if args.skip_rollout else bench_rollout(worker, model, samples, args)
        say("rollout throughput measured")
        grpo_step(worker, old, reward, learners, samples, 1, args)  # warm-up step
        steps = [grpo_step(worker, old, reward, learners, samples, 2 + i, args) for i in range(args.steps)]
        say("GRPO steps measured")
        learners.shutdown()
    finally:
        ray.shutdown()

    print(f"\n== RL step bench: {args.prompts} prompts x {args.n} samples, <= {args.max_new_tokens} new tokens, "
          f"{'x'.join(map(str, pil_images(samples[0])[0].size))} images, model {model}")
    if roll is not None:
        print(f"(a) rollout tokens/s, same prompts (median of {args.repeats})")
        print(f"    vLLM worker:            {roll['vllm_tok_s']:8.1f} tok/s ({roll['vllm_tokens']} tokens)")
        print(f"    transformers generate:  {roll['hf_tok_s']:8.1f} tok/s ({roll['hf_tokens']} tokens, "
              f"{roll['hf_threads']} torch thread(s) in its 1-CPU actor)")
        print(f"    ratio vLLM / transformers: {roll['vllm_tok_s'] / roll['hf_tok_s']:.2f}x")
    med = {p: statistics.median(s["t"][p] for s in steps) for p in steps[0]["t"]}
    before = med["rollout"] + med["before/reward_scorer_copy"] + med["update"] + med["sync_rollout_worker"] \
        + med["before/sync_scorer_copy"]
    after = med["rollout"] + med["after/reward_text"] + med["after/learner_pass_with_stats"] \
        + med["after/reward_combine"] + med["update"] + med["sync_rollout_worker"]
    print(f"(b) one GRPO step by phase (median of {args.steps} steps after a warm-up; same rollouts both ways)")
    for p, v in med.items():
        print(f"    {p:<34} {v * 1e3:8.1f} ms")
    print(f"    step before (second policy copy for r_visual): {before * 1e3:8.1f} ms")
    print(f"    step after  (r_visual from the learners' pass): {after * 1e3:8.1f} ms   after / before = "
          f"{after / before:.2f}")
    print(f"    learners' no-grad pass with / without the statistics: "
          f"{med['after/learner_pass_with_stats'] / med['learner_pass_without_stats']:.3f}x (target <= 1.10)")
    print("    (before, the PPO ratio used no old log-probs at all: the pass without statistics is the price of real "
          "old log-probs)")
    full, chunked = memory["full"], memory["chunked"]
    print(f"(c) log-prob peak memory, forward + backward, V = {args.vocab:,}, {args.mem_tokens} tokens of which "
          f"{args.mem_response} response (fresh process each)")
    print(f"    full [B, T, V] logits:         {full['peak_mb']:8.1f} MB  ({full['s']:.2f} s)")
    print(f"    response-only, chunked head:   {chunked['peak_mb']:8.1f} MB  ({chunked['s']:.2f} s)   chunked / full = "
          f"{chunked['peak_mb'] / full['peak_mb']:.3f}")
    print(f"    same log-probs: sums {full['logprob_sum']:.3f} vs {chunked['logprob_sum']:.3f}")
    vol = steps[-1]["bytes"]
    print("(d) image bytes the driver ships per step (payload in pickled call arguments and puts)")
    print(f"    unique image bytes of the step: {vol['unique_images']:,}")
    print(f"    before (samples in rollout, reward and learner calls): {vol['before']:,}")
    print(f"    after  (one ray.put per prompt + refs + text-only samples): {vol['after']:,}   after / before = "
          f"{vol['after'] / vol['before']:.2f}, after / unique = {vol['after'] / vol['unique_images']:.2f}")
    print(f"    old log-probs learners -> driver -> learners: {vol['old_logprobs']:,} bytes pickled per step "
          f"(the update's TrainItems in all: {vol['train_items']:,})")
    pre = steps[-1]["preprocess"]
    before, after = pre["before"], pre["after"]
    print(f"(e) learners' image preprocessing per step ({pre['rollouts']} rollouts of {pre['prompts']} prompts; "
          "the score pass + the update, the learner group's plans)")
    print(f"    before (every rollout, every micro-batch): {before['calls']:4d} processor calls {before['s'] * 1e3:8.1f} ms")
    print(f"    after  (per-step prompt cache):            {after['calls']:4d} processor calls {after['s'] * 1e3:8.1f} ms"
          f"   calls before / after = {before['calls'] / after['calls']:.1f}x, time {before['s'] / after['s']:.1f}x")
    print(f"    the learners report {pre['learners_calls']} processor calls ({pre['learners_s'] * 1e3:.1f} ms) for the "
          "step: two score passes and the update")


if __name__ == "__main__":
    main()
