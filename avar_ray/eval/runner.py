"""``run_eval``: one model on one or more benchmark files -> samples.jsonl, results.json and a
Markdown report with PNG figures. Callable in-process (the demo evaluates base, SFT and RL
models with it) and by ``avar eval``.

Order of work: read and prepare every file; leave out the samples an earlier, interrupted run
into the same directory finished (``progress.jsonl``); then either in this process
(``eval.num_engines=0``: generate every response with one vLLM engine, free it so that a GPU
holds one engine at a time, then one attention pass per batch) or on Ray Data
(``eval.num_engines >= 1``: ``avar_ray.eval.pool``); every finished batch is appended to the
progress file; then score, summarise and draw from the finished samples.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from avar_ray.attention import Intervention
from avar_ray.config import RunConfig, to_dict
from avar_ray.data.fields import RowError
from avar_ray.data.readers import DataKeys
from avar_ray.engines import start_llm, stop_llm
from avar_ray.eval import plots
from avar_ray.eval.attention_pass import SPANS
from avar_ray.eval.benchmarks import Benchmark, EvalItem, load_benchmarks
from avar_ray.eval.files import PLOTS, REPORT, RESULTS, SAMPLES, jsonable
from avar_ray.eval.generation import Generation, hf_generate, vllm_generate
from avar_ray.eval.pool import finish_batch, run_on_ray
from avar_ray.eval.progress import ProgressStore, item_keys
from avar_ray.eval.report import eval_report
from avar_ray.eval.scoring import results_summary
from avar_ray.modeling import image_resolution, load_model, load_processor, require_system_turn, resolve_device
from avar_ray.tracking import Tracker

log = logging.getLogger("avar_ray.eval")


def drop_failed(benchmarks: Sequence[Benchmark], rows: dict[str, dict]) -> None:
    """Skip and count (in their benchmark's bad rows) the items whose attention pass failed
    (``rows``: progress row by item key); the benchmarks' item lists shrink with them."""
    for bench in benchmarks:
        keys = item_keys(bench.items)
        for item, key in zip(list(bench.items), keys):
            if "error" in rows[key]:
                bench.report.loaded -= 1
                bench.report.skip(bench.path, item.sample.id, RowError("attention pass failed", rows[key]["error"]))
        bench.items = [it for it, key in zip(bench.items, keys) if "error" not in rows[key]]


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


def _draw_heatmaps(items: Sequence[EvalItem], rows: Sequence[dict], picks: Sequence[int], plot_dir: Path) -> list[dict]:
    drawn = []
    for k, idx in enumerate(picks):
        item, row = items[idx], rows[idx]
        if "heatmap" not in row:  # its statistics or its figure failed
            continue
        rec = row["record"]
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{item.benchmark}_{item.sample.id}")[:80]
        path = plots.heatmap_overlay(item.images[0], np.asarray(row["heatmap"], dtype=np.float64),
                                     plot_dir / f"heatmap_{k}_{safe}.png",
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


def _settings(model_dir, bench_files, cfg: RunConfig, intervention: Optional[Intervention]) -> dict:
    """What the per-sample results depend on: a resume under other values is refused."""
    e = cfg.eval
    # a model retrained into the same directory is another model: its weight files changed
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(model_dir).iterdir()
                     if p.suffix in (".safetensors", ".bin", ".pt"))
    return {"model": str(Path(model_dir).resolve()), "weights": weights,
            "files": [str(Path(f).resolve()) for f in bench_files],
            "model_config": {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "path"},
            "generation": {k: getattr(e, k) for k in ("max_new_tokens", "temperature", "seed")},
            "attention_layers": cfg.attention.layers, "heatmaps": e.heatmaps,
            "intervention": None if intervention is None else dataclasses.asdict(intervention)}


def _run_here(model_dir: str, processor, items: list[EvalItem], keys: list[str], heat: list[bool], cfg: RunConfig,
              intervention: Optional[Intervention], llm, store: ProgressStore, timings: dict) -> None:
    """The single-process eval: one vLLM engine (``llm``, or one started and freed here),
    then one transformers model for the statistics, a batch at a time."""
    ecfg = cfg.eval
    t0 = time.perf_counter()
    gens: list[Generation] = []
    if intervention is None:
        own = llm is None
        if own:
            llm = start_llm(cfg.model, path=model_dir, max_images=max(len(it.images) for it in items),
                            enforce_eager=ecfg.enforce_eager, seed=ecfg.seed,
                            gpu_memory_utilization=ecfg.gpu_memory_utilization)
            timings["engine_start_s"] = time.perf_counter() - t0  # part of generate_s
        try:
            gens = vllm_generate(llm, items, ecfg.max_new_tokens, ecfg.temperature, ecfg.seed)
        finally:
            if own:
                stop_llm(llm)
                llm = None
        timings["generate_s"] = time.perf_counter() - t0
    device = resolve_device(ecfg.device)
    log.info("eval: loading %s for the attention pass (%s)", model_dir, device)
    model = load_model(model_dir, dtype=cfg.model.dtype).to(device).eval()
    t0 = time.perf_counter()
    bs = ecfg.batch_size
    for i in tqdm(range(0, len(items), bs), desc="attention statistics", disable=len(items) <= bs):
        batch = items[i:i + bs]
        if intervention is not None:  # transformers generates: vLLM cannot apply the key bias
            batch_gens = hf_generate(model, processor, batch, intervention, ecfg.max_new_tokens, ecfg.temperature,
                                     ecfg.seed, bs)
        else:
            batch_gens = gens[i:i + bs]
        store.append(finish_batch(model, processor, batch, batch_gens, keys[i:i + bs], heat[i:i + bs],
                                  intervention, cfg.attention))
    timings["attention_s"] = time.perf_counter() - t0
    del model


def run_eval(model_dir: str | Path, bench_files: Sequence[str | Path], out_dir: str | Path,
             cfg: Optional[RunConfig] = None, intervention: Optional[Intervention] = None, llm=None,
             label: Optional[str] = None) -> dict[str, Any]:
    """Evaluate ``model_dir`` on ``bench_files``; write OUT/samples.jsonl, OUT/results.json,
    OUT/report.md, OUT/plots/*.png and OUT/progress.jsonl (finished samples, for a resume);
    return the results dict.

    ``cfg`` supplies ``eval.*`` (generation, batch size, heatmaps, scale-out, resume),
    ``model.*`` and ``attention.layers`` / ``attention.chunk_size`` (defaults when None).
    ``intervention``: the training-free re-weighting, applied to generation (transformers,
    since vLLM cannot apply it) and to the statistics; None = plain mode (vLLM). ``llm``: an
    already started ``vllm.LLM`` on this model to reuse (it is left running; the eval then
    runs in this process whatever ``eval.num_engines`` says). ``label``: the stage name
    ``avar analyze`` shows (default there: the directory name).
    """
    cfg = cfg if cfg is not None else RunConfig()
    ecfg = cfg.eval
    out, plot_dir = Path(out_dir), Path(out_dir) / PLOTS
    plot_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    processor = load_processor(str(model_dir), cfg.model)
    benchmarks = load_benchmarks(bench_files, processor, cfg.model.system_prompt,
                                 cfg.model.max_model_len - ecfg.max_new_tokens, ecfg.max_samples,
                                 DataKeys.of(cfg.data))
    items = [item for b in benchmarks for item in b.items]
    if items:  # VAS of every sample needs S: say so now, not after the generation
        require_system_turn(processor, items[0].sample, cfg.model.system_prompt, "avar eval (the VAS of every sample)")
    keys = item_keys(items)
    picks = heatmap_picks(benchmarks, ecfg.heatmaps)
    heat = [False] * len(items)
    for i in picks:
        heat[i] = True
    timings["prepare_s"] = time.perf_counter() - start
    store = ProgressStore(out, _settings(model_dir, bench_files, cfg, intervention), ecfg.resume)
    pending = [i for i, key in enumerate(keys) if key not in store.done]
    scaled = ecfg.num_engines > 0 and llm is None
    try:
        if pending:
            t0 = time.perf_counter()
            todo = ([items[i] for i in pending], [keys[i] for i in pending], [heat[i] for i in pending])
            if scaled:
                for rows in run_on_ray(str(model_dir), *todo, cfg, intervention):
                    store.append(rows)
                    timings.setdefault("first_batch_s", time.perf_counter() - t0)  # actor start-up included
                timings["pools_s"] = time.perf_counter() - t0
            else:
                _run_here(str(model_dir), processor, *todo, cfg, intervention, llm, store, timings)
    finally:
        store.close()
    rows = [store.done[k] for k in keys]
    drop_failed(benchmarks, store.done)
    kept = [i for i, row in enumerate(rows) if "error" not in row]
    picks = [kept.index(i) for i in picks if i in kept]
    items, rows = [items[i] for i in kept], [rows[i] for i in kept]
    records = [row["record"] for row in rows]
    t0 = time.perf_counter()
    heatmaps = _draw_heatmaps(items, rows, picks, plot_dir)
    per_benchmark = {b.name: [r for r in records if r["benchmark"] == b.name] for b in benchmarks}
    results: dict[str, Any] = {
        "label": label, "model": str(model_dir), "generation": "transformers" if intervention is not None else "vllm",
        "intervention": None if intervention is None else {"a_img": intervention.a_img, "a_sys": intervention.a_sys,
                                                           "layers": None if intervention.layers is None
                                                           else list(intervention.layers)},
        "max_new_tokens": ecfg.max_new_tokens, "temperature": ecfg.temperature,
        "resolution": image_resolution(processor),  # |V| per sample: samples.jsonl attention.*.visual_tokens
        "files": {b.name: b.path for b in benchmarks},
        **results_summary(per_benchmark, {b.name: b.bad_rows() for b in benchmarks}),
        "prompt_ids_mismatch": sum(1 for r in records if r["prompt_ids_match"] is False),
        "resumed": store.resumed,  # samples taken from an earlier, interrupted run
        "engines": ecfg.num_engines if scaled else 0,
        "config": dataclasses.asdict(ecfg),
    }
    figures = _figures(results, records, benchmarks, plot_dir)
    timings["figures_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - start
    results["timings"] = timings
    with (out / SAMPLES).open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(jsonable(rec), ensure_ascii=False) + "\n")
    results = jsonable(results)
    (out / RESULTS).write_text(json.dumps(results, indent=2, ensure_ascii=False))
    (out / REPORT).write_text(eval_report(results, figures, heatmaps, records[:8]))
    _track(cfg, out, results)
    log.info("eval: %d samples (%d from an earlier run) in %.1f s (%s)", results["overall"]["n"], store.resumed,
             timings["total_s"], ", ".join(f"{k} {v:.1f}" for k, v in timings.items() if k != "total_s"))
    if results["prompt_ids_mismatch"]:
        log.warning("eval: %d prompts tokenized differently in vLLM and transformers: their response VAS is "
                    "computed on transformers' prompt ids", results["prompt_ids_mismatch"])
    return results


def _track(cfg: RunConfig, out: Path, results: dict) -> None:
    """The summary (accuracy and VAS per benchmark and overall) to the configured trackers."""
    summary = {}
    for name, s in [*results["benchmarks"].items(), ("overall", results["overall"])]:
        summary.update({f"{name}/{k}": s[k] for k in ("n", "accuracy", "format", "vas", "vas_response", "alpha_img")})
    tracker = Tracker(cfg.tracking, out, "eval", to_dict(cfg))
    try:
        tracker.summary(summary)
    finally:
        tracker.close()
