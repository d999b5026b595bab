"""VARD step 4: turn a reasoning chain into a ``<think>...</think><answer>...</answer>`` target
and keep it only if its final answer verifies against the ground truth (pure functions)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from avar_ray.data.schema import Sample
from rewards import accuracy_reward, extract_answer, format_reward, is_correct

# "The answer is X." / "Final answer: X" as the last such statement of a chain.
_FINAL_RE = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*(.+?)\s*\.?\s*$", re.IGNORECASE | re.MULTILINE)
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_TAG_RE = re.compile(r"</?(?:think|answer)>")

# Reasons a row is dropped (counted in the run report).
NO_ANSWER = "no final answer"
WRONG_ANSWER = "answer does not verify"
BAD_FORMAT = "target format invalid"


def final_answer(chain: str) -> Optional[str]:
    """The chain's final answer: an ``<answer>`` tag or ``\\boxed{}``, else the last
    "The answer is X." statement; None when there is none."""
    tagged = extract_answer(chain or "")
    if tagged:
        return tagged
    matches = _FINAL_RE.findall(chain or "")
    answer = matches[-1].strip() if matches else ""
    return answer or None


def thinking(chain: str) -> str:
    """The reasoning text without tags (a teacher may already write ``<think>``/``<answer>``)."""
    match = _THINK_RE.search(chain or "")
    text = match.group(1) if match else (chain or "").split("<answer>")[0]
    return _TAG_RE.sub("", text).strip()


def build_target(chain: str) -> Optional[str]:
    answer = final_answer(chain)
    if answer is None:
        return None
    return f"<think>\n{thinking(chain)}\n</think>\n<answer>{_TAG_RE.sub('', answer).strip()}</answer>"


@dataclass(frozen=True)
class Verdict:
    target: Optional[str]  # the training target, when kept
    reason: str  # "" when kept, else why the row is dropped


def verify(sample: Sample, chain: str) -> Verdict:
    target = build_target(chain)
    if target is None:
        return Verdict(None, NO_ANSWER)
    if format_reward(target) != 1.0:
        return Verdict(None, BAD_FORMAT)
    r_acc = accuracy_reward(target, sample.answer, sample.answer_type, sample.choices or None, sample.precision)
    return Verdict(target, "") if is_correct(r_acc) else Verdict(None, WRONG_ANSWER)  # RL's and eval's threshold
