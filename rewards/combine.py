"""r_total = r_acc + lambda_v * norm(r_visual) + lambda_f * r_format (SPEC.md §5).

One scalar per rollout (outcome reward). r_visual is on the VAS scale (~5-20), so the raw
form (the paper's, and the default) lets 0.3 * r_visual outweigh r_acc; ``normalise_visual``
offers two bounded alternatives for comparison.
"""
from __future__ import annotations

from typing import Literal

import numpy as np

VisualNorm = Literal["none", "squash", "group_z"]
VISUAL_NORMS = ("none", "squash", "group_z")

# One threshold for "correct", in RL (the r_visual gate, group_z) and eval alike. r_acc is 0 or 1
# today; were partial credit introduced, half-right would count as correct.
CORRECT_THRESHOLD = 0.5


def is_correct(r_acc):
    """r_acc >= CORRECT_THRESHOLD (a bool, or a bool array for an array)."""
    out = np.asarray(r_acc, dtype=np.float64) >= CORRECT_THRESHOLD
    return bool(out) if out.ndim == 0 else out


def normalise_visual(
    r_visual: np.ndarray,
    mode: VisualNorm,
    group_ids: np.ndarray | None = None,
    eps: float = 1e-6,
    correct: np.ndarray | None = None,
) -> np.ndarray:
    """Rescale the (already correctness-gated) visual rewards of a batch of rollouts.

    - "none": raw values (paper default).
    - "squash": r / (1 + r), monotone from [0, inf) onto [0, 1): the ordering and "0 stays 0"
      survive, and a VAS of ~10 maps to ~0.9, so lambda_v bounds the bonus and it can never
      outweigh r_acc when lambda_v < 1. Chosen over min-max or a fixed divisor because it
      needs no batch statistics or scale constant. Negative inputs are clipped to 0.
    - "group_z": z-score within each GRPO group (``group_ids``), over the group's *correct*
      samples only; incorrect samples stay 0. Standardising the zeros of wrong answers with
      the rest would hand wrong answers a positive or negative visual term and mix the
      correctness signal into the visual one. Population std (ddof=0); a group with fewer than
      two correct samples (or zero spread) gives 0, since "more visual than your peers" is then
      undefined. Note z can be negative: a correct answer with below-average visual attention
      gets 1 + lambda_v * z; with n correct samples |z| <= sqrt(n - 1), so correct still beats
      wrong whenever lambda_v * sqrt(n - 1) < 1 (lambda_v = 0.3, 8 rollouts: 0.79).

    ``correct``: which rollouts are correct (default ``r_visual > 0``, exact since r_visual
    is gated to 0 for wrong answers).
    """
    r = np.asarray(r_visual, dtype=np.float64).reshape(-1)
    if mode == "none":
        return r.copy()
    if mode == "squash":
        r = np.maximum(r, 0.0)
        return r / (1.0 + r)
    if mode != "group_z":
        raise ValueError(f"unknown visual normalisation {mode!r}; expected one of {VISUAL_NORMS}")
    if group_ids is None:
        raise ValueError("visual_norm='group_z' needs group_ids (the GRPO group of each rollout)")
    gid = np.asarray(group_ids).reshape(-1)
    if gid.shape != r.shape:
        raise ValueError(f"group_ids shape {gid.shape} != r_visual shape {r.shape}")
    ok = (r > 0) if correct is None else is_correct(np.asarray(correct, dtype=np.float64).reshape(-1))
    out = np.zeros_like(r)
    for g in np.unique(gid):
        sel = (gid == g) & ok
        if sel.sum() < 2:
            continue
        vals = r[sel]
        std = vals.std()
        if std <= 0:
            continue
        out[sel] = (vals - vals.mean()) / (std + eps)
    return out


def combine_rewards(
    r_acc: np.ndarray,
    r_format: np.ndarray,
    r_visual: np.ndarray,
    lambda_v: float = 0.3,
    lambda_f: float = 0.1,
    visual_norm: VisualNorm = "none",
    group_ids: np.ndarray | None = None,
    accuracy_weight: float = 1.0,
) -> np.ndarray:
    """accuracy_weight * r_acc + lambda_v * normalise_visual(r_visual) + lambda_f * r_format, per
    rollout. ``accuracy_weight`` -1 with lambda_v = lambda_f = 0 flips every group-normalised
    GRPO advantage exactly (the control of tests/test_learning.py).

    For "group_z" the correct set is taken from ``r_acc`` (``is_correct``), not from r_visual > 0.
    """
    acc = np.asarray(r_acc, dtype=np.float64).reshape(-1)
    fmt = np.asarray(r_format, dtype=np.float64).reshape(-1)
    vis = np.asarray(r_visual, dtype=np.float64).reshape(-1)
    if not (acc.shape == fmt.shape == vis.shape):
        raise ValueError(
            f"reward shapes differ: acc {acc.shape}, format {fmt.shape}, visual {vis.shape}"
        )
    nv = normalise_visual(vis, visual_norm, group_ids=group_ids, correct=acc)
    return accuracy_weight * acc + lambda_v * nv + lambda_f * fmt
