"""``bench/rl_step.py --shape real``: the GRPO step's learner phase and rewards at the real job's
shapes (issue 24), before vs after, interleaved.

    .venv/bin/python bench/rl_step.py --shape real [--prompts 16] [--n 8] [--length-scale 1.0]
        [--rounds 2] [--base 7a873c2] [--reward-rollouts 2048]
        [--parts learner,startup,checkpoint] [--startup-prompts 5000] [--gen-seconds 0]

* The model: the tiny Qwen2.5-VL at Qwen2.5-VL-3B's text widths, 2 layers (hidden 2,048, 16/2
  heads, intermediate 11,008, vocabulary 151,936, the head tied to the embedding as 3B's), the
  tiny vision tower; float32, random weights (built here).
* The work: ``--prompts`` x ``--n`` rollouts; prompts of 300-1,500 tokens (procedural image +
  filler question text), responses lognormal (median 300) capped at 2,048 tokens, ids sampled
  from the allowed vocabulary (not generated); every length times ``--length-scale`` (the
  issue's shapes at 1.0; smaller on a CPU that cannot run them in minutes). A quarter of the
  rollouts want attention statistics (the correct ones under the gate).
* The learner phase: the score pass (statistics) + the update (one optimizer step, on-policy:
  ``rl.ppo_epochs = rl.mini_batches = 1``), ``rl.micro_batch_size`` 4, 2 learner ranks,
  DeepSpeed ZeRO-3 over gloo (SGD and small buckets: two ranks fit a shared 24 GB machine),
  each rank a process of its own (no Ray), as ``LearnerGroup``
  plans and calls them. Before: the code at ``--base`` (``git archive``: the longest-first
  micro-batches and the LM head called per 128-token chunk); after: this tree. Rounds
  alternate before / after; each process times its second step (the first warms up); the
  minimum over rounds is reported. Also: padding (the plans), the head's all-gathers per
  micro-batch (DeepSpeed gathers at least as large as the head, counted in the timed step).
* Rewards: ``--reward-rollouts`` answers (a third right, a third wrong, a third without an
  answer; numbers, fractions, expressions, choices) through the reward actor's scoring: the
  serial loop of before, and the pool (``actors.reward_pool``) at 1 and 2 workers.
* Driver start-up (5,000 prompts cold and on resume) and checkpoint seconds on the step's
  critical path: ``bench/rl_start_save.py``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- work
def real_width_model(tiny: Path, out: Path, hidden: int = 2048) -> Path:
    """2 text layers at Qwen2.5-VL-3B's widths (``hidden`` 2,048), or scaled to ``hidden`` (the
    same head size 128 and 8 query heads per KV head, the MLP in proportion)."""
    from bench.rl_common import model_variant

    def edit(config):
        text = config.text_config
        text.hidden_size, text.intermediate_size, text.num_hidden_layers = hidden, 11008 * hidden // 2048, 2
        text.num_attention_heads, text.num_key_value_heads, text.vocab_size = hidden // 128, hidden // 1024, 151_936
        text.layer_types = ["full_attention"] * 2
        text.rope_parameters = {**text.rope_parameters, "mrope_section": [16, 24, 24]}  # head_dim 128, as 3B's
        config.vision_config.out_hidden_size = hidden

    return model_variant(tiny, out, edit)


def make_items(model_dir: Path, prompts: int, n: int, scale: float, seed: int = 0) -> list:
    """TrainItems at the real job's lengths (times ``scale``); ``prompt_ids`` are the learner's
    own (as vLLM's would be), so the plans see the true lengths."""
    import dataclasses

    import numpy as np

    from actors.learner_batches import encode_prompt
    from actors.policy import banned_token_ids
    from actors.records import TrainItem
    from avar_ray.data.procedural import generate_samples
    from avar_ray.modeling import load_processor

    processor = load_processor(str(model_dir))
    rng = np.random.default_rng(seed)
    banned = set(banned_token_ids(processor))
    allowed = np.array([t for t in range(len(processor.tokenizer)) if t not in banned])
    items = []
    for i, sample in enumerate(generate_samples(prompts, seed=seed)):
        target = int(rng.integers(300, 1501) * scale)
        base = len(encode_prompt(processor, sample).ids)
        per_word = len(processor.tokenizer(" seven" * 100)["input_ids"]) / 100  # tokens of one filler word
        filler = " seven" * max(0, round((target - base) / per_word))
        sample = dataclasses.replace(sample, id=f"real{i}", question=f"{sample.question}{filler}")
        ids = encode_prompt(processor, sample).ids
        for _ in range(n):
            length = max(1, int(min(rng.lognormal(np.log(300), 1.0) + 1, 2048) * scale))
            response = rng.choice(allowed, length).tolist()
            items.append(TrainItem(sample, response, float(rng.choice([-1.0, 1.0])), [-1.0] * length, ids))
    return items


# ----------------------------------------------------------------------------- learner phase
def learner_child(tree: str, rank: int, port: int, model_dir: str, items_path: str, out_path: str,
                  head_numel: int) -> None:
    """One learner rank at ``tree`` (this repository or the base's archive): setup, then two
    learner phases as ``LearnerGroup.score`` + ``train_step`` run them; the second is timed."""
    sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("__editable__")]
    sys.path.insert(0, tree)
    import pickle

    import torch

    import actors.learner as learner_mod
    from actors.learner import Learner
    from avar_ray.config import AttentionConfig, ModelConfig, RLConfig
    from avar_ray.grpo import batch_info, plan_score, plan_step

    assert learner_mod.__file__.startswith(tree), learner_mod.__file__
    torch.set_num_threads(1)
    items = pickle.loads(Path(items_path).read_bytes())
    from avar_ray.config import PlacementConfig

    rl = RLConfig(zero_stage=3, micro_batch_size=4, lr=1e-6, placement=PlacementConfig(learners=2))
    import avar_ray.deepspeed_config as ds_config

    make = ds_config.deepspeed_config

    def small_buffers(*args, **kwargs):
        """Two ranks of this model in the memory of a shared 24 GB machine: small buckets (DeepSpeed's
        default reduce bucket is 2 GB) and SGD (no Adam state), in both trees alike."""
        config = make(*args, **kwargs)
        config["zero_optimization"].update(reduce_bucket_size=int(2e7), stage3_prefetch_bucket_size=int(2e7),
                                           sub_group_size=int(5e7), allgather_bucket_size=int(2e7))
        config["optimizer"] = {"type": "SGD", "params": {"lr": config["optimizer"]["params"]["lr"]}}
        config["zero_allow_untested_optimizer"] = True
        return config

    ds_config.deepspeed_config = small_buffers  # both trees alike
    learner = Learner(rl, ModelConfig(path=model_dir, dtype="float32", max_model_len=8192), AttentionConfig(), rank, 2)
    learner.setup("127.0.0.1", port, rank, 2)
    old_api = hasattr(learner_mod, "_chunk_counts")  # the base sends chunk counts per micro-batch position
    lengths = [len(it.prompt_ids) + len(it.response_ids) for it in items]
    want = [i % 4 == 0 for i in range(len(items))]
    forward, check = plan_score(lengths, want, 2, rl.micro_batch_size, rl.max_tokens_per_micro_batch, True)
    plan = plan_step(lengths, 2, 1, rl.micro_batch_size, rl.max_tokens_per_micro_batch)
    info = batch_info(2, sum(len(it.response_ids) for it in items), len(items))

    def chunks(micros_by_rank):
        return [learner_mod._chunk_counts([[len(items[i].response_ids) for i in rank_micros[k]]
                                           for rank_micros in micros_by_rank]) for k in range(len(micros_by_rank[0]))]

    score_args = [[[(i, items[i], want[i]) for i in micro] for micro in forward[rank]]]
    train_args = [[[[items[i] for i in micro] for micro in plan[rank][0]]]]
    if old_api:
        score_args.append(chunks(forward))
        train_args.append([chunks([p[0] for p in plan])])
    score_args += [[(i, items[i]) for i in check[rank]], False]
    train_args.append([info])

    backend = gathers = None
    for step in range(2):
        if step == 1:  # count the head's gathers in the timed step
            import deepspeed

            backend, gathers = deepspeed.comm.comm.cdb, []
            for name in ("all_gather_into_tensor", "all_gather"):
                setattr(backend, name, _counting(getattr(backend, name), gathers, head_numel))
        torch.distributed.barrier()
        start = time.perf_counter()
        learner.score(*score_args)
        scored = time.perf_counter()
        stats = learner.train(*train_args)
        done = time.perf_counter()
    micro_batches = len(forward[rank]) + len(plan[rank][0])
    Path(out_path).write_text(json.dumps({
        "score_s": scored - start, "train_s": done - scored, "head_gathers": len(gathers),
        "micro_batches": micro_batches, "grad_norm": stats["grad_norm"], "tree": tree}))


