"""``run_eval``: one model on one or more benchmark files -> samples.jsonl, results.json and a
Markdown report with PNG figures. Callable in-process (the demo evaluates base, SFT and RL
models with it) and by ``avar eval``.

Order of work, so that a GPU holds one engine at a time: read and prepare every file; generate
every response (vLLM, or transformers under the intervention); free vLLM; one attention pass
per batch (both query spans at once); score; draw.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from avar_ray.attention import Intervention
from avar_ray.config import RunConfig
from avar_ray.data.fields import RowError
from avar_ray.eval import plots
from avar_ray.eval.attention_pass import SPANS, attention_rows
from avar_ray.eval.benchmarks import Benchmark, EvalItem, load_benchmarks
from avar_ray.eval.files import PLOTS, REPORT, RESULTS, SAMPLES, jsonable
from avar_ray.engines import start_llm
from avar_ray.eval.generation import Generation, hf_generate, stop_vllm, vllm_generate
from avar_ray.eval.heatmap import response_patch_attention
from avar_ray.eval.report import eval_report
from avar_ray.eval.scoring import results_summary, score_response
from avar_ray.modeling import image_resolution, load_model, load_processor

log = logging.getLogger("avar_ray.eval")


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("eval.device is 'cuda' but torch sees no CUDA device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _record(item: EvalItem, gen: Generation, attention: dict) -> dict[str, Any]:
    s = item.sample
    return {"benchmark": item.benchmark, "id": s.id, "question": s.question, "answer": s.answer,
            "answer_type": s.answer_type, "choices": list(s.choices), "response": gen.text,
            "response_tokens": len(gen.ids), "finish_reason": gen.finish_reason, **score_response(s, gen.text),
            "vas": attention["user"]["vas"], "attention": {name: attention[name] for name in SPANS},
            "prompt_ids_match": attention["prompt_ids_match"]}


def _drop_failed(benchmarks: Sequence[Benchmark], items: list[EvalItem], gens: list[Generation],
                 attention: list[dict]) -> tuple[list[EvalItem], list[Generation], list[dict]]:
    """Skip and count (in their benchmark's bad rows) the items whose attention pass failed;
    the benchmarks' item lists shrink with them, so that indices into the concatenation stay
    aligned."""
    failed = {id(it): a["error"] for it, a in zip(items, attention) if "error" in a}
    for bench in benchmarks:
        for item in [it for it in bench.items if id(it) in failed]:
            bench.report.loaded -= 1
            bench.report.skip(bench.path, item.sample.id, RowError("attention pass failed", failed[id(item)]))
        bench.items = [it for it in bench.items if id(it) not in failed]
    keep = [i for i, a in enumerate(attention) if "error" not in a]
    return [items[i] for i in keep], [gens[i] for i in keep], [attention[i] for i in keep]


def heatmap_picks(benchmarks: Sequence[Benchmark], count: int) -> list[int]:
    """Indices (into the concatenated items) of up to ``count`` samples with images, taken
    round-robin over the benchmarks so that each gets one before any gets two."""
    offsets, total = [], 0
    for b in benchmarks:
        offsets.append(total)
        total += len(b.items)
    picks: list[int] = []
    depth = 0
    while len(picks) < count and any(depth < len(b.items) for b in benchmarks):
        for b, offset in zip(benchmarks, offsets):
            if depth < len(b.items) and b.items[depth].images and len(picks) < count:
                picks.append(offset + depth)
        depth += 1
    return picks


def _draw_heatmaps(model, processor, items, gens, records, picks, intervention, layers, plot_dir: Path) -> list[dict]:
    drawn = []
    for k, idx in enumerate(picks):
        item, rec = items[idx], records[idx]
        try:
            grids = response_patch_attention(model, processor, item, gens[idx], intervention, layers)
        except (RuntimeError, ValueError) as exc:  # a figure is not worth the whole run
            log.warning("heatmap of %s/%s failed: %s", item.benchmark, item.sample.id, exc)
            continue
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{item.benchmark}_{item.sample.id}")[:80]
        path = plots.heatmap_overlay(item.images[0], grids[0], plot_dir / f"heatmap_{k}_{safe}.png",
                                     f"{item.benchmark}/{item.sample.id}: answer {rec['answer']}, "
                                     f"predicted {rec['prediction']}")
        drawn.append({"path": f"{plot_dir.name}/{path.name}", "id": item.sample.id, "benchmark": item.benchmark,
                      "prediction": rec["prediction"], "answer": rec["answer"],
                      "vas": rec["attention"]["response"]["vas"]})
    return drawn


def _figures(results: dict, records: list[dict], benchmarks: list[Benchmark], plot_dir: Path) -> dict[str, str]:
    if not records:
        return {}
    values = {span: {b.name: [r["attention"][span]["vas"] for r in records if r["benchmark"] == b.name]
                     for b in benchmarks} for span in SPANS}
    profiles = {span: {name: s["per_layer" + ("" if span == "user" else "_response")]
                       for name, s in results["benchmarks"].items() if s["n"]} for span in SPANS}
    plots.vas_distribution(values, plot_dir / "vas_distribution.png")
    plots.layer_profile(profiles, results["overall"]["layers"], plot_dir / "layer_profile.png")
    return {"vas_distribution": f"{plot_dir.name}/vas_distribution.png",
            "layer_profile": f"{plot_dir.name}/layer_profile.png"}


def run_eval(model_dir: str | Path, bench_files: Sequence[str | Path], out_dir: str | Path,
             cfg: Optional[RunConfig] = None, intervention: Optional[Intervention] = None, llm=None,
             label: Optional[str] = None) -> dict[str, Any]:
    """Evaluate ``model_dir`` on ``bench_files``; write OUT/samples.jsonl, OUT/results.json,
    OUT/report.md and OUT/plots/*.png; return the results dict.

    ``cfg`` supplies ``eval.*`` (generation, batch size, heatmaps), ``model.dtype`` /
    ``model.max_model_len`` and ``attention.layers`` / ``attention.chunk_size`` (defaults when
    None). ``intervention``: the training-free re-weighting, applied to generation
    (transformers, since vLLM cannot apply it) and to the statistics; None = plain mode
    (vLLM). ``llm``: an already started ``vllm.LLM`` on this model to reuse (it is left running).
    ``label``: the stage name ``avar analyze`` shows (default there: the directory name).
    """
    cfg = cfg if cfg is not None else RunConfig()
    ecfg = cfg.eval
    out, plot_dir = Path(out_dir), Path(out_dir) / PLOTS
    plot_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    processor = load_processor(str(model_dir), cfg.model)
    benchmarks = load_benchmarks(bench_files, processor, cfg.model.system_prompt,
                                 cfg.model.max_model_len - ecfg.max_new_tokens, ecfg.max_samples)
    items = [item for b in benchmarks for item in b.items]
    timings["prepare_s"] = time.perf_counter() - start
    device = resolve_device(ecfg.device)
    records: list[dict] = []
    heatmaps: list[dict] = []
    engine = "transformers" if intervention is not None else "vllm"
    if items:
        t0 = time.perf_counter()
        model = None
        if intervention is None:
            own = llm is None
            if own:
                llm = start_llm(cfg.model, path=str(model_dir), max_images=max(len(it.images) for it in items),
                                enforce_eager=ecfg.enforce_eager, seed=ecfg.seed,
                                gpu_memory_utilization=ecfg.gpu_memory_utilization)
                timings["engine_start_s"] = time.perf_counter() - t0  # part of generate_s
            try:
                gens = vllm_generate(llm, items, ecfg.max_new_tokens, ecfg.temperature, ecfg.seed)
            finally:
                if own:
                    stop_vllm(llm)
                    llm = None
        log.info("eval: loading %s for the attention pass (%s)", model_dir, device)
        model = load_model(str(model_dir), dtype=cfg.model.dtype).to(device).eval()
        if intervention is not None:
            gens = hf_generate(model, processor, items, intervention, ecfg.max_new_tokens, ecfg.temperature,
                               ecfg.seed, ecfg.batch_size)
        timings["generate_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        attention = attention_rows(model, processor, items, gens, intervention, cfg.attention.layers,
                                   cfg.attention.chunk_size, ecfg.batch_size)
        items, gens, attention = _drop_failed(benchmarks, items, gens, attention)
        records = [_record(it, g, a) for it, g, a in zip(items, gens, attention)]
        timings["attention_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        heatmaps = _draw_heatmaps(model, processor, items, gens, records, heatmap_picks(benchmarks, ecfg.heatmaps),
                                  intervention, cfg.attention.layers, plot_dir)
        timings["heatmaps_s"] = time.perf_counter() - t0
        del model
    per_benchmark = {b.name: [r for r in records if r["benchmark"] == b.name] for b in benchmarks}
    results: dict[str, Any] = {
        "label": label, "model": str(model_dir), "generation": engine,
        "intervention": None if intervention is None else {"a_img": intervention.a_img, "a_sys": intervention.a_sys,
                                                           "layers": None if intervention.layers is None
                                                           else list(intervention.layers)},
        "max_new_tokens": ecfg.max_new_tokens, "temperature": ecfg.temperature,
        "resolution": image_resolution(processor),  # |V| per sample: samples.jsonl attention.*.visual_tokens
        "files": {b.name: b.path for b in benchmarks},
        **results_summary(per_benchmark, {b.name: b.bad_rows() for b in benchmarks}),
        "prompt_ids_mismatch": sum(1 for r in records if r["prompt_ids_match"] is False),
        "config": dataclasses.asdict(ecfg),
    }
    figures = _figures(results, records, benchmarks, plot_dir)
    timings["total_s"] = time.perf_counter() - start
    results["timings"] = timings
    with (out / SAMPLES).open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(jsonable(rec), ensure_ascii=False) + "\n")
    results = jsonable(results)
    (out / RESULTS).write_text(json.dumps(results, indent=2, ensure_ascii=False))
    (out / REPORT).write_text(eval_report(results, figures, heatmaps, records[:8]))
    log.info("eval: %d samples in %.1f s (%s)", results["overall"]["n"], timings["total_s"],
             ", ".join(f"{k} {v:.1f}" for k, v in timings.items() if k != "total_s"))
    if results["prompt_ids_mismatch"]:
        log.warning("eval: %d prompts tokenized differently in vLLM and transformers: their response VAS is "
                    "computed on transformers' prompt ids", results["prompt_ids_mismatch"])
    return results
