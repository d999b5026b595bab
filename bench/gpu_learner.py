"""The GPU pieces of ``bench/gpu_check.sh`` that need no Ray cluster and no vLLM engine (a GPU
image may have neither): the learner and the broadcast transport, on CUDA, in-process.

    python bench/gpu_learner.py learner    # one learner rank (actors.learner.Learner), DeepSpeed on CUDA
    python bench/gpu_learner.py broadcast  # weight_sync's bucketed broadcast between two processes
    ... --dry-run                          # the same code on CPU at float32 (what CI-like machines can run)

``learner``: the tiny model under ZeRO-3 in bf16 (DeepSpeed's nccl group of one), fed rollouts of
procedural prompts. Prints one line ``LEARNER ...`` with
  * parity: the score pass's old log-probs (bf16, the ``avar`` attention with statistics on) and its
    r_visual against a float32 HF reference on the same weights;
  * learning: three GRPO updates with advantage +1 on half the rollouts and -1 on the other half
    (the third with no score pass: the old log-probs from its own forward, as with one optimizer step);
    the mean log-prob gap (+ minus -) must grow (fails if the update does nothing or the wrong way);
  * the weight-sync payload: the ZeRO-3 bucket-wise gather loaded into a float32 model reproduces
    the trained policy's log-probs (and not the initial ones);
  * seconds of setup, score, train and gather, and peak GPU memory.
``broadcast``: a Qwen2.5-VL-3B-sized text layer plus embedding (~0.9 GiB bf16) sent bucket by bucket
from rank 0 to rank 1 with ``send_broadcast``/``receive_broadcast``; prints ``BROADCAST ...`` with
GiB/s and whether every tensor arrived bit-exact. NCCL refuses two ranks on one GPU, so on one GPU
it runs gloo over the CUDA tensors (the line says which backend ran).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _mean_gap(logprobs, advantages) -> float:
    """Mean per-token log-prob of the +1 rollouts minus that of the -1 rollouts."""
    pos = [x for lp, a in zip(logprobs, advantages) if a > 0 for x in lp]
    neg = [x for lp, a in zip(logprobs, advantages) if a < 0 for x in lp]
    return sum(pos) / len(pos) - sum(neg) / len(neg)


def reference_pass(model, processor, items, system_prompt, attention, banned):
    """float32 HF forward on the same prompts: log-probs and ungated response r_visual."""
    from actors.learner_batches import PromptCache
    from actors.policy import forward_logprobs
    from avar_ray.attention import AttentionContext
    from rewards import visual_ratio

    encoded = PromptCache(processor, system_prompt).encode(items)[0]
    ctx = AttentionContext.from_spans(encoded.spans, query="response", layers=attention.layers,
                                      chunk_size=attention.chunk_size,
                                      num_layers=model.config.get_text_config().num_hidden_layers)
    with torch.no_grad():
        lp, _, _ = forward_logprobs(model, encoded, [len(it.response_ids) for it in items], 1.0, banned,
                                    avar_context=ctx)
    stats = ctx.stats()
    vas = [visual_ratio(*stats.sample(b), eps=attention.eps) for b in range(len(items))]
    return [lp[b, :len(it.response_ids)].tolist() for b, it in enumerate(items)], vas


def _max_abs(a, b) -> float:
    return max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v))


def _mean_abs(a, b) -> float:
    diffs = [abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v)]
    return sum(diffs) / len(diffs)


def learner(dry: bool) -> None:
    from transformers import AutoConfig

    from actors.learner import Learner
    from actors.policy import banned_token_ids
    from actors.records import TrainItem
    from avar_ray.config import load_config
    from avar_ray.data.procedural import generate_samples
    from avar_ray.grpo import batch_info
    from avar_ray.modeling import load_model, load_processor
    from avar_ray.ray_utils import free_port
    from avar_ray.tiny_model import build_tiny_model

    device = "cpu" if dry else "cuda"
    work = Path(tempfile.mkdtemp())
    model_dir = build_tiny_model(work / "tiny")
    cfg = load_config(str(ROOT / "configs/tiny_local.yaml"), [
        f"model.path={model_dir}", f"model.dtype={'float32' if dry else 'bfloat16'}", "rl.zero_stage=3",
        f"rl.placement.learner_gpus={0 if dry else 1}", "rl.kl_coef=0.0", "rl.lr=2e-4", "rl.temperature=1.0"])
    processor = load_processor(str(model_dir), cfg.model)
    banned = set(banned_token_ids(processor))
    vocab = [t for t in range(AutoConfig.from_pretrained(model_dir).get_text_config().vocab_size) if t not in banned]
    gen = torch.Generator().manual_seed(0)
    items = []
    for sample in generate_samples(4, seed=0):  # 4 prompts x 4 responses of 6-20 tokens
        for _ in range(4):
            length = int(torch.randint(6, 21, (1,), generator=gen))
            ids = [vocab[int(i)] for i in torch.randint(0, len(vocab), (length,), generator=gen)]
            items.append(TrainItem(sample, ids, 0.0, [0.0] * length))
    advantages = [1.0 if i % 2 == 0 else -1.0 for i in range(len(items))]

    ref_model = load_model(str(model_dir), "float32", attn_implementation="avar").to(device).eval()
    ref_lp, ref_vas = reference_pass(ref_model, processor, items, cfg.model.system_prompt, cfg.attention, sorted(banned))
    items = [TrainItem(it.sample, it.response_ids, a, lp) for it, a, lp in zip(items, advantages, ref_lp)]

    t = time.perf_counter()
    rank = Learner(cfg.rl, cfg.model, cfg.attention, 0, 1)
    rank.setup("127.0.0.1", free_port("127.0.0.1"), 0, 1)
    setup_s = time.perf_counter() - t
    info = batch_info(1, sum(len(it.response_ids) for it in items), len(items))
    gaps, seconds = [], {"score": 0.0, "train": 0.0}
    for step in range(4):  # score every step; train after the first three
        t = time.perf_counter()
        passes = rank.score([[(i, it, True) for i, it in enumerate(items)]])["passes"]
        seconds["score"] += time.perf_counter() - t
        old = [passes[i].old_logprobs for i in range(len(items))]
        if step == 0:
            lp_err, lp_mean = _max_abs(old, ref_lp), _mean_abs(old, ref_lp)
            vas_err = max(abs(passes[i].vas - ref_vas[i]) / max(abs(ref_vas[i]), 1e-9) for i in range(len(items)))
        gaps.append(_mean_gap(old, advantages))
        if step == 3:
            break
        for it, lp in zip(items, old):  # the third update takes its own forward's (one optimizer step: on-policy)
            it.old_logprobs = None if step == 2 else lp
            if step == 2:  # ... measured against this score pass's, the same policy: they must agree
                it.rollout_logprobs = lp
        t = time.perf_counter()
        metrics = rank.train([[items]], [info])
        seconds["train"] += time.perf_counter() - t
        if step == 2:
            own_diff = metrics["diff_sum"] / max(metrics["diff_tokens"], 1)
        if not all(map(lambda v: v == v and abs(v) < 1e6, (metrics["pg_loss"], metrics["grad_norm"]))):
            raise SystemExit(f"LEARNER FAIL: non-finite update metrics {metrics}")

    t = time.perf_counter()
    gathered = {name: tensor.float() for name, tensor in rank._full_parameters(16 << 20)}
    gather_s = time.perf_counter() - t
    trained = rank.logprobs(items)
    synced = load_model(str(model_dir), "float32", attn_implementation="avar").to(device).eval()
    missing = synced.load_state_dict(gathered, strict=False).missing_keys
    sync_lp, _ = reference_pass(synced, processor, items, cfg.model.system_prompt, cfg.attention, sorted(banned))
    sync_err, initial_err = _max_abs(sync_lp, trained), _max_abs(ref_lp, trained)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    ok = own_diff < 0.05 and gaps[-1] > gaps[0] + 0.05 and sync_err < 0.5 * initial_err and lp_mean < 0.1 and vas_err < 0.05
    print(f"LEARNER {'ok' if ok else 'FAIL'} zero3 {cfg.model.dtype} on {device}: "
          f"logprob |{cfg.model.dtype}-f32| max {lp_err:.3f} mean {lp_mean:.4f}, r_visual rel err {vas_err:.1e}; "
          f"+/- logprob gap {' -> '.join(f'{g:.2f}' for g in gaps)} (3rd update on its own old log-probs, "
          f"|them - score pass's| mean {own_diff:.1e}); "
          f"gathered weights vs trained {sync_err:.3f} (initial {initial_err:.3f}, {len(missing)} tied keys); "
          f"setup {setup_s:.1f} s, score {seconds['score']:.2f} s, train {seconds['train']:.2f} s, "
          f"gather {gather_s:.2f} s, peak {peak:.0f} MiB")
    if not ok:
        raise SystemExit(1)


# ---------------------------------------------------------------------------------- broadcast
def _layer_tensors(dry: bool, device: str) -> list[tuple[str, torch.Tensor]]:
    """A Qwen2.5-VL-3B text layer and the embedding, at real widths (dry run: 1/8 of them)."""
    h, mlp, vocab, kv = (2048, 11008, 151936, 256) if not dry else (256, 1376, 18992, 32)
    dtype = torch.float32 if dry else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    shapes = {"embed_tokens.weight": (vocab, h), "q_proj.weight": (h, h), "q_proj.bias": (h,),
              "k_proj.weight": (kv, h), "v_proj.weight": (kv, h), "o_proj.weight": (h, h),
              "gate_proj.weight": (mlp, h), "up_proj.weight": (mlp, h), "down_proj.weight": (h, mlp),
              "input_layernorm.weight": (h,)}
    return [(n, torch.randn(s, generator=gen, device=device, dtype=dtype)) for n, s in shapes.items()]


def _broadcast_rank(rank: int, port: int, backend: str, dry: bool, queue) -> None:
    from actors.weight_sync import broadcast_table, make_weight_group, receive_broadcast, send_broadcast

    device = "cpu" if dry else "cuda"
    named = _layer_tensors(dry, device)
    try:
        group = make_weight_group("127.0.0.1", port, rank, 2, backend)
        handle = broadcast_table(((n, t.shape, t.dtype) for n, t in named), 64 << 20, 1, backend)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if rank == 0:
            send_broadcast(group, named, handle, device)
            exact = True
        else:
            expected = dict(named)
            exact = all(torch.equal(t, expected[n]) for bucket in receive_broadcast(group, handle, device)
                        for n, t in bucket)
        if device == "cuda":
            torch.cuda.synchronize()
        queue.put((rank, exact, time.perf_counter() - start, handle.total_bytes, handle.num_buckets, ""))
    except Exception as exc:  # reported by the parent: e.g. NCCL's "Duplicate GPU detected"
        queue.put((rank, False, 0.0, 0, 0, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))


def _copy_rates(nbytes: int) -> str:
    """The machine's copy rates for the broadcast's bytes: device to device, and device to pinned
    host memory and back (the path gloo takes for CUDA tensors)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    rates = {}
    for name, dst in (("d2d", torch.empty_like(src)), ("d2h", torch.empty(nbytes, dtype=torch.uint8, pin_memory=True))):
        dst.copy_(src)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(3):
            dst.copy_(src)
        torch.cuda.synchronize()
        rates[name] = 3 * nbytes / 2**30 / (time.perf_counter() - start)
        if name == "d2h":
            start = time.perf_counter()
            src.copy_(dst)
            torch.cuda.synchronize()
            rates["h2d"] = nbytes / 2**30 / (time.perf_counter() - start)
    return ", ".join(f"{k} {v:.1f} GiB/s" for k, v in rates.items())