def _counting(call, gathers: list, head_numel: int):
    def counted(*args, **kwargs):
        out = kwargs.get("output_tensor", kwargs.get("tensor_list", args[0] if args else None))
        if (sum(t.numel() for t in out) if isinstance(out, list) else out.numel()) >= head_numel:
            gathers.append(1)
        return call(*args, **kwargs)
    return counted


def learner_phase(tree: str, model_dir: Path, items_path: Path, work: Path, label: str, hidden: int) -> dict:
    """Both ranks of one variant (fresh processes); the slower rank's seconds."""
    from avar_ray.ray_utils import free_port

    port = free_port("127.0.0.1")
    outs = [work / f"{label}_rank{r}.json" for r in range(2)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--child", tree, str(r), str(port), str(model_dir),
                               str(items_path), str(outs[r]), str(151_936 * hidden)], env=env) for r in range(2)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"learner phase {label}: ranks exited {codes}")
    ranks = [json.loads(o.read_text()) for o in outs]
    return {"score_s": max(r["score_s"] for r in ranks), "train_s": max(r["train_s"] for r in ranks),
            "s": max(r["score_s"] + r["train_s"] for r in ranks),
            "head_gathers_per_micro": max(r["head_gathers"] / r["micro_batches"] for r in ranks),
            "grad_norm": ranks[0]["grad_norm"]}


