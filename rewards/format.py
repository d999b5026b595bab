"""r_format: does the response have the ``<think>...</think><answer>...</answer>`` shape?"""
from __future__ import annotations

import re

# End-of-turn tokens a decoder may leave in the text when special tokens are not skipped.
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>")
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")

_END = "|".join(re.escape(t) for t in END_TOKENS)
_SHAPE_RE = re.compile(
    rf"^\s*<think>.*?</think>\s*<answer>(?P<answer>.*?)</answer>\s*(?:(?:{_END})\s*)?$",
    re.DOTALL,
)


def format_reward(response: str) -> float:
    """1.0 iff ``response`` is exactly ``<think>...</think>`` then ``<answer>...</answer>``.

    Whitespace is allowed around the blocks; nothing else before ``<think>`` or after
    ``</answer>`` except one end-of-turn token (``END_TOKENS``). Each tag appears exactly once,
    so a second answer block, a nested tag or a stray ``</think>`` fails. The answer must be
    non-empty; the thinking may be empty (its length is not this reward's business).
    """
    if not response:
        return 0.0
    if any(response.count(tag) != 1 for tag in _TAGS):
        return 0.0
    m = _SHAPE_RE.match(response)
    if m is None or not m.group("answer").strip():
        return 0.0
    return 1.0
