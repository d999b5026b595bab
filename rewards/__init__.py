"""Rewards for VARS (SPEC.md §5): accuracy, format, visual-attention ratio, and their sum.

Pure functions at the bottom of the import graph: stdlib, numpy and math_verify only
(nothing from avar_ray or actors), safe to call from Ray actor threads.
"""
from .accuracy import (
    ANSWER_TYPES,
    accuracy_reward,
    numbers_match,
    parse_number,
    score_choice,
    score_numeric,
    score_text,
    verify_math,
)
from .accuracy import extract_answer, extract_choice
from .combine import (CORRECT_THRESHOLD, END_TOKENS, VISUAL_NORMS, VisualNorm, combine_rewards, format_reward,
                      is_correct, normalise_visual, visual_ratio)

__all__ = [
    "ANSWER_TYPES",
    "END_TOKENS",
    "VISUAL_NORMS",
    "CORRECT_THRESHOLD",
    "VisualNorm",
    "accuracy_reward",
    "combine_rewards",
    "extract_answer",
    "extract_choice",
    "format_reward",
    "is_correct",
    "normalise_visual",
    "numbers_match",
    "parse_number",
    "score_choice",
    "score_numeric",
    "score_text",
    "verify_math",
    "visual_ratio",
]
