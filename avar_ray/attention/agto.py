"""AGTO losses (SPEC.md §4), from the statistics of the training forward pass.

    L_enh = - mean_l mean_h log( (1/(|Q||V|)) sum_{q in Q} sum_{k in V} A[l,h,q,k] )
    L_sup =   mean_l mean_h log( (1/(|Q||S|)) sum_{q in Q} sum_{k in S} A[l,h,q,k] + eps )

Per sample, then averaged over the samples where the term is defined (L_enh: |Q| > 0 and
|V| > 0; L_sup: |Q| > 0 and |S| > 0). Q is the span the stats were taken with: R ("response",
the label tokens; default) or U+V ("user_visual", the reference code's). Layer subset: take
the stats with ``layers=`` or pass ``layers`` here. Tensors that backpropagate when the
statistics pass ran with ``grad=True``. The training loss is ``L_LM + alpha·L_enh + beta·L_sup``
with ``sft.alpha`` / ``sft.beta`` (``avar_ray.sft.loop``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from avar_ray.attention.context import AttentionStats
from avar_ray.config import AttentionConfig


@dataclass
class AGTOLosses:
    enh: torch.Tensor  # scalar
    sup: torch.Tensor  # scalar
    enh_per_sample: torch.Tensor  # [B] (NaN where undefined)
    sup_per_sample: torch.Tensor


def _masked_mean(values: torch.Tensor, valid: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    if not bool(valid.any()):
        return anchor.sum() * 0.0  # no defined sample: zero, still connected to the graph
    return values[valid].mean()


def agto_losses(stats: AttentionStats, eps: float = AttentionConfig.eps, layers: Optional[Sequence[int]] = None) -> AGTOLosses:
    """L_enh and L_sup from ``stats`` (of query span R or U+V); see the module docstring."""
    if layers is not None:
        stats = stats.select_layers(layers)
    q_count = stats.query_mask.sum(-1).to(stats.mass_v.dtype)  # [B]
    v_count = stats.visual_count.to(stats.mass_v.dtype)
    s_count = stats.system_count.to(stats.mass_v.dtype)
    sum_v = stats.mass_v.sum(-1)  # [B, L, H]; masses are zero outside Q
    sum_s = stats.mass_s.sum(-1)
    tiny = torch.finfo(sum_v.dtype).tiny
    valid_enh = (q_count > 0) & (v_count > 0)
    valid_sup = (q_count > 0) & (s_count > 0)
    denom_v = torch.where(valid_enh, q_count * v_count, torch.ones_like(q_count))[:, None, None]
    denom_s = torch.where(valid_sup, q_count * s_count, torch.ones_like(q_count))[:, None, None]
    # clamp only guards log(0) on an underflowed mass; it never binds on a defined sample
    enh = -torch.log((sum_v / denom_v).clamp_min(tiny)).mean((1, 2))  # [B]
    sup = torch.log(sum_s / denom_s + eps).mean((1, 2))
    nan = torch.full_like(enh, float("nan"))
    return AGTOLosses(_masked_mean(enh, valid_enh, stats.mass_v), _masked_mean(sup, valid_sup, stats.mass_s),
                      torch.where(valid_enh, enh.detach(), nan), torch.where(valid_sup, sup.detach(), nan))
