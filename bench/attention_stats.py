"""Attention statistics: what the ``avar`` statistics pass costs against a plain SDPA forward.

    .venv/bin/python bench/attention_stats.py                                  # tiny widths, float32, no grad
    .venv/bin/python bench/attention_stats.py --widths 3b --dtype fp32,bf16 --lengths 4096 --grad both

Variants (``--variants``), one model, batch 1, one sequence of T tokens:

  sdpa        plain forward: the ``avar`` model without a context (transformers' own SDPA path)
  fused       statistics, method "fused" (masses as SDPA outputs over V/S indicator values; in
              bf16 a second float32 SDPA call over all T rows: the old default)
  chunked     statistics, method "chunked" (explicit float32 logsumexp over chunks of 256 rows)
  lse         statistics, method "lse" (one call in the model's dtype returning the rows' LSE,
              masses from float32 q·k over V ∪ S columns of the rows of Q only: the new method)
  auto        statistics with no method named (what the code picks for this device/dtype/grad)
  intervened  ``auto`` with the training-free intervention on (a_img 0.15, a_sys 0.4)
  eager       attn_implementation="eager", output_attentions=True, masses reduced from the maps
              (tiny widths only: [H, T, T] per layer)

``--grad`` off: no-grad forward. on: forward + backward of an AGTO-like loss (LM loss on the
response, plus 0.15·(L_enh + L_sup) for the statistics variants; the LM loss alone for sdpa).
Widths: ``tiny`` = 4 text layers, hidden 256, 8 heads, 2 KV heads; ``3b`` = 2 text layers at
Qwen2.5-VL-3B widths (hidden 2048, 16 heads, 2 KV heads, MLP 11008, vocab 151936).

Spans are synthetic masks (no image is encoded; only the masks matter for the attention
cost): S = the first 24 tokens, V = the next T/4 (|V| = 1024 at T = 4096), U up to T/2, R = the
second half. Q = R by default (the RL reward / AGTO case; ``--query user`` for eval's).

Method: each (T, dtype, grad) cell runs in a fresh process holding one model, which first runs
every variant once (warm-up). Memory next: per variant, the process resets its peak-RSS counter (Linux: "5" into /proc/self/clear_refs,
so VmHWM restarts from the current RSS), runs the variant once, and records peak RSS minus
the RSS just before (torch's CPU allocations included). Then time: ``--repeats`` rounds, each
running every variant once in turn (interleaved, so load from other work hits all variants
alike); the minimum per variant is reported (interference only adds time). Ratios are against
``sdpa`` of the same cell.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("sdpa", "fused", "chunked", "lse", "auto", "intervened", "eager")
WIDTHS = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=1152, mrope_section=[4, 6, 6]),
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, mrope_section=[16, 24, 24]),
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
SYSTEM_TOKENS = 24
AGTO_WEIGHT = 0.15


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _model(widths: str, dtype: str, length: int, seed: int):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from avar_ray.attention import register_attention

    register_attention()
    w = dict(WIDTHS[widths])
    vocab, section = w.pop("vocab_size"), w.pop("mrope_section")
    config = Qwen2_5_VLConfig(
        text_config=dict(w, vocab_size=vocab, rms_norm_eps=1e-6, initializer_range=0.02,
                         max_position_embeddings=max(4096, length),
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}),
        vision_config=dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=w["hidden_size"]),
        image_token_id=vocab - 2, video_token_id=vocab - 1, vision_start_token_id=vocab - 4, vision_end_token_id=vocab - 3)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="avar",
                                                            dtype=getattr(torch, DTYPES[dtype]))
    return model.eval(), vocab


def _runner(model, vocab: int, length: int, query: str, grad: bool):
    """A function per variant running one pass (and its backward with ``grad``)."""
    import torch

    from avar_ray.attention import AttentionContext, Intervention, agto_losses

    layers = model.config.get_text_config().num_hidden_layers
    ids = torch.randint(0, vocab - 8, (1, length))
    pos = torch.arange(length)[None]
    system = pos < SYSTEM_TOKENS
    visual = (pos >= SYSTEM_TOKENS) & (pos < SYSTEM_TOKENS + length // 4)
    user = (pos >= SYSTEM_TOKENS + length // 4) & (pos < length // 2)
    response = pos >= length // 2
    qmask = response if query == "response" else user
    labels = torch.where(response, ids, -100)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    if grad:
        inputs["labels"] = labels

    def finish(out, stats=None):
        if not grad:
            return
        loss = out.loss
        if stats is not None:
            losses = agto_losses(stats)
            loss = loss + AGTO_WEIGHT * (losses.enh + losses.sup)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def run(variant: str):
        with torch.set_grad_enabled(grad):
            if variant == "sdpa":
                return finish(model(**inputs))
            if variant == "eager":
                model.set_attn_implementation("eager")
                try:
                    out = model(**inputs, output_attentions=True)
                finally:
                    model.set_attn_implementation("avar")
                q = qmask[:, None, :]
                mv = torch.stack([torch.where(q, a[..., visual[0]].float().sum(-1), 0.0) for a in out.attentions], 1)
                ms = torch.stack([torch.where(q, a[..., system[0]].float().sum(-1), 0.0) for a in out.attentions], 1)
                if grad:
                    n_q, n_v = qmask.sum(), visual.sum()
                    enh = -torch.log(mv.sum(-1) / (n_q * n_v)).mean()
                    sup = torch.log(ms.sum(-1) / (n_q * SYSTEM_TOKENS) + 1e-6).mean()
                    (out.loss + AGTO_WEIGHT * (enh + sup)).backward()
                    model.zero_grad(set_to_none=True)
                return
            method = None if variant in ("auto", "intervened") else variant
            ctx = AttentionContext(visual, system, qmask, method=method, chunk_size=256 if method == "chunked" else None,
                                   num_layers=layers,
                                   intervention=Intervention.configured() if variant == "intervened" else None)
            out = model(**inputs, avar_context=ctx)
            finish(out, ctx.stats())

    return run


def _layer_runner(widths: str, dtype: str, length: int, query: str, grad: bool, seed: int):
    """``--level layer``: one attention call of a statistics layer alone (q, k, v of the model's
    shapes, random), through ``avar_attention_forward`` as a decoder layer calls it; with grad,
    the backward of sum(out·r) (+ AGTO's losses for the statistics variants)."""
    import types

    import torch

    from avar_ray.attention import AttentionContext, agto_losses
    from avar_ray.attention.kernel import avar_attention_forward

    w = WIDTHS[widths]
    heads, kv_heads = w["num_attention_heads"], w["num_key_value_heads"]
    dim = w["hidden_size"] // heads
    gen = torch.Generator().manual_seed(seed)
    dt = getattr(torch, DTYPES[dtype])
    q, k, v = (torch.randn(1, h, length, dim, generator=gen).to(dt).requires_grad_(grad)
               for h in (heads, kv_heads, kv_heads))
    r = torch.randn(1, length, heads, dim, generator=gen).to(dt)
    module = types.SimpleNamespace(layer_idx=0, is_causal=True, num_key_value_groups=heads // kv_heads, training=False)
    pos = torch.arange(length)[None]
    system = pos < SYSTEM_TOKENS
    visual = (pos >= SYSTEM_TOKENS) & (pos < SYSTEM_TOKENS + length // 4)
    qmask = pos >= length // 2 if query == "response" else (pos >= SYSTEM_TOKENS + length // 4) & (pos < length // 2)

    def run(variant: str):
        with torch.set_grad_enabled(grad):
            ctx = None
            if variant != "sdpa":
                ctx = AttentionContext(visual, system, qmask, method=None if variant == "auto" else variant,
                                       chunk_size=256 if variant == "chunked" else None, num_layers=1)
            out, _ = avar_attention_forward(module, q, k, v, None, scaling=dim ** -0.5, avar_context=ctx)
            if grad:
                loss = (out * r).float().sum()
                if ctx is not None:
                    losses = agto_losses(ctx.stats())
                    loss = loss + AGTO_WEIGHT * (losses.enh + losses.sup)
                loss.backward()
                for x in (q, k, v):
                    x.grad = None

    return run


def child(args, variants: list[str], length: int, dtype: str, grad: bool) -> dict:
    import torch

    if args.level == "layer":
        run = _layer_runner(args.widths, dtype, length, args.query, grad, args.seed)
    else:
        model, vocab = _model(args.widths, dtype, length, args.seed)
        run = _runner(model, vocab, length, args.query, grad)
    res: dict = {}
    for v in variants:  # warm-up: first-call allocations must not count as one variant's memory
        run(v)
    for v in variants:  # memory, one variant at a time
        gc.collect()
        before = _status_kb("VmRSS")
        exact = _reset_peak()
        t0 = time.perf_counter()
        run(v)
        first = time.perf_counter() - t0
        peak = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        res[v] = {"peak_mb": (peak - before) / 1024, "first_s": first, "times": [], "exact_peak": exact}
    for _ in range(args.repeats):  # time, interleaved
        for v in variants:
            t0 = time.perf_counter()
            run(v)
            res[v]["times"].append(time.perf_counter() - t0)
    for v in variants:
        res[v]["time_s"] = min(res[v]["times"]) if res[v]["times"] else res[v]["first_s"]
    return {"length": length, "dtype": dtype, "grad": grad, "threads": torch.get_num_threads(), "variants": res}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", choices=list(WIDTHS), default="tiny")
    parser.add_argument("--dtype", default="fp32", help="comma list of fp32, bf16")
    parser.add_argument("--lengths", default="512,1024,2048,4096")
    parser.add_argument("--grad", choices=["off", "on", "both"], default="off")
    parser.add_argument("--level", choices=["model", "layer"], default="model",
                        help="layer: one statistics layer's attention call alone (no model)")
    parser.add_argument("--variants", default="sdpa,fused,lse,auto")
    parser.add_argument("--query", choices=["response", "user"], default="response")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)  # "T,dtype,grad"
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)} (known: {list(VARIANTS)})")
    if "sdpa" not in variants:
        variants.insert(0, "sdpa")  # the baseline of every ratio
    if args._child:
        length, dtype, grad = args._child.split(",")
        print("RESULT " + json.dumps(child(args, variants, int(length), dtype, grad == "1")))
        return 0

    dtypes = [d for d in args.dtype.split(",") if d]
    if set(dtypes) - set(DTYPES):
        parser.error(f"--dtype: unknown {sorted(set(dtypes) - set(DTYPES))} (known: {list(DTYPES)})")
    grads = {"off": [False], "on": [True], "both": [False, True]}[args.grad]
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cells = []
    for length in [int(x) for x in args.lengths.split(",")]:
        for dtype in dtypes:
            for grad in grads:
                cmd = [sys.executable, __file__, "--_child", f"{length},{dtype},{int(grad)}", "--widths", args.widths,
                       "--variants", ",".join(variants), "--query", args.query, "--repeats", str(args.repeats),
                       "--level", args.level,
                       "--seed", str(args.seed)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                    raise SystemExit(f"T={length} {dtype} grad={grad} failed (exit {proc.returncode})")
                cell = json.loads(line[len("RESULT "):])
                cells.append(cell)
                base = cell["variants"]["sdpa"]
                for v in variants:
                    r = cell["variants"][v]
                    print(f"  T={length:5d} {dtype} grad={'on ' if grad else 'off'} {v:10s} "
                          f"time {r['time_s'] * 1000:9.1f} ms ({r['time_s'] / base['time_s']:.2f}x)  "
                          f"peak +{r['peak_mb']:8.1f} MB ({r['peak_mb'] / max(base['peak_mb'], 1e-9):.2f}x)", flush=True)

    first = cells[0]
    print(f"\n{args.level} level, widths {args.widths}, Q = {args.query}, batch 1, {first['threads']} torch threads; time = min of "
          f"{args.repeats} interleaved rounds; memory = peak RSS above the pre-run RSS "
          f"({'VmHWM reset' if first['variants']['sdpa']['exact_peak'] else 'ru_maxrss'}); ratios over sdpa\n")
    stats = [v for v in variants if v != "sdpa"]
    print("| T | dtype | grad | sdpa ms / MB | " + " | ".join(f"{v} time / mem" for v in stats) + " |")
    print("|---|---|---|---|" + "---|" * len(stats))
    for c in cells:
        b = c["variants"]["sdpa"]
        mem = (lambda v: f"{c['variants'][v]['peak_mb'] / b['peak_mb']:.2f}x") if b["peak_mb"] >= 1 else (lambda v: "-")
        row = [f"{c['variants'][v]['time_s'] / b['time_s']:.2f}x / {mem(v)}" for v in stats]
        print(f"| {c['length']} | {c['dtype']} | {'on' if c['grad'] else 'off'} | {b['time_s'] * 1000:.0f} / "
              f"{b['peak_mb']:.0f} | " + " | ".join(row) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(cells, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
