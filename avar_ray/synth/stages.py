"""Ray Data stages of the synthesis pipeline.

Consecutive steps that share a teacher (the oracle, one vLLM model, one endpoint) run in one
actor-pool stage, so a vLLM engine serving both the caption and the anchor step starts once
per actor; different teachers get their own stages and Ray Data pipelines them. Answer
verification is a stateless task stage at the end.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pyarrow as pa

from avar_ray.data.schema import from_row
from avar_ray.synth.openai_client import OpenAITeacher, Secret
from avar_ray.synth.prompts import Prompt
from avar_ray.synth.steps import DROPPED, KEPT, QUARANTINED, ROW_SCHEMA, STEPS, run_step
from avar_ray.synth.teachers import Teacher
from avar_ray.synth.verify import verify


def make_teacher(cfg, api_key=None) -> Teacher:
    """A model teacher from a TeacherConfig of kind ``vllm`` or ``openai``."""
    if cfg.kind == "vllm":
        from avar_ray.synth.vllm_teacher import VLLMTeacher  # vLLM only where a stage needs it

        return VLLMTeacher(cfg)
    if cfg.kind == "openai":
        return OpenAITeacher(cfg, api_key)
    raise ValueError(f"no model teacher of kind {cfg.kind!r}")


def teacher_identity(tcfg) -> tuple:
    """Steps with equal identities can share one teacher instance."""
    if tcfg.kind == "oracle":
        return ("oracle",)
    if tcfg.kind == "vllm":
        return ("vllm", tcfg.model, tcfg.dtype, tcfg.max_model_len, tcfg.enforce_eager)
    return ("openai", tcfg.base_url, tcfg.model, tcfg.api_key_env)


@dataclass
class StagePlan:
    steps: tuple[str, ...]
    teacher: object  # the TeacherConfig of the stage's first step (same identity for all)


def step_teachers(synth_cfg) -> dict:
    """step name -> its TeacherConfig."""
    return {"caption": synth_cfg.caption, "reasoning": synth_cfg.reasoning, "anchor": synth_cfg.anchor}


def plan_stages(synth_cfg) -> list[StagePlan]:
    plans: list[StagePlan] = []
    teachers = step_teachers(synth_cfg)
    for step in STEPS:
        tcfg = teachers[step]
        if plans and teacher_identity(plans[-1].teacher) == teacher_identity(tcfg):
            plans[-1].steps += (step,)
        else:
            plans.append(StagePlan((step,), tcfg))
    return plans


class StepRunner:
    """Ray Data callable class: owns the stage's teacher and runs its steps on a batch."""

    def __init__(self, steps: tuple[str, ...], teachers: dict, prompts: dict[str, Optional[Prompt]],
                 positions: list[float], seed: int, api_key: Optional[Secret] = None) -> None:
        self.steps, self.teachers, self.prompts = steps, teachers, prompts
        self.positions, self.seed = positions, seed
        first = teachers[steps[0]]
        self.teacher = None if first.kind == "oracle" else make_teacher(first, api_key)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        for step in self.steps:
            run_step(step, rows, self.teacher, self.prompts[step], self.teachers[step], self.positions, self.seed)
        return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def verify_batch(batch: pa.Table) -> pa.Table:
    """VARD step 4: keep a row only if its chain's final answer verifies."""
    rows = batch.to_pylist()
    for row in rows:
        if row["status"] == QUARANTINED:
            continue
        verdict = verify(from_row(row), row["chain"])
        if verdict.target is None:
            row.update(status=DROPPED, reason=verdict.reason)
        else:
            row.update(status=KEPT, target=verdict.target)
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
