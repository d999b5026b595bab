"""Attention statistics: eager maps vs the ``avar`` statistics pass vs plain SDPA.

    .venv/bin/python bench/attention_stats.py [--lengths 512,1024,2048,4096] [--query response]

Variants, on a small random Qwen2.5-VL (4 text layers, hidden 256, 8 heads, 2 KV heads,
float32, no grad, batch 1, one sequence of T tokens):

  (a) eager   attn_implementation="eager", output_attentions=True, then the V/S masses of the
              query rows reduced from the returned [B,H,T,T] maps (what the reference code does)
  (b) avar    our statistics pass (method "fused": masses from an SDPA call over V/S
              indicator values), same masses as (a)
  (b') chunked  our statistics pass, method "chunked" (exp(LSE_K - LSE_all) over 256-query chunks)
  (b'') intervened  (b) with the training-free intervention on (a_img 0.15, a_sys 0.4, all layers)
  (c) sdpa    attn_implementation="sdpa", plain forward

Spans are synthetic masks (no image is encoded; only the masks matter for the attention
cost): S = the first 24 tokens, V = the next T/4, U up to T/2, R = the second half. Q = R by
default (the RL reward / AGTO case; ``--query user`` for the eval case).

Memory, honestly on CPU: every (variant, length) runs in a fresh subprocess. After the
model and inputs are built, the process resets its peak-RSS counter (Linux: write "5" to
/proc/self/clear_refs, so VmHWM restarts from the current RSS), runs the variant once, and
reports peak RSS (VmHWM) minus the RSS just before the run: the extra resident memory the
pass needed, torch's CPU allocations included (tracemalloc does not see them). Where
clear_refs is not writable it falls back to ru_maxrss minus the RSS before the run. Time: the
minimum of ``--repeats`` further runs in the same process (the memory run is the warm-up;
the minimum, not the median, because the machine may be shared: interference only adds time).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {"eager": "(a) eager maps + reduce", "avar": "(b) avar stats (fused)",
            "chunked": "(b') avar stats (chunked)", "intervened": "(b'') avar stats + intervention",
            "sdpa": "(c) plain sdpa"}
TEXT = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, rms_norm_eps=1e-6, initializer_range=0.02)
VOCAB = 1152  # the tiny model's vocabulary size
SYSTEM_TOKENS = 24


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


def _build(variant: str, length: int, query: str, seed: int):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from avar_ray.attention import AttentionContext, Intervention, register_attention

    register_attention()
    max_pos = max(4096, length)
    config = Qwen2_5_VLConfig(
        text_config=dict(TEXT, vocab_size=VOCAB, max_position_embeddings=max_pos,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}),
        vision_config=dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=256),
        image_token_id=VOCAB - 2, video_token_id=VOCAB - 1, vision_start_token_id=VOCAB - 4,
        vision_end_token_id=VOCAB - 3)
    impl = {"eager": "eager", "sdpa": "sdpa"}.get(variant, "avar")
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation=impl, dtype=torch.float32)
    model.eval()
    ids = torch.randint(0, VOCAB - 8, (1, length))
    pos = torch.arange(length)[None]
    system = pos < SYSTEM_TOKENS
    visual = (pos >= SYSTEM_TOKENS) & (pos < SYSTEM_TOKENS + length // 4)
    user = (pos >= SYSTEM_TOKENS + length // 4) & (pos < length // 2)
    response = pos >= length // 2
    qmask = response if query == "response" else user
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def run():
        with torch.no_grad():
            if variant == "sdpa":
                return model(**inputs, use_cache=False).logits
            if variant == "eager":
                out = model(**inputs, use_cache=False, output_attentions=True)
                q = qmask[:, None, :]
                masses = [(torch.where(q, a[..., visual[0]].sum(-1), 0.0), torch.where(q, a[..., system[0]].sum(-1), 0.0))
                          for a in out.attentions]  # per layer [B, H, T]
                return torch.stack([m[0] for m in masses], 1), torch.stack([m[1] for m in masses], 1)
            ctx = AttentionContext(visual, system, qmask, method="chunked" if variant == "chunked" else "fused",
                                   chunk_size=256, num_layers=TEXT["num_hidden_layers"],
                                   intervention=Intervention.configured() if variant == "intervened" else None)
            model(**inputs, use_cache=False, avar_context=ctx)
            stats = ctx.stats()
            return stats.mass_v, stats.mass_s

    return run


def child(variant: str, length: int, query: str, repeats: int, seed: int) -> dict:
    import gc

    import torch

    run = _build(variant, length, query, seed)
    gc.collect()
    before = _status_kb("VmRSS")
    exact = _reset_peak()
    t0 = time.perf_counter()
    result = run()
    first = time.perf_counter() - t0
    peak = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del result
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"variant": variant, "length": length, "peak_mb": (peak - before) / 1024, "first_s": first,
            "time_s": min(times) if times else first, "median_s": statistics.median(times) if times else first, "exact_peak": exact,
            "threads": torch.get_num_threads()}


def _fmt_ratio(x: float) -> str:
    return f"{x:.2f}x" if x < 100 else f"{x:.0f}x"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="512,1024,2048,4096")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--query", choices=["response", "user"], default="response")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    if args._child:
        print("RESULT " + json.dumps(child(args._child, lengths[0], args.query, args.repeats, args.seed)))
        return 0

    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)} (known: {list(VARIANTS)})")
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results: dict = {}
    for length in lengths:
        for variant in variants:
            cmd = [sys.executable, __file__, "--_child", variant, "--lengths", str(length), "--query", args.query,
                   "--repeats", str(args.repeats), "--seed", str(args.seed)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{variant} at T={length} failed (exit {proc.returncode})")
            res = json.loads(line[len("RESULT "):])
            results[(variant, length)] = res
            print(f"  T={length:5d} {VARIANTS[variant]:28s} peak +{res['peak_mb']:8.1f} MB  "
                  f"time {res['time_s'] * 1000:9.1f} ms", flush=True)

    first = next(iter(results.values()))
    print(f"\nQ = {args.query} (|Q| = T/2 for response), batch 1, float32, {first['threads']} torch threads, "
          f"time = min of {args.repeats}; memory = peak RSS above the pre-run RSS "
          f"({'VmHWM reset' if first['exact_peak'] else 'ru_maxrss'}), fresh process per cell\n")
    header = "| T | " + " | ".join(f"{VARIANTS[v]} MB / ms" for v in variants) + " |"
    print(header)
    print("|" + "---|" * (len(variants) + 1))
    for length in lengths:
        cells = [f"{results[(v, length)]['peak_mb']:.1f} / {results[(v, length)]['time_s'] * 1000:.1f}" for v in variants]
        print(f"| {length} | " + " | ".join(cells) + " |")
    if {"eager", "avar", "sdpa"} <= set(variants):
        print("\n| T | mem (b)/(a) | speed-up (a)/(b) | time (b)/(c) | time (b')/(c) | time (b'')/(c) |")
        print("|---|---|---|---|---|---|")
        for length in lengths:
            a, b, c = (results[(v, length)] for v in ("eager", "avar", "sdpa"))
            extra = [results.get((v, length)) for v in ("chunked", "intervened")]
            print(f"| {length} | {b['peak_mb'] / max(a['peak_mb'], 1e-9):.3f} | {_fmt_ratio(a['time_s'] / b['time_s'])} | "
                  f"{b['time_s'] / c['time_s']:.2f} | "
                  + " | ".join(f"{r['time_s'] / c['time_s']:.2f}" if r else "-" for r in extra) + " |")
        top = max(lengths)
        a, b, c = (results[(v, top)] for v in ("eager", "avar", "sdpa"))
        checks = [("(b) peak memory <= 1/10 of (a)", b["peak_mb"] <= a["peak_mb"] / 10),
                  ("(b) at least 2x faster than (a)", a["time_s"] >= 2 * b["time_s"]),
                  ("(b) costs at most 1.5x (c)", b["time_s"] <= 1.5 * c["time_s"])]
        print(f"\ntargets at T={top}:")
        for name, ok in checks:
            print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    if args.json:
        Path(args.json).write_text(json.dumps([v for v in results.values()], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