def base_tree(rev: str, work: Path) -> str:
    out = work / f"base_{rev}"
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "actors", "avar_ray", "rewards"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return str(out)


def padding(tree: str, lengths: list[int], ranks: int, rows: int) -> dict:
    """The plan of ``tree``'s ``grpo.plan_step`` (loaded from its file): padding and row cap."""
    import importlib.util

    from avar_ray.grpo import padding_fraction

    spec = importlib.util.spec_from_file_location(f"grpo_{abs(hash(tree))}", Path(tree) / "avar_ray" / "grpo.py")
    grpo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grpo)
    micros = [m for rank in grpo.plan_step(lengths, ranks, 1, rows, 0) for mini in rank for m in mini]
    return {"padding": padding_fraction(lengths, micros), "max_rows": max(len(m) for m in micros)}


# ----------------------------------------------------------------------------- rewards
def reward_jobs(count: int, seed: int = 0) -> list[tuple]:
    import numpy as np

    rng = np.random.default_rng(seed)
    kinds = [("{a}/{b}", "float"), ("{a}", "integer"), ("x^{a}+{b}x", "text"), ("B", "choice")]
    jobs = []
    for i in range(count):
        form, kind = kinds[i % len(kinds)]
        a, b = int(rng.integers(2, 50)), int(rng.integers(2, 50))
        gold = form.format(a=a, b=b)
        said = [gold, form.format(a=a + 1, b=b), None][i % 3]
        text = "<think>working</think>" + (f"<answer>{said}</answer>" if said else " no answer")
        jobs.append((text, str(a / b) if kind == "float" else gold, kind, ["p", "q", "r"] if kind == "choice" else None,
                     None))
    return jobs


def reward_seconds(count: int) -> dict:
    from actors.reward_pool import TextScorerPool, text_rewards

    jobs = reward_jobs(count)
    text_rewards(*jobs[0])  # this process's imports (sympy), as a pool process does before its first answer
    start = time.perf_counter()
    serial = [text_rewards(*job) for job in jobs]
    out = {"serial_s": time.perf_counter() - start, "right": sum(r[0] for r in serial) / count}
    for workers in (1, 2):
        start = time.perf_counter()
        pool = TextScorerPool(workers, timeout_s=10.0)
        out[f"start_{workers}_s"] = time.perf_counter() - start
        start = time.perf_counter()
        scored = pool.score(jobs)
        out[f"pool_{workers}_s"] = time.perf_counter() - start
        pool.close()
        assert scored == serial, "the pool scored differently from the serial loop"
    return out


# ----------------------------------------------------------------------------- main
def run(args) -> None:
    from bench import rl_start_save

    parts = set(args.parts.split(","))
    if parts - {"learner"}:
        with tempfile.TemporaryDirectory(prefix="avar_rl_start_") as tmp:
            rl_start_save.run(args, Path(tmp), parts)
    if "learner" in parts:
        learner_and_rewards(args)


