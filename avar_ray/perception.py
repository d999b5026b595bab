"""PAPO and VPPO maths, pure (torch only; no Ray, no model): the masked image, the per-token
estimators, PAPO's loss terms and VPPO's shaping. ``actors.perception`` runs them in the learners.

Both methods are held to their released code (EasyR1 forks), which differs from the papers:

* PAPO (Perception-Aware Policy Optimization; github MikeWangWZHL/PAPO, ``dp_actor.py``). The
  paper maximises ``KL[pi(o|q,I) || pi(o|q,I_mask)]`` over token distributions with gradient
  through both sides, plus entropy terms on both. The code uses, per SAMPLED token, verl's
  ``low_var_kl`` (k3) estimator ``exp(m - l) - (m - l) - 1`` (l: the log-prob with the real
  image, with grad; m: with the masked image), clamped to [-10, 10], and ``-log p`` of the sampled
  token as each entropy's estimator; by default (``RECOMPUTE_AUG_LOG_PROBS=False``) the masked
  log-probs come from a no-grad pass with the pre-update policy, so the masked entropy term
  carries no gradient ("works similarly while significantly saving computation").
  ``rl.perception.papo_masked_grad`` is their ``True``: the masked forward with grad. Loss:
  ``pg - coef * agg(KL) + ent_coef * (agg(-l) + agg(-m))`` (their 7B GRPO script: coef 0.02,
  both entropy coefs 0.05; patches of 14 px blackened with probability 0.6).
* VPPO (Spotlight on Token Perception, arXiv 2510.09285; github huaixuheqing/VPPO-RL,
  ``dp_actor.py``). The paper's token dependency is a KL between the token distributions with
  the real and the perturbed image; the code's is, per sampled token, ``exp(d) - d - 1`` with
  ``d = m - old`` (both no grad), clamped to [0, 10]. The trajectory's score is its tokens' mean
  dependency; over the mini-batch the scores are min-max normalised to ``s`` in [0, 1] and the
  advantage scaled by ``a_min + s * (a_max - a_min)`` with the dynamic ``a_max = a_min + (1 -
  a_min) / mean(s)`` (so the scales average 1); the code takes that mean per micro-batch, here
  per mini-batch (our micro-batches are token-budget cuts of varying size: the scales must not
  depend on them). The top ``ceil(n * top_k)`` tokens by dependency of each response keep their
  policy-gradient loss, the others get weight 0 (still counted in the token mean's
  denominator, as their ``loss_token_mask``). Their 7B script: top_k 0.4, a_min 0.9, an entropy
  penalty ``0.06 * agg(-l)``; perturbation: 14 px patches blackened with probability 0.5.

Masking here is on the processed ``pixel_values``: for Qwen2.5-VL / Qwen3-VL each row is one
vision patch (``channels x temporal_patch_size x patch x patch``, channel outermost), so a
blackened patch is a row set to the normalised value of a black pixel. VPPO blackens the
resized image (its patches are the tower's exactly); PAPO blackens before the resize (here: on
the tower's grid).
"""
from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch

CHANNELS = 3
NOISE_STD = 189.0 / 255.0  # VPPO's add_gaussian_noise (std 189 on 0..255)
PAPO_MASK_RATIO, VPPO_MASK_RATIO = 0.6, 0.5  # black_prob of their random_patch_blackening


def mask_ratio(p) -> float:
    """``rl.perception.mask_ratio``, or where null the method's own (PAPO's when it is on)."""
    if p.mask_ratio is not None:
        return p.mask_ratio
    return PAPO_MASK_RATIO if p.papo_coef > 0 else VPPO_MASK_RATIO


def mask_seed(seed: int, step: int, sample_id: str, image: int) -> int:
    """A 63-bit seed per (run seed, step, sample, image of the sample): the same mask whichever
    rank, micro-batch or restart masks it."""
    digest = hashlib.sha256(f"{seed}/{step}/{sample_id}/{image}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def mask_pixels(pixel_values: torch.Tensor, mode: str, ratio: float, seed: int, mean: Sequence[float],
                std: Sequence[float], temporal: int) -> torch.Tensor:
    """A masked copy of ONE image's ``pixel_values`` rows (``[patches, C * temporal * p * p]``).
    ``patches``: each row independently blackened with probability ``ratio`` (PAPO's and VPPO's
    ``random_patch_blackening``: a pixel of 0 before normalisation); ``noise``: Gaussian noise of
    std 189/255 added to every pixel, clipped to [0, 1] (the same on the temporal copies)."""
    rows, width = pixel_values.shape
    if width % (CHANNELS * temporal):
        raise ValueError(f"pixel_values rows of {width} values are not {CHANNELS} channels x {temporal} frames")
    gen = torch.Generator().manual_seed(seed)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, CHANNELS, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, CHANNELS, 1, 1)
    x = pixel_values.detach().float().cpu().reshape(rows, CHANNELS, temporal, -1)
    if mode == "patches":
        black = (-mean_t / std_t).expand_as(x)
        hit = (torch.rand(rows, generator=gen) < ratio).view(rows, 1, 1, 1)
        out = torch.where(hit, black, x)
    elif mode == "noise":
        noise = torch.randn(rows, CHANNELS, 1, x.shape[-1], generator=gen) * NOISE_STD
        out = ((x * std_t + mean_t + noise).clamp(0.0, 1.0) - mean_t) / std_t
    else:
        raise ValueError(f"unknown mask {mode!r} (rl.perception.mask)")
    return out.reshape(rows, width).to(pixel_values.dtype)


