"""The DeepSpeed config of the SFT run and its step arithmetic (pure functions)."""
from __future__ import annotations

import math

# sft.lr_schedule -> DeepSpeed scheduler (all warm up linearly from 0 first).
SCHEDULERS = {"constant": "WarmupLR", "linear": "WarmupDecayLR", "cosine": "WarmupCosineLR"}


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


def deepspeed_config(sft, total: int, bf16: bool) -> dict:
    warmup = int(math.ceil(sft.warmup_ratio * total))
    if sft.lr_schedule == "constant":
        params = {"warmup_min_lr": 0.0, "warmup_max_lr": sft.lr, "warmup_num_steps": warmup, "warmup_type": "linear"}
    elif sft.lr_schedule == "linear":
        params = {"warmup_min_lr": 0.0, "warmup_max_lr": sft.lr, "warmup_num_steps": warmup,
                  "total_num_steps": max(total, warmup + 1), "warmup_type": "linear"}
    else:
        params = {"total_num_steps": max(total, warmup + 1), "warmup_num_steps": warmup,
                  "warmup_min_ratio": 0.0, "cos_min_ratio": 0.0}
    zero = {"stage": sft.zero_stage}
    if sft.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # the HF export needs full weights
    return {
        "train_micro_batch_size_per_gpu": sft.micro_batch_size,
        "gradient_accumulation_steps": sft.grad_accum,
        "gradient_clipping": sft.grad_clip,
        "zero_optimization": zero,
        # torch_adam: DeepSpeed's own CPU Adam would JIT-compile first (~53 s on 2 cores).
        "optimizer": {"type": "AdamW", "params": {"lr": sft.lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                   "weight_decay": sft.weight_decay, "torch_adam": True}},
        "scheduler": {"type": SCHEDULERS[sft.lr_schedule], "params": params},
        "bf16": {"enabled": bool(bf16)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
