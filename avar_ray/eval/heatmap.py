"""Where on the image the response looks: per-visual-token attention of the response queries,
mapped to the merged patch grid and drawn over the image.

The ``avar`` attention reduces attention to masses on the whole V and S spans; a heatmap needs
the mass on each visual key. For the few samples drawn, one eager-style forward computes it:
a registered attention function ("avar_heatmap") that forms the post-softmax weights of each
text layer (with the intervention's key bias when one is given, so an intervened run shows
its own attention), keeps only the response rows' mean over heads and queries per key, and
drops the rest at once (never all layers' [H, T, T] maps at a time).

Token -> patch: Qwen2-VL/2.5-VL emit one ``<|image_pad|>`` per merged patch, row-major over
``(t, h / merge, w / merge)`` of ``image_grid_thw``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional, Sequence

import numpy as np
import torch

from avar_ray.attention import Intervention
from avar_ray.eval.benchmarks import EvalItem
from avar_ray.eval.generation import Generation
from avar_ray.modeling import encode_batch

HEATMAP_ATTENTION = "avar_heatmap"


class KeyMassRecorder:
    """Rides along one forward (``avar_heatmap=`` kwarg): the intervention's key bias and, per text
    layer, the response queries' attention on every key, averaged over heads and queries."""

    def __init__(self, response: torch.Tensor, visual: torch.Tensor, system: torch.Tensor,
                 intervention: Optional[Intervention], layers: Optional[Sequence[int]]):
        self.response = response.bool()  # [B, T]
        self.intervention = intervention
        self.bias = None if intervention is None else intervention.key_bias(visual, system)
        self.layers = None if layers is None else set(int(i) for i in layers)
        self.mass: dict[int, torch.Tensor] = {}  # layer -> [B, T]

    def key_bias(self, layer_idx: int) -> Optional[torch.Tensor]:
        if self.bias is None or not self.intervention.applies_to(layer_idx):
            return None
        return self.bias

    def record(self, layer_idx: int, weights: torch.Tensor) -> None:
        if self.layers is not None and layer_idx not in self.layers:
            return
        rows = self.response.to(weights.device)[:, None, :, None].to(weights.dtype)  # [B, 1, Tq, 1]
        per_key = (weights * rows).sum(2).mean(1)  # [B, Tk]: sum over R, mean over heads
        self.mass[layer_idx] = (per_key / rows.sum((1, 2)).clamp(min=1)).cpu()

    def mean_mass(self) -> torch.Tensor:
        """``[B, T]``: mean over the recorded layers."""
        if not self.mass:
            raise RuntimeError("no attention was recorded: is the model's attention 'avar_heatmap'?")
        return torch.stack([self.mass[i] for i in sorted(self.mass)]).mean(0)


def heatmap_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0,
                              avar_heatmap: Optional[KeyMassRecorder] = None, **kwargs):
    """Eager attention of the text layers (query [B, H, Tq, D], key/value [B, Hkv, Tk, D]) that
    reports to ``avar_heatmap``; vision blocks and calls without a recorder run plain SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer_idx = getattr(module, "layer_idx", None)
    if avar_heatmap is None or layer_idx is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    if attention_mask is not None:  # the eager mask: 0 where allowed, the dtype's minimum elsewhere
        scores = scores + attention_mask.float() if attention_mask.dtype != torch.bool else \
            scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    bias = avar_heatmap.key_bias(layer_idx)
    if bias is not None:
        scores = scores + bias.to(scores.device)[:, None, None, :]
    weights = torch.softmax(scores, dim=-1)
    avar_heatmap.record(layer_idx, weights)
    out = torch.matmul(weights.to(value.dtype), value).transpose(1, 2).contiguous()
    return out, None


def register_heatmap_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(HEATMAP_ATTENTION, heatmap_attention_forward)
    AttentionMaskInterface.register(HEATMAP_ATTENTION, eager_mask)
    return HEATMAP_ATTENTION


@contextmanager
def attention_implementation(model, name: str):
    """Switch the model's attention implementation for a block, then restore it."""
    previous = model.config.get_text_config()._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def patch_grids(visual_mass: np.ndarray, image_grid_thw: np.ndarray, merge: int) -> list[np.ndarray]:
    """Split the per-visual-token masses of one sample (all its images, in order) into one
    ``[h / merge, w / merge]`` grid per image (mean over the temporal patches)."""
    grids, start = [], 0
    for t, h, w in np.asarray(image_grid_thw).reshape(-1, 3).tolist():
        gh, gw = h // merge, w // merge
        count = t * gh * gw
        if start + count > visual_mass.size:
            raise ValueError(f"{visual_mass.size} visual tokens but the image grids need {start + count}")
        grids.append(visual_mass[start:start + count].reshape(t, gh, gw).mean(0))
        start += count
    if start != visual_mass.size:
        raise ValueError(f"{visual_mass.size} visual tokens but the image grids hold {start}")
    return grids


def response_patch_attention(model, processor, item: EvalItem, gen: Generation,
                             intervention: Optional[Intervention] = None,
                             layers: Optional[Sequence[int]] = None) -> list[np.ndarray]:
    """Per image of ``item``: the response's mean attention on each merged patch."""
    register_heatmap_attention()
    device = next(model.parameters()).device
    enc = encode_batch(processor, [item.messages], [item.images], response_ids=[gen.ids]).to(device)
    spans = enc.spans
    recorder = KeyMassRecorder(spans.response, spans.visual, spans.system, intervention, layers)
    with attention_implementation(model, HEATMAP_ATTENTION), torch.no_grad():
        model(**enc.inputs, avar_heatmap=recorder, use_cache=False, logits_to_keep=1)
    visual_mass = recorder.mean_mass()[0][spans.visual[0].cpu()].numpy()
    merge = processor.image_processor.merge_size
    return patch_grids(visual_mass, enc.inputs["image_grid_thw"].cpu().numpy(), merge)

