"""The learners' side of PAPO and VPPO (``rl.perception``; the maths and both papers' code
in ``avar_ray.perception``): one masked copy of each prompt's images per step, the masked
pass, PAPO's loss terms in the update and VPPO's shaping of the update's rollouts.

The masked copy is built from the prompt cache's processed ``pixel_values`` (no second
processor call), seeded by ``rl.seed``, the step, the sample and the image, so every rank, every
pass and a resumed run mask an image identically; it is cached for the step beside the prompt
cache (cleared with it). The masked rollouts of one prompt carry one and the same masked image,
so ``each_image_once`` still encodes it once per micro-batch.

Where the masked log-probs come from: the score pass (no grad) for VPPO and for PAPO as its
code runs it; with ``papo_masked_grad`` the update's own second forward, with grad.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from actors.learner_batches import Prompt, assemble
from actors.policy import pad_rows
from actors.records import TrainItem
from avar_ray.perception import entropy_penalty, mask_pixels, mask_ratio, mask_seed, papo_terms, vppo_shape

PARTS = ("kl", "entropy_real", "entropy_masked")


def active(p) -> bool:
    return p.vppo or p.papo_coef > 0


def masked_in_score(p) -> bool:
    """The score pass forwards the masked images (no grad): VPPO's dependency, PAPO's masked side."""
    return p.vppo or (p.papo_coef > 0 and not p.papo_masked_grad)


class PerceptionPass:
    """One learner rank's masked images and PAPO/VPPO terms; inert when ``rl.perception`` is off."""

    def __init__(self, processor, rl):
        self.p, self.seed, self.processor = rl.perception, rl.seed, processor
        self.loss_agg_mode = rl.loss_agg_mode
        ip = getattr(processor, "image_processor", None)
        self.mean, self.std = getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
        self.temporal = getattr(ip, "temporal_patch_size", 1)
        self.cache: dict[int, tuple[Prompt, int, Prompt]] = {}
        self.sums = {k: 0.0 for k in PARTS}

    def masked_prompt(self, prompt: Prompt, step: int) -> Prompt:
        hit = self.cache.get(id(prompt))
        if hit is not None and hit[0] is prompt and hit[1] == step:
            return hit[2]
        inputs = dict(prompt.inputs)
        grid = inputs.get("image_grid_thw")
        if grid is not None:
            pieces = torch.split(inputs["pixel_values"], [t * h * w for t, h, w in grid.tolist()])
            inputs["pixel_values"] = torch.cat([
                mask_pixels(piece, self.p.mask, mask_ratio(self.p), mask_seed(self.seed, step, prompt.sample_id, k),
                            self.mean, self.std, self.temporal) for k, piece in enumerate(pieces)])
        masked = Prompt(inputs, prompt.sample_id)
        self.cache[id(prompt)] = (prompt, step, masked)  # the prompt kept alive: its id is not reused
        return masked

    def encode(self, prompts: Sequence[Prompt], items: Sequence[TrainItem], step: int):
        """The model inputs of ``items`` with their prompts' masked images."""
        return assemble(self.processor, [self.masked_prompt(p, step) for p in prompts],
                        [it.response_ids for it in items])

    # ---------------------------------------------------------------- score pass (no grad)
    def score_logprobs(self, learner, prompts, items, step: int) -> Optional[list[list[float]]]:
        """The masked-image log-probs of ``items``' responses, or None when not wanted."""
        if not masked_in_score(self.p):
            return None
        lp = learner._logprobs(learner.engine, self.encode(prompts, items, step), items)[0]
        return [lp[b, :len(it.response_ids)].tolist() for b, it in enumerate(items)]

    # ---------------------------------------------------------------- update
    def token_weights(self, items: Sequence[TrainItem], weights: Optional[torch.Tensor], width: int,
                      device) -> Optional[torch.Tensor]:
        """The policy loss's per-token weights times VPPO's keep-mask (its tokens off the top-k
        weigh 0, as VPPO's ``loss_token_mask``)."""
        if not self.p.vppo:
            return weights
        keep = pad_rows([it.keep for it in items], width).to(device)
        return keep if weights is None else weights * keep

    def update_terms(self, learner, logprob: torch.Tensor, mask: torch.Tensor, items, prompts, step: int,
                     info: dict, record: bool):
        """PAPO's and VPPO's additions to the update's loss (0 when off); ``record``: summed
        into the metrics (the first PPO epoch, like the policy loss)."""
        loss = torch.zeros((), device=logprob.device)
        p = self.p
        if p.papo_coef > 0:
            if p.papo_masked_grad:
                masked = learner._logprobs(learner.engine, self.encode(prompts, items, step), items)[0]
            else:
                masked = pad_rows([it.masked_logprobs for it in items], logprob.shape[1]).to(logprob.device)
            papo, parts = papo_terms(logprob, masked, mask, p.papo_coef, p.papo_entropy_coef, info,
                                     self.loss_agg_mode)
            loss = loss + papo
            if record:
                for k in PARTS:
                    self.sums[k] += parts[k]
        if p.vppo and p.vppo_entropy_coef > 0:
            loss = loss + p.vppo_entropy_coef * entropy_penalty(logprob, mask, info, self.loss_agg_mode)
        return loss

    def end_step(self) -> dict:
        """The step's summed PAPO parts (this rank's share of the mini-batch means); clears the cache."""
        out = {f"papo_{k}": float(v) for k, v in self.sums.items()}
        self.sums = {k: 0.0 for k in PARTS}
        self.cache.clear()
        return out


# ----------------------------------------------------------------------------- the driver's side
def shape_items(p, items: list[TrainItem], minis: Sequence[Sequence[int]]) -> tuple[list[TrainItem], dict]:
    """VPPO's advantage scales and token keep-masks on the update's rollouts (``minis``: the
    rollout indices of each mini-batch), and the masked-vs-real dependency metrics wherever the
    score pass gave masked log-probs."""
    from dataclasses import replace

    if not items or items[0].masked_logprobs is None or items[0].old_logprobs is None:
        return items, {}
    scales, keeps, metrics = vppo_shape([it.old_logprobs for it in items], [it.masked_logprobs for it in items],
                                        minis, p.vppo_top_k, p.vppo_advantage_min)
    if not p.vppo:
        return items, {"perception/masked_kl": metrics["perception/vppo_dependency"]}
    shaped = [replace(it, advantage=it.advantage * s, keep=k) for it, s, k in zip(items, scales, keeps)]
    return shaped, {"perception/masked_kl": metrics["perception/vppo_dependency"], **metrics}


def group_metrics(p, per_rank: list[dict], world_size: int, minis: int) -> dict:
    """PAPO's parts over the ranks (each rank's are its share of the mini-batch means, summed
    over the mini-batches) as means per mini-batch, and the loss they add."""
    if p.papo_coef <= 0:
        return {}
    parts = {k: sum(r[f"papo_{k}"] for r in per_rank) / world_size / minis for k in PARTS}
    out = {f"perception/papo_{k}": v for k, v in parts.items()}
    out["perception/papo_loss"] = (-p.papo_coef * parts["kl"]
                                   + p.papo_entropy_coef * (parts["entropy_real"] + parts["entropy_masked"]))
    return out
