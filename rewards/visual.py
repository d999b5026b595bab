"""r_visual (SPEC.md §5, VARS): the visual-to-system attention ratio of the response tokens.

    r_visual = 0 if wrong, else mean_t mean_l [ mass_V(Abar[l,t]) / (mass_S(Abar[l,t]) + eps) ]

(the gate, ``rewards.combine.is_correct``, is applied by the reward actor)

Inputs are attention *masses* per layer, head and response token (sum over the key set of the
post-softmax weights), shape [L, H, T], as the chunked logsumexp path of SPEC §1 produces them;
no full attention map is needed. Head-averaging the mass equals the mass of the head-averaged
attention ``Abar`` (the sum over keys is linear), so the head mean is taken first, as in the
paper, and the ratio is formed per (layer, token) -- a mean of ratios, not a ratio of means.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        # float64 on CPU: bf16 masses would lose the small system-mass denominators
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def visual_ratio(
    mass_v: ArrayLike,
    mass_s: ArrayLike,
    eps: float = 1e-6,
    layers: Sequence[int] | None = None,
) -> float:
    """The ungated ratio (the response-token VAS of one sequence); 0.0 when T == 0.

    ``layers``: indices into the L axis (negative allowed) to average over; None = all.
    """
    v, s = _to_numpy(mass_v), _to_numpy(mass_s)
    if v.ndim != 3 or v.shape != s.shape:
        raise ValueError(f"mass_v and mass_s must both be [L, H, T]; got {v.shape} and {s.shape}")
    if layers is not None:
        idx = list(layers)
        if not idx:
            raise ValueError("layers must be None or a non-empty list of layer indices")
        v, s = v[idx], s[idx]
    if v.shape[2] == 0 or v.shape[0] == 0:
        return 0.0
    ratio = v.mean(axis=1) / (s.mean(axis=1) + eps)  # [L', T]
    return float(ratio.mean())
