"""The VARD steps on a list of pipeline rows: caption, caption-grounded reasoning, anchoring.

A pipeline row is the sample's Parquet row (``schema.to_row``) plus the step outputs and a
status. A row that fails (a bad image, a teacher error, no oracle text for a non-procedural
sample) is marked quarantined with its reason and skipped by later steps.
"""
from __future__ import annotations

import json
import re
from typing import Optional, Sequence

import pyarrow as pa

from avar_ray.data.captions import anchor_phrases, oracle_reasoning
from avar_ray.data.schema import PARQUET_SCHEMA, ImageDecodeError, Sample, format_question, from_row, letter
from avar_ray.synth.anchors import caption_anchor_phrases, has_anchor, insert_anchors
from avar_ray.synth.prompts import Prompt
from avar_ray.synth.teachers import ChatRequest, Teacher, TeacherError, row_seed, user_message
from avar_ray.synth.verify import final_answer

STEPS = ("caption", "reasoning", "anchor")
# Columns the steps add to a sample row while it moves through the pipeline.
WORK_COLUMNS = ("caption", "reasoning", "chain", "anchor_mode", "target", "status", "reason", "detail", "failed_step")
ROW_SCHEMA = pa.schema(list(PARQUET_SCHEMA) + [(c, pa.string()) for c in WORK_COLUMNS])
QUARANTINED, DROPPED, KEPT = "quarantined", "dropped", "kept"

# The closing sentences of the data layer's oracle chain for a choice question: the label's
# letter beside the option text the chain read off the scene graph.
_ORACLE_CHOICE = re.compile(r"That matches option ([A-Z]) \((.*)\)\. The answer is \1\.$")

_ANSWER_HINTS = {"choice": " (the letter of the correct option)", "integer": " (an integer)",
                 "float": " (a number)", "text": ""}


def new_row(sample_row: dict) -> dict:
    return {**sample_row, **{c: "" for c in WORK_COLUMNS}}


def quarantine(row: dict, step: str, reason: str, detail: str = "") -> None:
    row.update(status=QUARANTINED, failed_step=step, reason=reason, detail=detail[:500])


# ---------------------------------------------------------------- oracle (procedural data)
def _procedural(sample: Sample) -> bool:
    return all(k in sample.meta for k in ("task", "scene", "target"))


def oracle_chain(sample: Sample) -> str:
    """The templated reasoning, answering with the option the scene graph supports rather than
    the label's letter, so that a mislabelled choice row fails verification instead of training
    on a chain that contradicts itself. (Numeric answers are still taken from the label.)"""
    chain = oracle_reasoning(sample)
    match = _ORACLE_CHOICE.search(chain)
    if match and match.group(2) in sample.choices:
        read = letter(sample.choices.index(match.group(2)))
        chain = chain[:match.start()] + f"That matches option {read} ({match.group(2)}). The answer is {read}."
    return chain


def oracle_output(step: str, sample: Sample, row: dict) -> str:
    """The scene-graph caption / templated reasoning of a procedural sample."""
    if step == "caption":
        if not sample.meta.get("caption"):
            raise TeacherError("oracle unavailable", "the sample has no meta.caption (not procedural data)")
        return str(sample.meta["caption"])
    if step == "reasoning":
        if not _procedural(sample):
            raise TeacherError("oracle unavailable", "the sample has no scene graph (not procedural data)")
        return oracle_chain(sample)
    raise ValueError(f"no oracle output for step {step!r}")


def rule_anchors(sample: Sample, caption: str, chain: str, positions: Sequence[float]) -> str:
    """Anchors at ``positions``: scene-graph phrases for procedural data, else caption elements."""
    phrases = anchor_phrases(sample) if _procedural(sample) else caption_anchor_phrases(caption)
    return insert_anchors(chain, phrases, positions, seed_key=sample.id)


# ---------------------------------------------------------------- model teachers
def build_request(step: str, sample: Sample, row: dict, prompt: Prompt, tcfg, seed: int) -> ChatRequest:
    """The chat request of one row; the caption step sends the images (ImageDecodeError if bad)."""
    question = format_question(sample)
    if step == "caption":
        messages = user_message(prompt.render(question=question), sample.images)
    elif step == "reasoning":
        messages = user_message(prompt.render(question=question, caption=row["caption"],
                                              answer_hint=_ANSWER_HINTS[sample.answer_type]))
    else:
        messages = user_message(prompt.render(question=question, caption=row["caption"], reasoning=row["reasoning"]))
    return ChatRequest(messages, tcfg.max_tokens, tcfg.temperature, row_seed(sample.id, seed, step))


def accept(step: str, sample: Sample, row: dict, text: str, positions: Sequence[float]) -> None:
    """Store a step's output; the anchor step falls back to rule-based anchors when the
    teacher's chain lost the final answer or names nothing in the image."""
    text = (text or "").strip()
    if step == "anchor":
        if text and has_anchor(text) and final_answer(text) == final_answer(row["reasoning"]):
            row.update(chain=text, anchor_mode="teacher")
        else:
            row.update(chain=rule_anchors(sample, row["caption"], row["reasoning"], positions),
                       anchor_mode="rule-fallback")
        return
    if not text:
        quarantine(row, step, "empty teacher output")
        return
    row[step] = text


def run_step(step: str, rows: list[dict], teacher: Optional[Teacher], prompt: Optional[Prompt], tcfg,
             positions: Sequence[float], seed: int) -> None:
    """One step over the rows still active; ``teacher`` None means the oracle."""
    active = [(r, from_row(r)) for r in rows if r["status"] != QUARANTINED]
    if teacher is None:
        for row, sample in active:
            if step == "anchor":
                row.update(chain=rule_anchors(sample, row["caption"], row["reasoning"], positions), anchor_mode="rule")
                continue
            try:
                accept(step, sample, row, oracle_output(step, sample, row), positions)
            except TeacherError as exc:
                quarantine(row, step, exc.reason, exc.detail)
        return
    pending, requests = [], []
    for row, sample in active:
        try:
            requests.append(build_request(step, sample, row, prompt, tcfg, seed))
            pending.append((row, sample))
        except ImageDecodeError as exc:
            quarantine(row, step, "bad image", str(exc))
    for (row, sample), result in zip(pending, teacher.complete(requests)):
        if isinstance(result, TeacherError):
            quarantine(row, step, result.reason, result.detail)
        else:
            accept(step, sample, row, result, positions)


def provenance(teacher_names: dict, prompt_versions: dict) -> tuple[str, str]:
    return json.dumps(teacher_names, sort_keys=True), json.dumps(prompt_versions, sort_keys=True)
