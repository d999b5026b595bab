"""The VARS reward (SPEC.md §5) but for r_acc (``accuracy.py``): r_format, r_visual and the sum

    r_total = r_acc + lambda_v * norm(r_visual) + lambda_f * r_format

One scalar per rollout (outcome reward). r_visual is on the VAS scale (~5-20), so the raw
form (the paper's, and the default) lets 0.3 * r_visual outweigh r_acc; ``normalise_visual``
offers two bounded alternatives for comparison.

r_visual = 0 if wrong, else mean_t mean_l [ mass_V(Abar[l,t]) / (mass_S(Abar[l,t]) + eps) ]
(the gate, ``is_correct``, is applied by the reward actor). Its inputs are attention *masses*
per layer, head and response token (sum over the key set of the post-softmax weights), shape
[L, H, T], as the attention statistics produce them; no full attention map is needed.
Head-averaging the mass equals the mass of the head-averaged attention ``Abar`` (the sum over
keys is linear), so the head mean is taken first, as in the paper, and the ratio is formed per
(layer, token) -- a mean of ratios, not a ratio of means.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import numpy as np

# --- r_format: the <think>...</think><answer>...</answer> shape ------------------------

# End-of-turn tokens a decoder may leave in the text when special tokens are not skipped.
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>")
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")

_END = "|".join(re.escape(t) for t in END_TOKENS)
_SHAPE_RE = re.compile(
    rf"^\s*<think>.*?</think>\s*<answer>(?P<answer>.*?)</answer>\s*(?:(?:{_END})\s*)?$",
    re.DOTALL,
)


def format_reward(response: str) -> float:
    """1.0 iff ``response`` is exactly ``<think>...</think>`` then ``<answer>...</answer>``.

    Whitespace is allowed around the blocks; nothing else before ``<think>`` or after
    ``</answer>`` except one end-of-turn token (``END_TOKENS``). Each tag appears exactly once,
    so a second answer block, a nested tag or a stray ``</think>`` fails. The answer must be
    non-empty; the thinking may be empty (its length is not this reward's business).
    """
    if not response:
        return 0.0
    if any(response.count(tag) != 1 for tag in _TAGS):
        return 0.0
    m = _SHAPE_RE.match(response)
    if m is None or not m.group("answer").strip():
        return 0.0
    return 1.0


# --- r_visual ---------------------------------------------------------------------------

def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor (torch itself is not imported here)
        # float64 on CPU: bf16 masses would lose the small system-mass denominators
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def visual_ratio(
    mass_v,
    mass_s,
    eps: float = 1e-6,
    layers: Sequence[int] | None = None,
) -> float:
    """The ungated ratio (the response-token VAS of one sequence); 0.0 when T == 0.
    ``mass_v``, ``mass_s``: [L, H, T] numpy arrays or torch tensors.

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


# --- the sum ----------------------------------------------------------------------------

VisualNorm = Literal["none", "squash", "group_z"]
VISUAL_NORMS = ("none", "squash", "group_z")

# One threshold for "correct", in RL (the r_visual gate, group_z) and eval alike. r_acc is 0 or 1
# today; were partial credit introduced, half-right would count as correct.
CORRECT_THRESHOLD = 0.5


def is_correct(r_acc):
    """r_acc >= CORRECT_THRESHOLD (a bool, or a bool array for an array)."""
    out = np.asarray(r_acc, dtype=np.float64) >= CORRECT_THRESHOLD
    return bool(out) if out.ndim == 0 else out


# Spreads below this fraction of a group's scale are float noise (see normalise_visual, group_z).
# Real differences between rollouts' VAS are orders above: 1e-4 relative is already a tie.
ZERO_SPREAD_RTOL = 1e-5


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
      two correct samples, or zero spread, gives 0, since "more visual than your peers" is then
      undefined. Zero spread means below ``ZERO_SPREAD_RTOL`` times the group's largest |r|:
      the same response scored in another batch differs by float32 noise (~1e-7), which the
      z-score would blow up to O(1) (+-1 for two rollouts without ``eps``; with eps = 1e-6 in
      the denominator totals still differed by up to 0.17). Note z can be negative: a correct
      answer with below-average visual attention gets 1 + lambda_v * z; with n correct samples
      |z| <= sqrt(n - 1), so correct still beats wrong whenever lambda_v * sqrt(n - 1) < 1
      (lambda_v = 0.3, 8 rollouts: 0.79).

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
        if std <= ZERO_SPREAD_RTOL * np.abs(vals).max():
            continue
        out[sel] = (vals - vals.mean()) / (std + eps)
    return out


def combine_rewards(
    r_acc: np.ndarray,
    r_format: np.ndarray,
    r_visual: np.ndarray,
    *,
    lambda_v: float,
    lambda_f: float,
    visual_norm: VisualNorm,
    accuracy_weight: float,
    group_ids: np.ndarray | None = None,
) -> np.ndarray:
    """accuracy_weight * r_acc + lambda_v * normalise_visual(r_visual) + lambda_f * r_format, per
    rollout. The weights have no defaults here: they are ``config.RewardConfig``'s (``rl.reward``).
    ``accuracy_weight`` -1 with lambda_v = lambda_f = 0 flips every group-normalised GRPO
    advantage exactly (the control of tests/test_learning.py).

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
