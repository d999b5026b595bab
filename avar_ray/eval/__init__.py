"""Evaluation (accuracy + VAS per benchmark, intervention on/off, report with figures) and the
analysis across checkpoints.

    from avar_ray.eval import run_eval, run_analyze

    results = run_eval("runs/sft/final", ["mathvista.json"], "runs/eval/sft", cfg, label="cold start")
    summary = run_analyze(["runs/eval/base", "runs/eval/sft", "runs/eval/rl"], "runs/analysis")

Imports are lazy: ``run_analyze`` needs neither torch nor vLLM.
"""
from __future__ import annotations

from typing import Any

__all__ = ["run_analyze", "run_eval"]


def __getattr__(name: str) -> Any:
    if name == "run_eval":
        from avar_ray.eval.runner import run_eval

        return run_eval
    if name == "run_analyze":
        from avar_ray.eval.analyze import run_analyze

        return run_analyze
    raise AttributeError(f"module 'avar_ray.eval' has no attribute {name!r}")
