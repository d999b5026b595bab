"""The one DeepSpeed config builder (SFT and the RL learners)."""
from __future__ import annotations


def deepspeed_config(zero_stage: int, micro_batch_size: int, grad_accum: int, grad_clip: float, lr: float,
                     weight_decay: float, bf16: bool) -> dict:
    zero = {"stage": zero_stage}
    if zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # the HF export needs full weights
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        # torch_adam: DeepSpeed's own CPU Adam would JIT-compile first (~53 s on 2 cores).
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                   "weight_decay": weight_decay, "torch_adam": True}},
        "bf16": {"enabled": bool(bf16)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