def learner_and_rewards(args) -> None:
    import pickle

    from avar_ray.tiny_model import build_tiny_model

    def say(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    with tempfile.TemporaryDirectory(prefix="avar_rl_real_") as tmp:
        work = Path(tmp)
        rewards = reward_seconds(args.reward_rollouts)
        say(f"rewards: {rewards}")
        model = real_width_model(build_tiny_model(work / "tiny", seed=0), work / "real", args.hidden)
        items = make_items(model, args.prompts, args.n, args.length_scale)
        items_path = work / "items.pkl"
        items_path.write_bytes(pickle.dumps(items))
        lengths = [len(it.prompt_ids) + len(it.response_ids) for it in items]
        base = base_tree(args.base, work)
        trees = {"before": base, "after": str(REPO)}
        plans = {k: padding(t, lengths, 2, 4) for k, t in trees.items()}
        job = {k: padding(t, _issue_lengths(), 8, 4) for k, t in trees.items()}
        say(f"model and {len(items)} rollouts ready ({sum(lengths)} tokens); plans {plans}, 7B step {job}")
        phases: dict = {"before": [], "after": []}
        for r in range(args.rounds):
            for label in ("before", "after"):
                phases[label].append(learner_phase(trees[label], model, items_path, work, f"{label}{r}", args.hidden))
                say(f"round {r} {label}: {phases[label][-1]}")
    best = {k: min(v, key=lambda p: p["s"]) for k, v in phases.items()}
    resp = [len(it.response_ids) for it in items]
    print(f"\n== RL step at real shapes: {args.prompts} prompts x {args.n} rollouts, length scale "
          f"{args.length_scale}: prompts {min(len(it.prompt_ids) for it in items)}-"
          f"{max(len(it.prompt_ids) for it in items)}, rows {min(lengths)}-{max(lengths)} tokens "
          f"(mean {sum(lengths) / len(lengths):.0f}), responses {min(resp)}-{max(resp)}; 2 ranks ZeRO-3 gloo, "
          f"2-layer model, hidden {args.hidden} (3B: 2048), V = 151,936; before = {args.base}")
    print("| | before | after | after / before |\n|---|---|---|---|")
    for key, name in (("s", "learner phase s (score + update, min of rounds)"), ("score_s", "  score pass s"),
                      ("train_s", "  update s")):
        print(f"| {name} | {best['before'][key]:.1f} | {best['after'][key]:.1f} | "
              f"{best['after'][key] / best['before'][key]:.2f} |")
    rounds = {k: ", ".join(f"{p['s']:.1f}" for p in v) for k, v in phases.items()}
    print(f"| all rounds, learner phase s | {rounds['before']} | {rounds['after']} | |")
    print(f"| gradient norm of the update (same maths: equal) | {best['before']['grad_norm']:.4f} | "
          f"{best['after']['grad_norm']:.4f} | |")
    print(f"| head all-gathers per micro-batch (tied: the embedding's included) | "
          f"{best['before']['head_gathers_per_micro']:.1f} | {best['after']['head_gathers_per_micro']:.1f} | |")
    print(f"| padding, this work (2 ranks, 4 rows) | {plans['before']['padding']:.1%} | {plans['after']['padding']:.1%} | |")
    print(f"| padding, the 7B step (256 x 8, 8 ranks, 4 rows) | {job['before']['padding']:.1%} | "
          f"{job['after']['padding']:.1%} | |")
    print(f"| most rows in a micro-batch (cap 4), 7B step | {job['before']['max_rows']} | {job['after']['max_rows']} | |")
    print(f"\nrewards, {args.reward_rollouts} rollouts ({rewards['right']:.0%} right): serial loop (before) "
          f"{rewards['serial_s']:.2f} s; pool 1 worker {rewards['pool_1_s']:.2f} s, 2 workers {rewards['pool_2_s']:.2f} s "
          f"(2 / 1 = {rewards['pool_2_s'] / rewards['pool_1_s']:.2f}); pool start {rewards['start_1_s']:.1f} / "
          f"{rewards['start_2_s']:.1f} s (once per actor)")


def main(argv) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="rl_step.py --shape real", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8, help="rollouts per prompt")
    parser.add_argument("--length-scale", type=float, default=1.0, help="prompt and response lengths times this")
    parser.add_argument("--rounds", type=int, default=2, help="before / after learner phases, alternating")
    parser.add_argument("--base", default="7a873c2", help="the commit measured as before")
    parser.add_argument("--reward-rollouts", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=2048, help="text width (3B's 2048; smaller where memory is short)")
    parser.add_argument("--parts", default="learner,startup,checkpoint",
                        help="comma-separated: learner (the learner phase, padding, rewards), startup, checkpoint")
    parser.add_argument("--startup-prompts", type=int, default=5000, help="prompts of the start-up measurement")
    parser.add_argument("--gen-seconds", type=float, default=0.0,
                        help="the next step's generation the save overlaps (0: as long as the old save took)")
    run(parser.parse_args(argv))


def _issue_lengths() -> list[int]:
    import numpy as np

    rng = np.random.default_rng(0)
    prompt = np.repeat(rng.integers(300, 1501, 256), 8)
    return (prompt + np.minimum(rng.lognormal(np.log(300), 1.0, 2048).astype(int) + 1, 2048)).tolist()


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    tree_, rank_, port_, model_, items_, out_, head_ = sys.argv[2:9]
    learner_child(tree_, int(rank_), int(port_), model_, items_, out_, int(head_))
