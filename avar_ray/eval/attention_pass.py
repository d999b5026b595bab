"""VAS, alpha_img, eps_img and the per-layer profile of both query spans (SPEC.md §1), from one
forward pass per batch of prompt + generated response.

One pass serves both spans: attention is causal, so the user-text queries U of the prompt +
response sequence see exactly what they see in the prompt alone, and the response queries R
see the prompt and the response. The ``avar`` attention records the masses of U ∪ R on V and
S; each span's metrics then come from its own rows.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from avar_ray.attention import (AttentionContext, AttentionStats, Intervention, VASResult, require_avar,
                                require_system_span, vas_from_stats)
from avar_ray.eval.benchmarks import EvalItem
from avar_ray.eval.generation import Generation
from avar_ray.modeling import Encoded, encode_batch

SPANS = ("user", "response")


def restrict(stats: AttentionStats, query_mask: torch.Tensor) -> AttentionStats:
    """The statistics of a sub-span of the recorded queries (masses zeroed off it)."""
    query_mask = query_mask.to(stats.mass_v.device)
    keep = query_mask[:, None, None, :].to(stats.mass_v.dtype)
    return AttentionStats(stats.mass_v * keep, stats.mass_s * keep, query_mask, stats.visual_count,
                          list(stats.layers), stats.system_count)


def span_metrics(model, encoded: Encoded, intervention: Optional[Intervention] = None,
                 layers: Optional[Sequence[int]] = None, chunk_size: Optional[int] = None) -> dict[str, VASResult]:
    """``{"user": VASResult, "response": VASResult}`` of an encoded prompt + response batch.
    With ``intervention`` the metrics describe the re-weighted attention (and model)."""
    require_avar(model)
    device = next(model.parameters()).device
    encoded = encoded.to(device)
    spans = encoded.spans
    require_system_span(spans.system)  # V/S is undefined without S: say so, not inf
    ctx = AttentionContext(spans.visual, spans.system, spans.user | spans.response, layers=layers,
                           intervention=intervention, chunk_size=chunk_size,
                           num_layers=model.config.get_text_config().num_hidden_layers)
    with torch.no_grad():
        # logits_to_keep=1: the pass only wants attention; skip the [B, T, vocab] logits
        model(**encoded.inputs, avar_context=ctx, use_cache=False, logits_to_keep=1)
    stats = ctx.stats()
    return {name: vas_from_stats(restrict(stats, spans.query(name))) for name in SPANS}


def _batch_rows(model, processor, batch: Sequence[EvalItem], gens: Sequence[Generation],
                intervention: Optional[Intervention], layers: Optional[Sequence[int]], chunk_size: int) -> list[dict]:
    enc = encode_batch(processor, [it.messages for it in batch], [it.images for it in batch],
                       response_ids=[g.ids for g in gens], padding_side="right")
    metrics = span_metrics(model, enc, intervention, layers, chunk_size)
    per_span = {name: metrics[name].rows() for name in SPANS}
    rows = []
    for i, gen in enumerate(gens):
        match = None
        if gen.prompt_ids is not None:  # the engine's prompt must be the one we score
            match = enc.inputs["input_ids"][i, :enc.prompt_lengths[i]].tolist() == gen.prompt_ids
        rows.append({**{name: per_span[name][i] for name in SPANS}, "prompt_ids_match": match})
    return rows


def attention_rows(model, processor, items: Sequence[EvalItem], generations: Sequence[Generation],
                   intervention: Optional[Intervention], layers: Optional[Sequence[int]], chunk_size: int,
                   batch_size: int) -> list[dict]:
    """Per item: ``{"user": {...}, "response": {...}, "prompt_ids_match": bool | None}``
    (the VASResult rows: vas, alpha_img, eps_img, alpha_sys, band, per_layer, ...), or
    ``{"error": message}`` for an item whose prompt + response cannot be segmented into spans
    (a batch that fails is retried item by item, so one bad response costs only itself)."""
    rows: list[dict] = []
    starts = range(0, len(items), batch_size)
    for start in tqdm(starts, desc="attention statistics", disable=len(starts) < 2):
        batch, gens = items[start:start + batch_size], generations[start:start + batch_size]
        try:
            rows += _batch_rows(model, processor, batch, gens, intervention, layers, chunk_size)
        except ValueError as exc:  # UnsupportedTemplateError, a prompt/response the model rejects
            if len(batch) == 1:
                rows.append({"error": str(exc)})
                continue
            for item, gen in zip(batch, gens):
                try:
                    rows += _batch_rows(model, processor, [item], [gen], intervention, layers, chunk_size)
                except ValueError as one:
                    rows.append({"error": str(one)})
    return rows
