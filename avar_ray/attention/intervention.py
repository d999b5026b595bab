"""Training-free attention intervention (SPEC.md §2).

    A' = A ⊙ (1 + a_img·M_V − a_sys·M_S),   rows renormalised

Because softmax(z + b) ∝ A·e^b, this is exactly an additive key bias of ``log(1 + a_img)`` on
the visual keys V and ``log(1 − a_sys)`` on the system keys S, so it runs inside SDPA-style
kernels (as an extra q/k column, see ``kernel.augmented_call``; no [T, T] mask) and never needs
eager attention maps. The bias is applied in
the text decoder's layers (all, or a chosen subset); the vision tower is untouched.

Generation (``context.generate``): tokens produced by ``generate`` are response tokens (never
V or S), so the bias covers the prompt keys and is zero on every key appended later (the KV
cache grows; the attention function pads the bias with zeros to the current key length).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from avar_ray.config import InterventionConfig


@dataclass(frozen=True)
class Intervention:
    """Re-weighting strengths and the text layers they apply to (None = all layers). No
    defaults here: they live in ``config.InterventionConfig`` (``from_config``, ``configured``)."""

    a_img: float
    a_sys: float
    layers: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        if not self.a_sys < 1.0:
            raise ValueError(
                f"intervention a_sys must be < 1, got {self.a_sys}: the system keys are re-weighted by "
                "(1 - a_sys), so a_sys = 1 removes the system span entirely (key bias log(0) = -inf)")
        if not self.a_img > -1.0:
            raise ValueError(f"intervention a_img must be > -1, got {self.a_img}: the visual keys are re-weighted "
                             "by (1 + a_img), which must stay positive")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))

    @classmethod
    def from_config(cls, cfg) -> Optional["Intervention"]:
        """From ``avar_ray.config.InterventionConfig``; None when it is not enabled."""
        return cls.configured(cfg) if cfg.enabled else None

    @classmethod
    def configured(cls, cfg=None) -> "Intervention":
        """The re-weighting of an ``InterventionConfig`` whether enabled or not (None: the
        schema's defaults), e.g. for a request that turns it on."""
        cfg = InterventionConfig() if cfg is None else cfg
        return cls(a_img=cfg.a_img, a_sys=cfg.a_sys, layers=None if cfg.layers is None else tuple(cfg.layers))

    @property
    def visual_bias(self) -> float:
        return math.log1p(self.a_img)

    @property
    def system_bias(self) -> float:
        return math.log1p(-self.a_sys)

    def applies_to(self, layer_idx: int) -> bool:
        return self.layers is None or layer_idx in self.layers

    def key_bias(self, visual: torch.Tensor, system: torch.Tensor) -> torch.Tensor:
        """Additive bias per key position ``[B, T]`` (float32) from the V and S masks ``[B, T]``."""
        bias = torch.zeros(visual.shape, dtype=torch.float32, device=visual.device)
        bias = bias.masked_fill(visual.bool(), self.visual_bias)
        return bias.masked_fill(system.bool(), self.system_bias)

    def reweight(self, visual: torch.Tensor, system: torch.Tensor) -> torch.Tensor:
        """The multiplicative form ``1 + a_img·M_V − a_sys·M_S`` per key ``[B, T]`` (for references)."""
        return 1.0 + self.a_img * visual.float() - self.a_sys * system.float()


def validate_layers(layers: Optional[Sequence[int]], num_layers: int, what: str) -> Optional[tuple[int, ...]]:
    """Normalise a layer subset (negative indices count from the end); None = all layers."""
    if layers is None:
        return None
    out = []
    for i in layers:
        j = int(i) + num_layers if int(i) < 0 else int(i)
        if not 0 <= j < num_layers:
            raise ValueError(f"{what}: layer {i} out of range for a model with {num_layers} text layers")
        out.append(j)
    if not out:
        raise ValueError(f"{what}: the layer subset is empty (use None for all layers)")
    return tuple(sorted(set(out)))
