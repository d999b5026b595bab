"""``avar vas --model DIR --data FILE --query user|response --out DIR``: Visual Attention Score.

Writes ``OUT/vas.jsonl`` (one row per sample: id, vas, alpha_img, eps_img, alpha_sys, band,
per-layer VAS and alpha_img), ``OUT/summary.json`` (means, band, per-layer mean/std) and
``OUT/vas_profile.png`` (per-layer VAS and alpha_img: mean and spread across samples).

Query span: ``user`` (U, the paper's analysis: needs only the prompt) or ``response`` (R).
Responses for ``--query response`` come from, in order: ``--responses FILE`` (JSONL rows
``{"id": ..., "response": "..."}``; must cover every sample), else the sample's
``meta["response"]`` where present, else greedy generation by the model itself
(``--max-new-tokens``; with ``--intervention`` the intervened model generates). Generated
responses enter the statistics pass as their exact token ids.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def add_arguments(parser) -> None:
    # Defaults come from the config schema (avar_ray/config.py), never repeated here.
    from avar_ray.config import AttentionConfig, EvalConfig, InterventionConfig, ModelConfig

    model, attn, iv, ev = ModelConfig(), AttentionConfig(), InterventionConfig(), EvalConfig()
    parser.add_argument("--model", required=True, help="HF model directory (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)")
    parser.add_argument("--data", required=True, help="data file (.parquet, .jsonl, .json MathVista, .tsv VLMEvalKit)")
    parser.add_argument("--query", choices=["user", "response"], default="user",
                        help="query span Q: user text (paper's analysis; the default) or the response tokens")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--responses", default=None, help="JSONL of {id, response} for --query response")
    parser.add_argument("--max-new-tokens", type=int, default=ev.max_new_tokens,
                        help="greedy generation length when responses are missing (eval.max_new_tokens)")
    parser.add_argument("--limit", type=int, default=-1, help="first N samples only (-1: all)")
    parser.add_argument("--batch-size", type=int, default=ev.batch_size, help="rows per forward (eval.batch_size)")
    parser.add_argument("--layers", default=_csv(attn.layers), help="comma-separated text-layer indices (default: all)")
    parser.add_argument("--method", choices=["fused", "chunked"], default=None,
                        help="how the masses are computed (default: chunked when --chunk-size is given, else fused)")
    parser.add_argument("--chunk-size", type=int, default=attn.chunk_size,
                        help="query rows per chunk of the chunked method (attention.chunk_size)")
    parser.add_argument("--system-prompt", default=model.system_prompt,
                        help="explicit system prompt (model.system_prompt; default: the template's, which "
                             "Qwen3-VL does not have: VAS = V/S needs one)")
    parser.add_argument("--min-pixels", type=int, default=argparse.SUPPRESS,
                        help="image resolution bounds (model.min_pixels / model.max_pixels; default: the checkpoint's)")
    parser.add_argument("--max-pixels", type=int, default=argparse.SUPPRESS)
    parser.add_argument("--intervention", action="store_true", help="measure with the training-free intervention on")
    parser.add_argument("--a-img", type=float, default=iv.a_img, help="with --intervention: visual re-weighting")
    parser.add_argument("--a-sys", type=float, default=iv.a_sys, help="with --intervention: system re-weighting, < 1")
    parser.add_argument("--intervention-layers", default=_csv(iv.layers), help="comma-separated layers (default: all)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=model.dtype)
    parser.add_argument("--device", default=ev.device, help="auto (cuda if available), cpu, cuda, cuda:1, ...")


def _csv(values) -> str | None:
    return None if values is None else ",".join(str(v) for v in values)


def _int_list(text, option: str):
    try:
        return None if text is None else [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"avar vas: {option} must be comma-separated layer indices, got {text!r}") from None


def _batches(items, size):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _read_responses(path) -> tuple[dict, list[str]]:
    """``{id: response}`` from a JSONL (or JSON list) file; a corrupt row is skipped and reported
    (``path:row: reason``), never a crash (a sample left without a response is an error later)."""
    from avar_ray.data.readers import json_rows

    out, skipped = {}, []
    try:
        rows = json_rows(Path(path))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"avar vas: --responses: {exc}") from None
    for key, row in rows:
        if not isinstance(row, dict) or "id" not in row or not isinstance(row.get("response"), str):
            why = row if isinstance(row, ValueError) else "a responses row needs 'id' and a string 'response'"
            skipped.append(f"{path}:{key}: {why}")
            continue
        out[str(row["id"])] = row["response"]
    for msg in skipped[:5]:
        print(f"avar vas: skipped {msg}")
    if skipped:
        print(f"avar vas: {len(skipped)} corrupt rows skipped in {path}")
    return out, skipped


def _generate_ids(model, processor, rows, intervention, max_new_tokens) -> list[list[int]]:
    """Greedy responses as token ids, cut after the first end-of-turn token."""
    import torch

    from avar_ray.attention import generate
    from avar_ray.decoding import ResponseCodec
    from avar_ray.modeling import encode_batch

    enc = encode_batch(processor, [r["messages"] for r in rows], [r["images"] for r in rows],
                       padding_side="left").to(next(model.parameters()).device)
    with torch.no_grad():
        seq = generate(model, enc, intervention, max_new_tokens=max_new_tokens, do_sample=False,
                       **ResponseCodec(processor).generate_kwargs())
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    prompt_width = enc.inputs["input_ids"].shape[1]
    out = []
    for row in seq[:, prompt_width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        out.append(row if cut is None else row[:cut + 1])
    return out


def _check_system_span(processor, row) -> None:
    """Stop early, with the fix, when the chat template gives the conversations no system turn."""
    from avar_ray.attention import NoSystemPromptError, require_system_span
    from avar_ray.modeling import encode_batch

    try:
        require_system_span(encode_batch(processor, [row["messages"]], [row["images"]]).spans.system,
                            hint="pass --system-prompt")
    except NoSystemPromptError as exc:
        raise SystemExit(f"avar vas: {exc}") from None


def _stats_rows(model, processor, rows, args, intervention, layers) -> list[dict]:
    from avar_ray.attention import compute_vas
    from avar_ray.modeling import encode_batch

    results = []
    for batch in _batches(rows, args.batch_size):
        print(f"avar vas: statistics pass, {len(batch)} samples (from #{batch[0]['index']})", flush=True)
        kwargs = {}
        if args.query == "response":
            if all("response_ids" in r for r in batch):
                kwargs["response_ids"] = [r["response_ids"] for r in batch]
            else:
                kwargs["response_texts"] = [r["response"] for r in batch]
        enc = encode_batch(processor, [r["messages"] for r in batch], [r["images"] for r in batch], **kwargs)
        res = compute_vas(model, enc, query=args.query, layers=layers, chunk_size=args.chunk_size,
                          intervention=intervention, method=args.method)
        for r, out in zip(batch, res.rows(ids=[r["id"] for r in batch])):
            if args.query == "response":
                out["response_source"] = r["source"]
                out["response"] = r["response"]
            results.append((r["index"], out))
    return results


def _summary(rows: list[dict], layers: list[int]) -> dict:
    import numpy as np

    from avar_ray.attention import band

    def mean(key):
        vals = np.array([r[key] for r in rows if r[key] is not None], dtype=float)
        return (float(vals.mean()), float(vals.std())) if vals.size else (math.nan, math.nan)

    out = {"n": len(rows)}
    for key in ("vas", "alpha_img", "eps_img", "alpha_sys"):
        out[key], out[key + "_std"] = mean(key)
    out["band"] = band(out["vas"])
    out["band_counts"] = {b: sum(r["band"] == b for r in rows) for b in ("narrow", "wide", "panoramic", "n/a")}
    for key in ("per_layer", "per_layer_alpha_img"):
        mat = np.array([[math.nan if v is None else v for v in r[key]] for r in rows], dtype=float)
        ok = ~np.isnan(mat).any(1)
        out[key + "_mean"] = mat[ok].mean(0).tolist() if ok.any() else []
        out[key + "_std"] = mat[ok].std(0).tolist() if ok.any() else []
    out["layers"] = layers
    out["no_query_tokens"] = sum(r["vas"] is None for r in rows)
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in out.items()}


def _plot(summary: dict, rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    layers = summary["layers"]
    for ax, key, label in ((axes[0], "per_layer", "VAS (V/S mass ratio)"),
                           (axes[1], "per_layer_alpha_img", "alpha_img (visual mass)")):
        mean, std = np.array(summary[key + "_mean"]), np.array(summary[key + "_std"])
        if mean.size:
            if len(rows) <= 50:
                for r in rows:
                    if all(v is not None for v in r[key]):
                        ax.plot(layers, r[key], color="0.8", linewidth=0.6)
            ax.fill_between(layers, mean - std, mean + std, alpha=0.3, label="± 1 std across samples")
            ax.plot(layers, mean, marker="o", label="mean")
            ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("text layer")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    import torch

    from avar_ray.attention import Intervention, NoSystemPromptError
    from avar_ray.attention.context import validate_layers
    from avar_ray.data.readers import read_samples
    from avar_ray.data.schema import build_messages, pil_images
    from avar_ray.config import ModelConfig
    from avar_ray.decoding import decode_response
    from avar_ray.modeling import image_resolution, load_model, load_processor

    if args.batch_size <= 0:
        raise SystemExit("--batch-size must be positive")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples, report = read_samples(args.data)
    if args.limit >= 0:
        samples = samples[:args.limit]
    if not samples:
        raise SystemExit(f"{args.data}: no usable samples ({report})")
    layers = _int_list(args.layers, "--layers")
    try:
        intervention = (Intervention(a_img=args.a_img, a_sys=args.a_sys,
                                     layers=_int_list(args.intervention_layers, "--intervention-layers"))
                        if args.intervention else None)
    except ValueError as exc:
        raise SystemExit(f"avar vas: {exc}") from None
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    # unset: model.min_pixels / max_pixels of the config schema
    resolution = ModelConfig(**{k: getattr(args, k) for k in ("min_pixels", "max_pixels") if hasattr(args, k)})
    processor = load_processor(args.model, resolution)
    model = load_model(args.model, dtype=args.dtype).to(device).eval()
    num_layers = model.config.get_text_config().num_hidden_layers
    try:  # fail before any work, naming the option
        validate_layers(layers, num_layers, "--layers")
        validate_layers(None if intervention is None else intervention.layers, num_layers, "--intervention-layers")
    except ValueError as exc:
        raise SystemExit(f"avar vas: {exc}") from None

    rows = [{"index": i, "id": s.id, "messages": build_messages(s, system_prompt=args.system_prompt),
             "images": pil_images(s), "meta": s.meta} for i, s in enumerate(samples)]
    _check_system_span(processor, rows[0])  # before any generation or statistics pass
    skipped: list[str] = []
    if args.query == "response":
        given, skipped = _read_responses(args.responses) if args.responses else (None, [])
        if given is not None:
            missing = [r["id"] for r in rows if r["id"] not in given]
            if missing:
                raise SystemExit(f"{args.responses}: no response for {len(missing)} samples, e.g. {missing[:5]}"
                                 + (f" ({len(skipped)} corrupt rows skipped)" if skipped else ""))
        for r in rows:
            if given is not None:
                r["response"], r["source"] = given[r["id"]], "file"
            elif isinstance(r["meta"].get("response"), str):
                r["response"], r["source"] = r["meta"]["response"], "meta"
        todo = [r for r in rows if "response" not in r]
        for k, batch in enumerate(_batches(todo, args.batch_size)):
            print(f"avar vas: generating responses {k * args.batch_size + len(batch)}/{len(todo)}", flush=True)
            for r, ids in zip(batch, _generate_ids(model, processor, batch, intervention, args.max_new_tokens)):
                r["response_ids"], r["source"] = ids, "generated"
                r["response"] = decode_response(processor, ids)
    # rows with exact ids and rows with texts are encoded in separate batches
    groups = [[r for r in rows if "response_ids" in r], [r for r in rows if "response_ids" not in r]]
    results = []
    for group in groups:
        if group:
            try:
                results += _stats_rows(model, processor, group, args, intervention, layers)
            except NoSystemPromptError as exc:  # a row whose conversation still has no system turn
                raise SystemExit(f"avar vas: {exc}") from None
    per_sample = [row for _, row in sorted(results, key=lambda x: x[0])]

    with (out_dir / "vas.jsonl").open("w", encoding="utf-8") as fh:
        for row in per_sample:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    summary = _summary(per_sample, per_sample[0]["layers"])
    summary.update(model=str(args.model), data=str(args.data), query=args.query,
                   method=args.method or ("fused" if args.chunk_size is None else "chunked"), chunk_size=args.chunk_size,
                   read_report=str(report), **image_resolution(processor),
                   intervention=None if intervention is None else
                   {"a_img": intervention.a_img, "a_sys": intervention.a_sys,
                    "layers": None if intervention.layers is None else list(intervention.layers)})
    if args.query == "response":
        summary["responses_skipped"] = len(skipped)
        summary["response_sources"] = {s: sum(r.get("response_source") == s for r in per_sample)
                                       for s in ("file", "meta", "generated")}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    title = f"per-layer profile, Q={args.query}, n={len(per_sample)}" + (" (intervention)" if intervention else "")
    _plot(summary, per_sample, out_dir / "vas_profile.png", title)
    vas = summary["vas"]
    print(f"VAS {vas if vas is None else round(vas, 3)} ({summary['band']}), alpha_img {summary['alpha_img']}, "
          f"alpha_sys {summary['alpha_sys']} over {len(per_sample)} samples; wrote {out_dir}/vas.jsonl, "
          "summary.json, vas_profile.png")
    return 0
