"""The one DeepSpeed config builder (SFT and the RL learners)."""
from __future__ import annotations

import warnings


def mixed_precision(dtype: str) -> dict:
    """DeepSpeed's ``bf16`` / ``fp16`` sections for ``model.dtype`` (fp32 master weights, the
    forward and backward in the half type). Where the accelerator lacks the half type (DeepSpeed's
    CPU accelerator has bf16 but no fp16) the run trains in float32 and says so."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    supported = {"bfloat16": accelerator.is_bf16_supported(), "float16": accelerator.is_fp16_supported()}
    half = dtype if supported.get(dtype) else None
    if dtype in supported and half is None:
        warnings.warn(f"model.dtype={dtype}: DeepSpeed's {accelerator.device_name()} accelerator has no "
                      f"{dtype} training; training in float32", stacklevel=2)
    # fp16 needs loss scaling (its range underflows small gradients): dynamic, DeepSpeed's default form
    fp16 = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16} if half == "float16" else {"enabled": False}
    return {"bf16": {"enabled": half == "bfloat16"}, "fp16": fp16}


def trained_dtype(config: dict) -> str:
    """The dtype a DeepSpeed config trains the weights in: what the learners load them as."""
    return "bfloat16" if config["bf16"]["enabled"] else "float16" if config["fp16"]["enabled"] else "float32"


def deepspeed_config(zero_stage: int, micro_batch_size: int, grad_accum: int, grad_clip: float, lr: float,
                     weight_decay: float, dtype: str) -> dict:
    """``dtype``: ``model.dtype`` (float32, bfloat16 or float16; see ``mixed_precision``)."""
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
        **mixed_precision(dtype),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
