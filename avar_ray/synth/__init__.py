"""Stage 1: VARD visual-anchoring data synthesis on Ray Data (SPEC.md §3).

    from avar_ray.synth import run_synthesis
    report = run_synthesis(cfg)          # cfg.synth: input, out, caption/reasoning/anchor teachers

Modules: ``pipeline`` (driver), ``stages`` (Ray Data stages; which teacher a step gets),
``steps`` (per-row step logic), ``teachers`` (the request/answer types every teacher shares),
``vllm_teacher`` / ``openai_client`` (the model teachers), ``anchors`` (rule-based anchors),
``verify`` (targets and answer checks), ``shards`` (atomic output and resume), ``prompts``
(versioned prompt files).
"""
from avar_ray.synth.pipeline import SynthReport, run_synthesis
from avar_ray.synth.shards import TRAIN_SCHEMA, committed_shards

__all__ = ["SynthReport", "TRAIN_SCHEMA", "committed_shards", "run_synthesis"]
