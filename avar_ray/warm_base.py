"""The warm base: the tiny Qwen2.5-VL after a short supervised pre-training on procedural tasks,
so that the AVAR stages start from a model that can see (a fixture of the toy world, not a stage
of AVAR: plain torch in-process, no Ray or DeepSpeed).

The random tiny model answers nothing, so GRPO groups have no reward variance and nothing
learns. Two phases, like a real VLM's pre-training:

1. the vision tower alone learns to name the shape and colour under each visual token
   (avar_ray/warm_vision.py: trained end to end from random weights, the model learned to
   ignore the image instead);
2. the whole model learns short oracle chains (``<think>The circle is red. The answer is
   red.</think><answer>red</answer>``) over freshly drawn procedural samples.

It is then checked on a held-out procedural set against two baselines (answering at random,
always giving the most frequent answer). The result is cached under ``warm_base.cache_dir`` in a
folder named by a hash of every setting and of the files that build it (SOURCES), so a second run
(the demo, the test session) reuses it while none of them changed:

    path = ensure_warm_base(cfg.warm_base, image_size=cfg.data.image_size)
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch

# Bump when the recipe changes in a way neither the settings nor SOURCES show (cached bases are rebuilt).
RECIPE_VERSION = 2
# The project's files that decide what the base is (its model, data, targets, training and
# check): their bytes are part of the cache key, so editing any of them rebuilds the base.
SOURCES = ("warm_base.py", "warm_vision.py", "tiny_model.py", "modeling.py", "data/procedural.py",
           "data/scenes.py", "data/render.py", "data/captions.py", "data/schema.py", "sft/data.py",
           "synth/verify.py")
INFO = "warm_base.json"
# Procedural seeds of the training stream and of the held-out check set (the demo's and the
# tests' data use seeds 0 and 10_000; these never collide with them).
TRAIN_SEED_OFFSET = 500_000
CHECK_SEED_OFFSET = 900_000


def sources_hash() -> str:
    """sha256 over SOURCES (path and bytes), relative to the package folder."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for rel in SOURCES:
        h.update(rel.encode() + b"\0" + (here / rel).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def cache_key(wb, image_size: int) -> str:
    settings = {**asdict(wb), "image_size": image_size, "recipe": RECIPE_VERSION, "sources": sources_hash()}
    settings.pop("cache_dir")
    blob = json.dumps(settings, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_path(wb, image_size: int) -> Path:
    return Path(os.path.expanduser(wb.cache_dir)) / cache_key(wb, image_size)


def baselines(samples: Sequence) -> dict:
    """Expected accuracy of answering at random (a uniform option for choice rows, a uniform pick
    among the set's answers of the same task otherwise) and of always giving the most frequent
    gold answer, on ``samples``."""
    by_task: dict[str, set] = {}
    for s in samples:
        by_task.setdefault(s.meta.get("task", s.answer_type), set()).add(s.answer)
    rand = [1.0 / len(s.choices) if s.answer_type == "choice" and s.choices
            else 1.0 / len(by_task[s.meta.get("task", s.answer_type)]) for s in samples]
    top, hits = Counter(s.answer for s in samples).most_common(1)[0]
    return {"random": sum(rand) / len(samples), "most_frequent": hits / len(samples), "most_frequent_answer": top}


def _rows(samples: Sequence) -> list[dict]:
    from avar_ray.data.captions import oracle_reasoning
    from avar_ray.data.schema import to_row
    from avar_ray.synth.verify import build_target

    return [{**to_row(s), "target": build_target(oracle_reasoning(s, "short"))} for s in samples]


def _lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(model, processor, wb, image_size: int, log_every: int = 25) -> list[float]:
    """``wb.steps`` AdamW steps on batches of fresh procedural samples; returns the losses."""
    from avar_ray.data.procedural import generate_samples
    from avar_ray.sft.data import encode_rows

    stream = generate_samples(wb.n_train, seed=wb.seed + TRAIN_SEED_OFFSET, image_size=image_size, chain="short",
                              tasks=wb.tasks)
    rows = _rows(stream)
    order = random.Random(wb.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=wb.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(s, wb.steps, wb.warmup_steps))
    model.train()
    losses, idx = [], []
    start = time.perf_counter()
    for step in range(wb.steps):
        if len(idx) < wb.batch_size:
            more = list(range(len(rows)))
            order.shuffle(more)
            idx += more
        batch, idx = [rows[i] for i in idx[:wb.batch_size]], idx[wb.batch_size:]
        encoded, labels = encode_rows(processor, batch)
        loss = model(**encoded.inputs, labels=labels, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == wb.steps:
            recent = losses[-log_every:]
            print(f"warm base: step {step + 1}/{wb.steps} loss {sum(recent) / len(recent):.3f} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
    model.eval()
    return losses


@torch.no_grad()
def answer(model, processor, samples: Sequence, max_new_tokens: int = 48, batch_size: int = 16) -> list[str]:
    """Greedy responses (transformers generate, left-padded batches)."""
    from avar_ray.data.schema import build_messages, pil_images
    from avar_ray.decoding import ResponseCodec
    from avar_ray.modeling import encode_batch

    codec = ResponseCodec(processor)
    out = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        enc = encode_batch(processor, [build_messages(s) for s in chunk], [pil_images(s) for s in chunk],
                           padding_side="left")
        gen = model.generate(**enc.inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id, **codec.generate_kwargs())
        width = enc.inputs["input_ids"].shape[1]
        out += [codec.decode(row.tolist()) for row in gen[:, width:]]
    return out


def check(model, processor, samples: Sequence) -> dict:
    """Accuracy of greedy answers on ``samples`` beside the baselines, and the user-span VAS."""
    from avar_ray.attention.vas import compute_vas
    from avar_ray.data.schema import build_messages, pil_images
    from avar_ray.modeling import encode_batch
    from rewards import accuracy_reward

    texts = answer(model, processor, samples)
    correct = [accuracy_reward(t, s.answer, s.answer_type, s.choices or None, s.precision)
               for t, s in zip(texts, samples)]
    per_task: dict[str, list[float]] = {}
    for s, c in zip(samples, correct):
        per_task.setdefault(s.meta["task"], []).append(c)
    vas, alpha = [], []
    for i in range(0, len(samples), 16):
        chunk = samples[i:i + 16]
        enc = encode_batch(processor, [build_messages(s) for s in chunk], [pil_images(s) for s in chunk])
        res = compute_vas(model, enc, query="user")
        vas += res.vas.tolist()
        alpha += res.alpha_img.tolist()
    return {"n": len(samples), "accuracy": sum(correct) / len(samples),
            "per_task": {t: sum(v) / len(v) for t, v in sorted(per_task.items())},
            "baselines": baselines(samples), "vas_user": sum(vas) / len(vas), "alpha_img_user": sum(alpha) / len(alpha),
            "examples": [{"id": s.id, "answer": s.answer, "response": t} for s, t in zip(samples[:6], texts[:6])]}


def build_warm_base(out: Path, wb, image_size: int) -> dict:
    """Build, train and check the warm base into ``out`` (a transformers + vLLM loadable folder)."""

    start = time.perf_counter()
    threads = torch.get_num_threads()
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        # Oversubscribed cores: OpenMP barriers spin; one thread measured 5x faster per step
        # than two at a load of 20 on 2 cores (and ~1.6x slower on idle cores, hence the check).
        torch.set_num_threads(1)
    try:
        return _build(out, wb, image_size, start)
    finally:
        torch.set_num_threads(threads)


def _build(out: Path, wb, image_size: int, start: float) -> dict:
    from avar_ray.data.procedural import generate_samples
    from avar_ray.modeling import load_model, load_processor
    from avar_ray.tiny_model import build_tiny_model
    from avar_ray.warm_vision import pretrain_vision

    torch.manual_seed(wb.seed)
    build_tiny_model(out, seed=wb.seed)
    processor = load_processor(str(out))
    model = load_model(str(out))  # the statistics-capable SDPA: plain SDPA while training
    probes = pretrain_vision(model, processor, wb, image_size)
    losses = train(model, processor, wb, image_size)
    model.save_pretrained(out, safe_serialization=True)
    check_set = generate_samples(wb.check_n, seed=wb.seed + CHECK_SEED_OFFSET, image_size=image_size, chain="short",
                                 tasks=wb.tasks)
    info = {"settings": {**asdict(wb), "image_size": image_size, "recipe": RECIPE_VERSION},
            "vision_probes": probes, "loss_first": sum(losses[:10]) / max(1, len(losses[:10])),
            "loss_last": sum(losses[-10:]) / max(1, len(losses[-10:])),
            "check": check(model, processor, check_set), "seconds": round(time.perf_counter() - start, 1)}
    (out / INFO).write_text(json.dumps(info, indent=1))
    return info


def ensure_warm_base(wb, image_size: int, rebuild: bool = False) -> Path:
    """The cached warm base for these settings, built (a few CPU minutes) if it is missing."""
    import fcntl
    import tempfile

    path = cache_path(wb, image_size)
    if (path / INFO).is_file() and not rebuild:
        print(f"warm base: reusing {path}", flush=True)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # One builder per key at a time (a second one waits, then reuses the first one's base);
    # the lock is released by the OS if the builder dies.
    with open(path.with_name(f"{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / INFO).is_file() and not rebuild:
            print(f"warm base: reusing {path} (built by another process meanwhile)", flush=True)
            return path
        tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp", dir=path.parent))
        try:
            info = build_warm_base(tmp, wb, image_size)
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)  # atomic: a killed build never leaves a folder that looks finished
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    c = info["check"]
    print(f"warm base: {path} in {info['seconds']:.0f}s; accuracy {c['accuracy']:.3f} on {c['n']} held-out tasks "
          f"(random {c['baselines']['random']:.3f}, most frequent {c['baselines']['most_frequent']:.3f}), "
          f"VAS(user) {c['vas_user']:.3g}", flush=True)
    return path


def read_info(path: str | Path) -> dict:
    return json.loads((Path(path) / INFO).read_text())


@torch.no_grad()
def response_alpha_img(model_dir: str | Path, samples: Sequence, max_new_tokens: int = 48) -> float:
    """Mean alpha_img of the response tokens (the visual mass they attend to) of greedy answers
    to ``samples`` by the model in ``model_dir``."""
    from avar_ray.attention.vas import compute_vas
    from avar_ray.data.schema import build_messages, pil_images
    from avar_ray.modeling import encode_batch, load_model, load_processor

    processor, model = load_processor(str(model_dir)), load_model(str(model_dir)).eval()
    texts = answer(model, processor, samples, max_new_tokens)
    ids = [processor.tokenizer.encode(t, add_special_tokens=False) or [processor.tokenizer.eos_token_id]
           for t in texts]
    enc = encode_batch(processor, [build_messages(s) for s in samples], [pil_images(s) for s in samples],
                       response_ids=ids)
    return float(compute_vas(model, enc, query="response").alpha_img.mean())
