"""Stage 3: GRPO with the visual-attention reward (SPEC.md §5) on Ray actors.

    from avar_ray.rl import run_rl
    report = run_rl(cfg)            # report.final_model: HF directory of the last step

Kept import-light: the driver (``avar_ray.rl.driver``) is imported on first use.
Modules: ``driver`` (the loop, its metrics, resume), ``prompts`` (read, checked and cached once),
``pipeline`` (the seeded sampler, generation on- or off-policy), ``system`` (the actors from the
config), ``checkpoint`` (saved off the critical path, never half-written).
"""
from __future__ import annotations

__all__ = ["RLReport", "run_rl"]


def __getattr__(name: str):
    if name in __all__:
        from avar_ray.rl import driver

        return getattr(driver, name)
    raise AttributeError(f"module 'avar_ray.rl' has no attribute {name!r}")