def broadcast(dry: bool) -> None:
    import torch.multiprocessing as mp

    from avar_ray.ray_utils import free_port

    backends = ["gloo"] if dry or torch.cuda.device_count() < 2 else ["nccl"]
    if not dry and torch.cuda.device_count() < 2:
        backends = ["nccl", "gloo"]  # nccl expected to refuse one GPU: say so, then run gloo
    ctx = mp.get_context("spawn")
    failures = []
    for backend in backends:
        queue = ctx.Queue()
        port = free_port("127.0.0.1")
        procs = [ctx.Process(target=_broadcast_rank, args=(r, port, backend, dry, queue)) for r in range(2)]
        for p in procs:
            p.start()
        results = {}
        try:
            for _ in range(2):
                rank, exact, seconds, nbytes, buckets, error = queue.get(timeout=120)
                results[rank] = (exact, seconds, nbytes, buckets, error)
        except Exception as exc:
            results.setdefault(1, (False, 0.0, 0, 0, f"timeout: {exc!r}"))
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        errors = [r[4] for r in results.values() if r[4]]
        if errors:
            failures.append(f"{backend}: {errors[0]}")
            continue
        exact, seconds, nbytes, buckets = results[1][:4]
        gib = nbytes / 2**30
        print(f"BROADCAST {'ok' if exact else 'FAIL'} {backend} on {'cpu' if dry else 'cuda'}: {gib:.2f} GiB in "
              f"{buckets} buckets, {seconds:.2f} s = {gib / seconds:.2f} GiB/s, bit-exact {exact}"
              + (f" ({'; '.join(failures)})" if failures else ""))
        if not exact:
            raise SystemExit(1)
        if not dry:
            print(f"MEMCPY same run, {gib:.2f} GiB: {_copy_rates(nbytes)}")
        return
    print(f"BROADCAST FAIL: {'; '.join(failures)}")
    raise SystemExit(1)


if __name__ == "__main__":
    piece = sys.argv[1] if len(sys.argv) > 1 else ""
    dry = "--dry-run" in sys.argv
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if piece not in ("learner", "broadcast"):
        raise SystemExit("usage: gpu_learner.py {learner|broadcast} [--dry-run]")
    if not dry and not torch.cuda.is_available():
        raise SystemExit("gpu_learner: no CUDA GPU (use --dry-run)")
    {"learner": learner, "broadcast": broadcast}[piece](dry)
