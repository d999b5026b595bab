"""Stage 2: cold-start SFT with AGTO on Ray Train + DeepSpeed (SPEC.md §4).

    from avar_ray.sft import run_sft
    report = run_sft(cfg)        # cfg.sft: data, out, alpha, beta, zero_stage, ...

Modules: ``trainer`` (driver: data preparation, TorchTrainer), ``loop`` (the worker loop),
``data`` (training rows → model inputs with the loss masked to the assistant turn),
``ds_config`` (DeepSpeed config, step arithmetic). The HF export is ``avar_ray.modeling.export_hf``
(shared with the RL learners); metrics go through ``avar_ray.tracking``.
"""
from avar_ray.sft.trainer import SFTReport, run_sft

__all__ = ["SFTReport", "run_sft"]