def low_var_kl(logprob: torch.Tensor, ref: torch.Tensor, low: float) -> torch.Tensor:
    """verl's k3 estimator per sampled token: ``exp(ref - logprob) - (ref - logprob) - 1``, the
    difference clamped to [-20, 20] and the result to [low, 10] (PAPO: low -10; VPPO: 0)."""
    d = (ref - logprob).clamp(-20.0, 20.0)
    return (d.exp() - d - 1).clamp(low, 10.0)


def papo_terms(logprob: torch.Tensor, masked: torch.Tensor, mask: torch.Tensor, coef: float, entropy_coef: float,
               info: dict, loss_agg_mode: str) -> tuple[torch.Tensor, dict]:
    """PAPO's addition to the GRPO loss on ``[B, R]`` log-probs with the real image (``logprob``,
    with grad) and the masked one (``masked``: with grad or not), aggregated like the policy loss
    (verl's ``agg_loss``, global token counts in ``info``). Returns ``(loss, parts)``; parts:
    the aggregated KL and both entropy estimators (detached)."""
    from verl.trainer.ppo.core_algos import agg_loss

    mask = mask.float()

    def agg(x):
        return agg_loss(x, mask, loss_agg_mode, **info)

    kl = agg(low_var_kl(logprob, masked, low=-10.0))
    h_real, h_masked = agg(-logprob), agg(-masked)
    loss = -coef * kl + entropy_coef * (h_real + h_masked)
    return loss, {"kl": kl.detach(), "entropy_real": h_real.detach(), "entropy_masked": h_masked.detach()}


def entropy_penalty(logprob: torch.Tensor, mask: torch.Tensor, info: dict, loss_agg_mode: str) -> torch.Tensor:
    """VPPO's entropy penalty's estimator ``agg(-log p)`` over every response token."""
    from verl.trainer.ppo.core_algos import agg_loss

    return agg_loss(-logprob, mask.float(), loss_agg_mode, **info)


# ----------------------------------------------------------------------------- VPPO
def dependency(old: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """VPPO's per-token visual dependency (no grad): low_var_kl of the masked-image log-prob
    against the real one, clamped to [0, 10]."""
    return low_var_kl(old, masked, low=0.0)


def top_tokens(dep: torch.Tensor, mask: torch.Tensor, top_k: float) -> torch.Tensor:
    """``[B, R]`` float mask: per row the ``ceil(n * top_k)`` most dependent of its ``n`` tokens
    (VPPO's ``top_p_mask``; ties keep the earlier token)."""
    valid = mask.bool()
    k = torch.ceil(valid.sum(1) * top_k).long()
    order = torch.sort(dep.masked_fill(~valid, -math.inf), dim=1, descending=True, stable=True).indices
    rank = torch.arange(dep.shape[1], device=dep.device).expand_as(dep)
    keep = torch.zeros_like(valid).scatter_(1, order, rank < k.unsqueeze(1))
    return (keep & valid).float()


def advantage_scales(scores: torch.Tensor, valid: torch.Tensor, a_min: float, eps: float = 1e-8) -> torch.Tensor:
    """VPPO's trajectory-level advantage shaping: one scale per trajectory from its mean
    dependency ``scores`` (``valid``: it has response tokens); 1 where the mini-batch's range is
    under 1e-6 or it has fewer than two valid trajectories."""
    out = torch.ones_like(scores)
    vals = scores[valid]
    if vals.numel() < 2 or float(vals.max() - vals.min()) <= 1e-6:
        return out
    norm = ((vals - vals.min()) / (vals.max() - vals.min())).clamp(0.0, 1.0)
    a_max = a_min + (1.0 - a_min) / (norm.mean() + eps)
    out[valid] = a_min + norm * (a_max - a_min)
    return out


def pad(rows: Sequence[Sequence[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged rows to a zero-padded ``[B, R]`` float tensor and its mask."""
    width = max((len(r) for r in rows), default=0) or 1
    out, mask = torch.zeros(len(rows), width), torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(list(r), dtype=torch.float32)
        mask[i, :len(r)] = True
    return out, mask


def vppo_shape(old: Sequence[Sequence[float]], masked: Sequence[Sequence[float]], minis: Sequence[Sequence[int]],
               top_k: float, a_min: float) -> tuple[list[float], list[list[float]], dict]:
    """VPPO over a step: per rollout its advantage scale and token keep-mask (``minis``: the
    rollouts of each mini-batch, the range the scales are normalised over), and the metrics
    (mean dependency over tokens, share of tokens kept, the scales' min / max / std)."""
    n = len(old)
    scales, keeps = [1.0] * n, [[] for _ in range(n)]
    dep_sum = kept = tokens = 0.0
    for rows in minis:
        o, mask = pad([old[i] for i in rows])
        m, _ = pad([masked[i] for i in rows])
        dep = dependency(o, m) * mask
        counts = mask.sum(1)
        s = advantage_scales(dep.sum(1) / counts.clamp(min=1), counts > 0, a_min)
        keep = top_tokens(dep, mask, top_k)
        for j, i in enumerate(rows):
            scales[i] = float(s[j])
            keeps[i] = keep[j, :len(old[i])].tolist()
        dep_sum, kept, tokens = dep_sum + float(dep.sum()), kept + float(keep.sum()), tokens + float(counts.sum())
    s = torch.tensor(scales)
    metrics = {"perception/vppo_dependency": dep_sum / max(tokens, 1), "perception/vppo_kept": kept / max(tokens, 1),
               "perception/vppo_scale_min": float(s.min()) if n else 1.0,
               "perception/vppo_scale_max": float(s.max()) if n else 1.0,
               "perception/vppo_scale_std": float(s.std(unbiased=False)) if n else 0.0}
    return scales, keeps, metrics
