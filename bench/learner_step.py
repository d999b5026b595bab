"""The learner's GRPO update against a plain PyTorch step on the same items (issue 11).

    .venv/bin/python bench/learner_step.py                  # 3 warm-up + 10 timed steps per variant
    .venv/bin/python bench/learner_step.py --profile cprofile --top 25
    .venv/bin/python bench/learner_step.py --variants learner,plain,zero0,noentropy --steps 15

In one process, on the tiny model (``avar_ray.tiny_model``, float32, ``configs/tiny_local.yaml``'s
rl section) and 8 rollouts (2 procedural prompts x 4 responses of 16-32 random tokens, advantages
+-1), interleaved step by step so that the machine's load hits every variant alike:

* ``learner``: ``actors.learner.Learner.train`` as ``LearnerGroup.train_step`` calls it (one rank,
  DeepSpeed ZeRO-2, one optimizer step, on-policy: the old log-probs from the update's own forward).
  The step's prompts are encoded before the timed call, as the RL step's ``score`` call does.
* ``plain``: the same maths with no DeepSpeed and no avar code: an HF forward to the decoder's
  hidden states, the LM head on the response positions, temperature, the banned-token mask,
  log-softmax, the entropy (no grad), verl's clipped loss written out (token mean over the step),
  backward, ``clip_grad_norm_``, ``torch.optim.AdamW``. The floor, but for one thing: it encodes
  every rollout's copy of its prompt's image, as TRL does.
* ``zero0`` / ``zero1`` / ``zero3`` (optional): the learner at that ``rl.zero_stage`` (``zero0``: the
  same DeepSpeed engine without ZeRO; on one rank ZeRO partitions nothing, so this is its bookkeeping).
* ``noentropy`` (optional): the learner with the entropy metric off (what the metric costs).
* ``everyimage`` (optional): the learner encoding every rollout's copy of its prompt's image, as
  before ``actors.policy.each_image_once`` (and as ``plain`` and TRL do).

Prints the median seconds per step (after warm-up) and each variant's ratio to ``plain``; the
largest parameter difference between the learner and the plain model after the same steps (the
same maths lands on the same weights: ~1e-7 against an update of ~1e-5 per step); with
``--profile``, the top functions of ``learner``'s steps (cProfile by own time, or torch.profiler's
op table), so the overheads are named; and what one ``get_vocab`` costs at a Qwen-sized vocabulary
(a 151,665-entry tokenizer built here: ``modeling.collate`` read it for every padded batch before
``spans.template_ids`` cached the markers per tokenizer; the tiny model's 769 tokens hide it); with ``--vision``, the
vision tower's forward + backward on every rollout's image (what each micro-batch runs: a prompt's
image once per rollout) against each distinct image once. Threads: one (``--threads``), as a learner actor at
``--cpus 1``.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_items(model_dir, prompts: int, samples: int, seed: int = 0):
    """``prompts`` procedural samples x ``samples`` responses of 16-32 random allowed tokens."""
    from transformers import AutoConfig

    from actors.records import TrainItem
    from avar_ray.data.procedural import generate_samples
    from avar_ray.modeling import load_processor
    from avar_ray.spans import banned_token_ids

    banned = set(banned_token_ids(load_processor(str(model_dir))))
    vocab = [t for t in range(AutoConfig.from_pretrained(model_dir).get_text_config().vocab_size) if t not in banned]
    gen = torch.Generator().manual_seed(seed)
    items = []
    for sample in generate_samples(prompts, seed=seed):
        for k in range(samples):
            length = int(torch.randint(16, 33, (1,), generator=gen))
            ids = [vocab[int(i)] for i in torch.randint(0, len(vocab), (length,), generator=gen)]
            items.append(TrainItem(sample, ids, 1.0 if k % 2 == 0 else -1.0, [-10.0] * length))
    return items


class LearnerStep:
    """One in-process learner rank and the arguments ``LearnerGroup.train_step`` would send it."""

    def __init__(self, cfg, items, entropy: bool = True, every_image: bool = False):
        from actors.learner import Learner
        from avar_ray.grpo import batch_info, plan_step
        from avar_ray.ray_utils import free_port

        self.rank = Learner(cfg.rl, cfg.model, cfg.attention, 0, 1)
        self.rank.setup("127.0.0.1", free_port("127.0.0.1"), 0, 1)
        if not entropy:  # the metric off (reported as 0): what computing it costs
            self.rank._logprobs = self._no_entropy(self.rank._logprobs)
        self.every_image = every_image
        rl = cfg.rl
        plan = plan_step([len(it.prompt_ids) + len(it.response_ids) for it in items], 1, 1, rl.micro_batch_size,
                         rl.max_tokens_per_micro_batch)[0]
        self.items = items
        self.minis = [[[items[i] for i in micro] for micro in plan[0]]]
        self.infos = [batch_info(1, sum(len(it.response_ids) for it in items), len(items))]

    @staticmethod
    def _no_entropy(logprobs):
        def call(*args, with_entropy=False, **kwargs):
            logprob, _, mask = logprobs(*args, with_entropy=False, **kwargs)
            return logprob, torch.zeros_like(logprob), mask
        return call

    def __call__(self) -> dict:
        self.rank.prompts.prompts([it.sample for it in self.items])  # the score call's encode (reward phase)
        import actors.policy as policy

        distinct = policy.distinct_images
        if self.every_image:
            policy.distinct_images = lambda inputs: None
        try:
            start = time.perf_counter()
            stats = self.rank.train(self.minis, self.infos)
            stats["seconds"] = time.perf_counter() - start
        finally:
            policy.distinct_images = distinct
        return stats

    def parameters(self):
        return dict(self.rank.engine.module.named_parameters())


class PlainStep:
    """The same update in plain PyTorch on its own copy of the model (see the module docstring)."""

    def __init__(self, cfg, micro_batches: list[list]):
        from actors.learner_batches import PromptCache
        from actors.policy import response_index
        from avar_ray.modeling import load_model, load_processor
        from avar_ray.spans import banned_token_ids

        rl = cfg.rl
        self.rl = rl
        processor = load_processor(cfg.model.path, cfg.model)
        self.model = load_model(cfg.model.path, dtype="float32", attn_implementation="sdpa").train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=rl.lr, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=rl.weight_decay)
        self.params = params
        self.banned = torch.tensor(banned_token_ids(processor), dtype=torch.long)
        self.tokens = sum(len(it.response_ids) for micro in micro_batches for it in micro)
        cache = PromptCache(processor, cfg.model.system_prompt)
        self.batches = []  # model inputs built once: the floor has no host work per step
        for micro in micro_batches:
            encoded = cache.encode(micro)[0]
            positions, mask = response_index(encoded.prompt_lengths, [len(it.response_ids) for it in micro])
            b = torch.arange(len(micro)).unsqueeze(1).expand_as(mask)[mask]
            cols = positions[mask]
            adv = torch.tensor([it.advantage for it in micro]).unsqueeze(1).expand_as(mask)[mask]
            self.batches.append((encoded.inputs, b, cols, encoded.inputs["input_ids"][b, cols], adv))

    def __call__(self) -> dict:
        rl, model = self.rl, self.model
        start = time.perf_counter()
        entropy_sum = 0.0
        for inputs, rows, cols, targets, adv in self.batches:
            hidden = model.model(**inputs, use_cache=False).last_hidden_state
            logits = model.lm_head(hidden[rows, cols - 1]).float() / rl.temperature
            logits = logits.index_fill(-1, self.banned, float("-inf"))
            logp_all = torch.log_softmax(logits, dim=-1)
            logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            with torch.no_grad():
                p = logp_all.exp()
                entropy_sum += float(-(p * torch.where(p > 0, logp_all, 0.0)).sum())
            ratio = torch.exp(logp - logp.detach())  # on-policy: old = this forward's, detached
            clipped = torch.clamp(ratio, 1 - rl.clip_ratio, 1 + rl.clip_ratio)
            # verl's vanilla loss with dual-clip (clip_ratio_c 3): for A < 0, min(max(...), 3 * -A)
            loss1 = torch.maximum(-adv * ratio, -adv * clipped)
            loss = torch.where(adv < 0, torch.minimum(loss1, -adv * 3.0), loss1)
            (loss.sum() / self.tokens).backward()
        torch.nn.utils.clip_grad_norm_(self.params, rl.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"seconds": time.perf_counter() - start, "entropy_sum": entropy_sum}


def vocab_seconds(size: int, repeats: int = 5) -> float:
    """Median seconds of ``get_vocab`` on a fast tokenizer of ``size`` entries."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(size)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokenizer.get_vocab()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def vision_seconds(cfg, items, repeats: int = 5) -> tuple[float, float]:
    """Median seconds of the vision tower's forward + backward on the images of all ``items``
    (one per rollout) and on the distinct prompts' images only."""
    from actors.learner_batches import PromptCache
    from avar_ray.modeling import load_model, load_processor

    model = load_model(cfg.model.path, dtype="float32", attn_implementation="sdpa").train()
    cache = PromptCache(load_processor(cfg.model.path, cfg.model), cfg.model.system_prompt)
    every = cache.encode(items)[0].inputs
    distinct = cache.encode(list({id(it.sample): it for it in items}.values()))[0].inputs

    def run(inputs) -> float:
        start = time.perf_counter()
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        torch.cat(list(out)).sum().backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times = [(run(every), run(distinct)) for _ in range(repeats + 1)][1:]
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def param_gap(learner: dict, plain: dict, initial: dict) -> tuple[float, float]:
    """Largest |learner - plain| and largest |plain - initial| over the parameters."""
    gap = max(float((learner[n].detach() - p.detach()).abs().max()) for n, p in plain.items())
    moved = max(float((p.detach() - initial[n]).abs().max()) for n, p in plain.items())
    return gap, moved


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--variants", default="learner,plain",
                        help="comma list of learner, plain, zero0, zero1, zero3, noentropy, everyimage")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a learner actor at --cpus 1: 1)")
    parser.add_argument("--profile", choices=["none", "cprofile", "torch"], default="none",
                        help="profile the learner's timed steps")
    parser.add_argument("--top", type=int, default=25, help="rows of the profile")
    parser.add_argument("--vocab-size", type=int, default=151665,
                        help="time get_vocab at this vocabulary size (0: skip)")
    parser.add_argument("--vision", action="store_true",
                        help="time the vision tower on every rollout's image vs each distinct image")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides (e.g. rl.micro_batch_size=8)")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    unknown = set(variants) - {"learner", "plain", "zero0", "zero1", "zero3", "noentropy", "everyimage"}
    if unknown or "learner" not in variants:
        parser.error(f"--variants: must include learner; unknown {sorted(unknown)}")

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    from avar_ray.config import load_config
    from avar_ray.tiny_model import build_tiny_model

    model_dir = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    overrides = [f"model.path={model_dir}", "model.dtype=float32", "rl.placement.learner_gpus=0", *args.set]
    cfg = load_config(str(ROOT / "configs/tiny_local.yaml"), overrides)
    items = make_items(model_dir, cfg.rl.prompts_per_step, cfg.rl.n_samples)
    load_before = os.getloadavg()[0]

    steps = {"learner": LearnerStep(cfg, items)}
    initial = {n: p.detach().clone() for n, p in steps["learner"].parameters().items()}
    if "plain" in variants:
        steps["plain"] = PlainStep(cfg, steps["learner"].minis[0])  # the learner's micro-batches
    for name in (v for v in variants if v.startswith("zero")):
        steps[name] = LearnerStep(load_config(str(ROOT / "configs/tiny_local.yaml"),
                                              overrides + [f"rl.zero_stage={name[4:]}"]), items)
    if "noentropy" in variants:
        steps["noentropy"] = LearnerStep(cfg, items, entropy=False)
    if "everyimage" in variants:
        steps["everyimage"] = LearnerStep(cfg, items, every_image=True)

    times: dict[str, list[float]] = {name: [] for name in steps}
    profiler = None
    for i in range(args.warmup + args.steps):
        timed = i >= args.warmup
        for name, step in steps.items():
            if name == "learner" and timed and args.profile == "cprofile":
                profiler = profiler or cProfile.Profile()
                profiler.enable()
                out = step()
                profiler.disable()
            elif name == "learner" and timed and args.profile == "torch":
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    out = step()
                profiler = prof if profiler is None else profiler  # the first timed step's ops
            else:
                out = step()
            if timed:
                times[name].append(out["seconds"])

    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"learner_step: {len(items)} rollouts ({sum(len(it.response_ids) for it in items)} response tokens), "
          f"micro_batch_size {cfg.rl.micro_batch_size}, zero_stage {cfg.rl.zero_stage}, {args.threads} thread(s), "
          f"median of {args.steps} after {args.warmup} warm-up; load 1 min {load_before:.1f} / "
          f"{os.getloadavg()[0]:.1f}")
    base = med.get("plain")
    for name, seconds in med.items():
        ratio = f"  {seconds / base:.2f}x plain" if base else ""
        print(f"  {name:10s} {seconds:.3f} s/step (min {min(times[name]):.3f}){ratio}")
    if "plain" in steps:
        gap, moved = param_gap(steps["learner"].parameters(), dict(steps["plain"].model.named_parameters()), initial)
        print(f"  parameters after {args.warmup + args.steps} steps: max |learner - plain| {gap:.2e}, "
              f"max |plain - initial| {moved:.2e}")
    if args.vocab_size:
        batches = cfg.rl.prompts_per_step + len(steps["learner"].minis[0])
        print(f"  get_vocab at {args.vocab_size} tokens: {vocab_seconds(args.vocab_size) * 1e3:.0f} ms; before "
              f"spans.template_ids a step's learner read it {batches} times (each prompt encode, each micro-batch)")
    if args.vision:
        every, distinct = vision_seconds(cfg, items)
        print(f"  vision tower forward + backward: {every:.3f} s on the {len(items)} rollouts' images, "
              f"{distinct:.3f} s on the {cfg.rl.prompts_per_step} distinct ones")
    if profiler is not None and args.profile == "cprofile":
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.top)
        print(f"cProfile of learner's {args.steps} timed steps, by own time:\n{text.getvalue()}")
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(args.top)
        print(f"... by cumulative time:\n{text.getvalue()}")
    elif profiler is not None:
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
