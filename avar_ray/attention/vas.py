"""Visual Attention Score and friends (SPEC.md §1), from one statistics pass.

Per sample, over layers l (the recorded subset), heads h and query positions i in Q:

    VAS       = mean_{l,h,i} mass_V(l,h,i) / mass_S(l,h,i)      (paper Eq. 1: a mean of ratios)
    alpha_img = mean_{l,h,i} mass_V(l,h,i)                       (absolute visual mass)
    eps_img   = alpha_img / |V|                                  (per-visual-token efficiency)
    alpha_sys = mean_{l,h,i} mass_S(l,h,i)
    per_layer = VAS of each layer (mean over h, i)

The paper's VAS is a mean of per-query ratios: a head that puts almost no mass on S (common in
tiny or heavily trained models) makes it explode (1e17 has been seen). Beside it, as a companion
that stays readable (the headline remains the paper's VAS):

    vas_robust    = sum_{l,h,i} mass_V / sum_{l,h,i} mass_S     (a ratio of means)
    low_sys_heads = how many (layer, head) pairs have a mean system mass below SYS_FLOOR
    low_sys_layers = how many layers have at least one such head
    low_sys_queries = the share of (layer, head, query) whose system mass is below SYS_FLOOR
                     (single queries can blow the mean of ratios up while no head is blind)

A sample with no query token gets NaN everywhere; one with no visual token gets VAS =
alpha_img = 0 and eps_img = NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from avar_ray.attention.context import AttentionStats, Intervention, attention_statistics, require_system_span

# SPEC.md §1 bands (Qwen2.5-VL-7B scale): narrow < 10, wide 10-15, panoramic > 15.
BANDS = (("narrow", 10.0), ("wide", 15.0), ("panoramic", math.inf))
# A head whose mean attention mass on the system span is below this is "blind to S": its V/S
# ratios are what make the paper's VAS explode.
SYS_FLOOR = 1e-3


def band(vas: float) -> str:
    """"narrow" (< 10), "wide" (10-15) or "panoramic" (> 15); "n/a" for NaN."""
    if vas != vas:
        return "n/a"
    if vas < 10.0:
        return "narrow"
    return "wide" if vas <= 15.0 else "panoramic"


@dataclass
class VASResult:
    """Per-sample metrics, each ``[B]`` (``per_layer*`` ``[B, L]``), float64 on the CPU."""

    vas: torch.Tensor
    alpha_img: torch.Tensor
    eps_img: torch.Tensor
    alpha_sys: torch.Tensor
    per_layer: torch.Tensor  # VAS per layer
    per_layer_alpha_img: torch.Tensor
    query_count: torch.Tensor
    visual_count: torch.Tensor
    layers: list[int]
    vas_robust: torch.Tensor  # ratio of means (see the module docstring)
    low_sys_heads: torch.Tensor  # [B] (layer, head) pairs with mean system mass < SYS_FLOOR
    low_sys_layers: torch.Tensor  # [B] layers with at least one such head
    heads: int  # query heads per layer
    low_sys_queries: torch.Tensor  # [B] share of (layer, head, query) with system mass < SYS_FLOOR

    def rows(self, ids: Optional[Sequence[str]] = None) -> list[dict]:
        """JSON-ready dicts, one per sample (NaN -> None)."""
        def num(x) -> Optional[float]:
            x = float(x)
            return None if x != x else x

        out = []
        for b in range(self.vas.shape[0]):
            row = {} if ids is None else {"id": ids[b]}
            row.update(vas=num(self.vas[b]), alpha_img=num(self.alpha_img[b]), eps_img=num(self.eps_img[b]),
                       alpha_sys=num(self.alpha_sys[b]), band=band(float(self.vas[b])),
                       per_layer=[num(v) for v in self.per_layer[b]],
                       per_layer_alpha_img=[num(v) for v in self.per_layer_alpha_img[b]],
                       layers=list(self.layers), query_tokens=int(self.query_count[b]),
                       visual_tokens=int(self.visual_count[b]), vas_robust=num(self.vas_robust[b]),
                       low_sys_heads=int(self.low_sys_heads[b]), low_sys_layers=int(self.low_sys_layers[b]),
                       heads=self.per_layer.shape[1] * self.heads, low_sys_queries=num(self.low_sys_queries[b]))
            out.append(row)
        return out


def vas_from_stats(stats: AttentionStats, eps: float = 0.0) -> VASResult:
    """The metrics of every sample from an ``AttentionStats`` (``eps`` is added to the
    denominator of the ratio; the paper's VAS has none)."""
    mass_v = stats.mass_v.detach().double().cpu()
    mass_s = stats.mass_s.detach().double().cpu()
    q = stats.query_mask.cpu()[:, None, None, :]  # [B, 1, 1, T]
    n_q = stats.query_mask.sum(-1).double().cpu()  # [B]
    heads = mass_v.shape[2]
    ratio = torch.where(q, mass_v / (mass_s + eps), torch.zeros((), dtype=torch.float64))
    per_layer = ratio.sum((2, 3)) / (heads * n_q)[:, None]  # [B, L]; NaN when |Q| = 0
    per_layer_alpha = mass_v.sum((2, 3)) / (heads * n_q)[:, None]
    alpha_sys = (mass_s.sum((2, 3)) / (heads * n_q)[:, None]).mean(1)
    visual_count = stats.visual_count.cpu()
    alpha_img = per_layer_alpha.mean(1)
    eps_img = alpha_img / visual_count.double()  # NaN (0/0) or inf never: alpha_img = 0 when |V| = 0
    eps_img = torch.where(visual_count > 0, eps_img, torch.full_like(eps_img, math.nan))
    head_sys = (mass_s * q).sum(3) / n_q[:, None, None]  # [B, L, H] mean system mass per head over Q
    low = head_sys < SYS_FLOOR
    vas_robust = (mass_v * q).sum((1, 2, 3)) / (mass_s * q).sum((1, 2, 3))
    return VASResult(per_layer.mean(1), alpha_img, eps_img, alpha_sys, per_layer, per_layer_alpha,
                     stats.query_mask.sum(-1).cpu(), visual_count, list(stats.layers), vas_robust,
                     low.sum((1, 2)), low.any(2).sum(1), heads,
                     ((mass_s < SYS_FLOOR) & q).sum((1, 2, 3)) / (mass_s.shape[1] * heads * n_q))


def compute_vas(model, encoded, query: str = "user", layers: Optional[Sequence[int]] = None,
                chunk_size: Optional[int] = None, intervention: Optional[Intervention] = None,
                method: Optional[str] = None, eps: float = 0.0) -> VASResult:
    """VAS & friends of a batch (an ``avar_ray.modeling.Encoded``): one no-grad statistics pass.
    ``query``: "user" (U, the paper's analysis) or "response" (R; the batch must hold responses)."""
    require_system_span(encoded.spans.system)  # V/S is undefined without S: say so, not inf
    _, stats = attention_statistics(model, encoded, query=query, layers=layers, chunk_size=chunk_size,
                                    intervention=intervention, grad=False, method=method)
    return vas_from_stats(stats, eps=eps)
