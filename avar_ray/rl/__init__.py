"""Stage 3: GRPO with the visual-attention reward (SPEC.md §5) on Ray actors.

Kept import-light: ``avar_ray.rl.grpo`` (the maths, used by the learners too) must import
without Ray or vLLM. The loop is ``avar_ray.rl.driver.run_rl``.
"""
