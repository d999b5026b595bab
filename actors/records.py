"""Plain records passed between the driver and the actors (pickled by Ray)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from avar_ray.data.schema import Sample


@dataclass
class PromptRequest:
    """One prompt of a step: ``index`` is its position in the step's batch (the GRPO group id).
    ``sample`` may be a Ray object ref of the Sample (the driver puts each prompt once per step;
    the actors fetch it from the object store, ``resolve_samples``)."""

    index: int
    sample: Any
    seed: int  # per-request sampling seed: the same rollouts whichever worker serves the prompt


@dataclass
class Rollout:
    """One sampled response, as the rollout worker produced it."""

    prompt_index: int
    sample_id: str
    response_ids: list[int]
    text: str
    logprobs: list[float]  # vLLM's log-prob of each sampled token (temperature applied)
    finish_reason: str
    policy_version: int
    prompt_ids: list[int] = field(default_factory=list)


@dataclass
class Scored:
    """The reward of one rollout and its parts (SPEC.md §5)."""

    total: float
    accuracy: float
    format: float
    visual: float  # r_visual before normalisation (0 for wrong answers unless the gate is off)
    vas: float  # response VAS of this rollout (whatever its correctness); nan if not computed
    error: str = ""  # non-empty: scoring raised, the rollout got reward 0


@dataclass
class TrainItem:
    """What a learner needs for one rollout: the conversation, the response, vLLM's view of
    both (prompt ids, sampled-token log-probs), the advantage and, once the learners' no-grad
    pass has run, the old log-probs (the behaviour policy of the PPO ratio)."""

    sample: Any  # a Sample or a Ray object ref of one (see PromptRequest)
    response_ids: list[int]
    advantage: float
    rollout_logprobs: list[float]
    prompt_ids: list[int] = field(default_factory=list)  # vLLM's; [] = not checked
    old_logprobs: Optional[list[float]] = None  # None: the update's own forward gives them (one optimizer step)
    masked_logprobs: Optional[list[float]] = None  # with the masked image (rl.perception; the score pass)
    keep: Optional[list[float]] = None  # VPPO: 1 for the tokens that get the policy gradient


@dataclass
class ScoredPass:
    """What the learners' no-grad pass gives back for one rollout."""

    old_logprobs: Optional[list[float]]  # None: not computed (the update computes them)
    vas: float  # response-span VAS (SPEC.md §5's r_visual before the gate); nan if not asked for
    error: str = ""  # non-empty: the prompt ids differed from vLLM's, or the forward raised
    masked_logprobs: Optional[list[float]] = None  # with the masked image (rl.perception); None: not computed


def conversation(sample: Sample, system_prompt: str | None = None) -> tuple[list[dict], list]:
    """Chat messages and decoded images of a sample: the one prompt the rollout worker and
    the learners both see (so their token ids agree)."""
    from avar_ray.data.schema import build_messages, pil_images

    return build_messages(sample, system_prompt=system_prompt), pil_images(sample)


def resolve_samples(samples: list) -> list[Sample]:
    """Samples from a list of Samples and/or Ray object refs of Samples (each ref fetched once)."""
    import ray

    refs = list({x.binary(): x for x in samples if isinstance(x, ray.ObjectRef)}.values())
    fetched = dict(zip((r.binary() for r in refs), ray.get(refs))) if refs else {}
    return [fetched[x.binary()] if isinstance(x, ray.ObjectRef) else x for x in samples]
