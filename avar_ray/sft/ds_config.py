"""The DeepSpeed config of the SFT run, its step arithmetic and the LR schedule (pure functions)."""
from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def steps_per_epoch(rows: int, world_size: int, micro_batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one pass over ``rows``: Ray Train splits the rows equally over the
    workers, and each worker drops its last incomplete micro-batch."""
    return (rows // world_size // micro_batch_size) // grad_accum


def total_steps(sft, rows: int, world_size: int) -> int:
    per_epoch = steps_per_epoch(rows, world_size, sft.micro_batch_size, sft.grad_accum)
    if per_epoch == 0:
        raise ValueError(f"sft: {rows} usable rows are fewer than one optimizer step needs "
                         f"({world_size} workers x micro_batch_size {sft.micro_batch_size} x grad_accum {sft.grad_accum})")
    return sft.max_steps if sft.max_steps > 0 else per_epoch * sft.epochs


def warmup_steps(warmup_ratio: float, total: int) -> int:
    return int(math.ceil(warmup_ratio * total))


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak LR for optimizer update ``step`` (0-based).

    The first ``warmup`` updates ramp linearly up to the peak, ``(step + 1) / (warmup + 1)``,
    so no update runs at LR 0 (DeepSpeed's own Warmup* schedulers spend the first update at
    their minimum LR); then ``constant`` stays at the peak, ``linear`` and ``cosine`` decay
    towards 0 at update ``total`` (the last update still has a positive LR).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"sft.lr_schedule: expected one of {SCHEDULES}, got {schedule!r}")
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_scheduler(sft, total: int):
    """A callable DeepSpeed turns into the run's scheduler (it needs the optimizer it builds);
    DeepSpeed steps it at each accumulation boundary and keeps its state in checkpoints."""
    from torch.optim.lr_scheduler import LambdaLR

    warmup = warmup_steps(sft.warmup_ratio, total)
    return lambda optimizer: LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, sft.lr_schedule))


def deepspeed_config(sft, dtype: str) -> dict:
    from avar_ray.deepspeed_config import deepspeed_config as build

    return build(sft.zero_stage, sft.micro_batch_size, sft.grad_accum, sft.grad_clip, sft.lr, sft.weight_decay, dtype)
