"""The prompts of an RL run and their generation.

Prompts: read and checked by ``avar_ray.rl.prompts`` (once, cached beside the run's output), and
a seeded sampler whose position (epoch, index) goes into every checkpoint so that
``--resume`` draws exactly the prompts the uninterrupted run would have drawn.

Generation, and asynchronous GRPO (``rl.max_staleness = k``): the rollouts of steps
``s+1 .. s+k`` are generated while the learners score and train step ``s``.

The pipeline owns every rollout-pool call of a run. With ``k = 0`` it generates each draw in
the driver's thread when the step asks for it (the on-policy loop: same draws, same seeds, same
order as before). With ``k >= 1`` generation runs in one background thread, in submission
order, on the weights the workers hold: as soon as a step's first draw is taken, the first draws
of the next ``k`` steps are drawn from the sampler and submitted. Before each weight sync the
driver waits for the generation in flight (``settle``): vLLM reloads between generate calls, and
a draw made for step ``t`` while the workers hold version ``v`` must stay at ``v`` for the run
to be a function of its seed. In the steady state step ``t`` then trains (learners at version
``t-1``) on rollouts of version ``t-1-k``: staleness ``k``; the behaviour log-probs and
``rl.tis_cap`` cover the gap (the old log-probs are the learners' own at version ``t-1``: from
the score pass, or with one optimizer step from the update's forward, before that step).
A step trains only on rollouts with ``version >= current - k`` (older ones: dropped, counted).

Checkpoints record the prompt indices of the draws in flight (not their rollouts); a resumed run
submits them again with the same request seeds, from the checkpoint's weights (so its first
``k`` steps train at staleness 0, on the same prompts).
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from actors.records import PromptRequest, Rollout
from avar_ray.data.schema import Sample


def require_system_span_for_vars(cfg, sample: Sample) -> None:
    """r_visual is V / (S + eps): with ``rl.reward.lambda_v > 0`` on a chat template that adds no
    system turn (Qwen3-VL) and no ``model.system_prompt``, S is empty and r_visual would be
    V / eps (about 1e6) on every gated rollout. Refused at start, naming the key."""
    from avar_ray.modeling import require_system_turn
    from avar_ray.modeling import load_processor

    lambda_v = cfg.rl.reward.lambda_v
    if lambda_v > 0:
        require_system_turn(load_processor(cfg.model.path, cfg.model), sample, cfg.model.system_prompt,
                            f"rl.reward.lambda_v = {lambda_v} (r_visual = V / (S + eps))", "set rl.reward.lambda_v=0")


@dataclass
class SamplerState:
    epoch: int = 0
    position: int = 0  # next index into the epoch's permutation
    drawn: int = 0  # prompts drawn so far in the run

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "drawn": self.drawn}


@dataclass
class PromptSampler:
    """Draws prompts without replacement within an epoch; each epoch is a fresh permutation
    seeded by ``(seed, epoch)``, so the sequence depends only on the seed and the position."""

    size: int
    seed: int
    state: SamplerState = field(default_factory=SamplerState)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError("PromptSampler: no prompts to draw from")
        self._perm_epoch = -1
        self._perm = np.arange(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            self._perm_epoch = epoch
        return self._perm

    def next_indices(self, k: int) -> list[int]:
        out = []
        st = self.state
        while len(out) < k:
            if st.position >= self.size:
                st.epoch, st.position = st.epoch + 1, 0
            out.append(int(self._permutation(st.epoch)[st.position]))
            st.position += 1
        st.drawn += k
        return out

    def load_state(self, state: dict) -> None:
        self.state = SamplerState(int(state["epoch"]), int(state["position"]), int(state["drawn"]))


def request_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of prompt ``index`` of ``step``: independent of which worker serves it,
    so a redone share samples the same rollouts."""
    return int(np.random.default_rng([seed, step, index]).integers(0, 2**31 - 1))


@dataclass
class Draw:
    """Prompts drawn for one step (its first draw or a refill) and, once generated, their rollouts."""

    step: int
    indices: list[int]  # into the prompt set (what a checkpoint records for a draw in flight)
    samples: list
    refs: list  # one object ref per prompt: the image bytes enter the object store once
    requests: list[PromptRequest]
    future: Optional[Future] = None  # set while generating in the background thread
    gen_s: float = 0.0  # seconds the rollout workers spent on this draw


@dataclass
class PipelineCounts:
    """What the current step waited for and dropped (reset by ``begin_step``)."""

    learner_wait: float = 0.0  # the driver (so the learners) waiting for rollouts
    dropped_stale: int = 0
    gen_s: float = 0.0
    staleness: list[int] = field(default_factory=list)


def stale(rollouts: list[Rollout], current: int, max_staleness: int) -> tuple[list[Rollout], list[Rollout]]:
    """``(kept, dropped)``: kept are the rollouts whose policy version is within ``max_staleness``
    of ``current`` (the learners' version before this step's update)."""
    kept = [r for r in rollouts if r.policy_version >= current - max_staleness]
    return kept, [r for r in rollouts if r.policy_version < current - max_staleness]


def busy_within(intervals: list[tuple[float, float]], start: float, stop: float) -> float:
    """Seconds of ``[start, stop]`` covered by the (non-overlapping) generation intervals."""
    return sum(max(0.0, min(b, stop) - max(a, start)) for a, b in intervals)


class RolloutPipeline:
    def __init__(self, cfg, system, prompts, sampler) -> None:
        import ray

        from avar_ray.rl.system import sampling_spec

        self.rl, self.system, self.prompts, self.sampler = cfg.rl, system, prompts, sampler
        self.k = cfg.rl.max_staleness
        self.spec = sampling_spec(cfg)
        self.put = ray.put
        self.pending: dict[int, Draw] = {}  # first draws of later steps, drawn (and submitted)
        self.intervals: list[tuple[float, float]] = []  # when the rollout workers were generating
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="rollouts") if self.k else None
        self.counts = PipelineCounts()

    # ------------------------------------------------------------------ drawing and generating
    def _make(self, step: int, indices: list[int], offset: int) -> Draw:
        samples = [self.prompts.samples[i] for i in indices]
        refs = [self.put(s) for s in samples]
        # seeds keyed by the position in the step's draws: a redone step samples the same
        requests = [PromptRequest(i, ref, request_seed(self.rl.seed, step, offset + i)) for i, ref in enumerate(refs)]
        return Draw(step, indices, samples, refs, requests)

    def draw(self, step: int, need: int, offset: int) -> Draw:
        """``need`` prompts from the sampler for ``step`` (``offset``: prompts the step drew before)."""
        return self._make(step, self.sampler.next_indices(need), offset)

    def _generate(self, draw: Draw) -> list[Rollout]:
        start = time.perf_counter()
        rollouts = self.system.rollout.generate(draw.requests, self.spec)
        stop = time.perf_counter()
        self.intervals.append((start, stop))
        draw.gen_s = stop - start
        return rollouts

    def _submit(self, draw: Draw) -> Draw:
        if self.executor is not None:
            draw.future = self.executor.submit(self._generate, draw)
        return draw

    def first(self, step: int, last_step: int) -> Draw:
        """The step's first draw (drawn and submitted earlier, or drawn now); then the first
        draws of steps ``step+1 .. step+k`` (up to ``last_step``) are drawn and submitted."""
        draw = self.pending.pop(step, None) or self._submit(self.draw(step, self.rl.prompts_per_step, 0))
        for ahead in range(step + 1, min(step + self.k, last_step) + 1):
            if ahead not in self.pending:
                self.pending[ahead] = self._submit(self.draw(ahead, self.rl.prompts_per_step, 0))
        return draw

    def rollouts(self, draw: Draw, current: int) -> tuple[list[Rollout], int]:
        """The draw's rollouts within the staleness bound (waiting for them, or generating them
        now), and how many of its prompts got rollouts (before the bound was applied)."""
        start = time.perf_counter()
        if draw.future is None and self.executor is not None:
            self._submit(draw)  # a refill: behind what is in flight, in the same order
        got = draw.future.result() if draw.future is not None else self._generate(draw)
        self.counts.learner_wait += time.perf_counter() - start
        self.counts.gen_s += draw.gen_s
        kept, dropped = stale(got, current, self.k)
        self.counts.dropped_stale += len(dropped)
        self.counts.staleness.extend(current - r.policy_version for r in kept)
        return kept, len({r.prompt_index for r in got})

    def settle(self) -> None:
        """Wait for the generation in flight (before a weight sync: see the module docstring)."""
        start = time.perf_counter()
        for draw in self.pending.values():
            if draw.future is not None:
                draw.future.result()
        self.counts.learner_wait += time.perf_counter() - start

    # ------------------------------------------------------------------ per step
    def begin_step(self) -> None:
        self.counts = PipelineCounts()

    def metrics(self, step_start: float) -> dict:
        now = time.perf_counter()
        self.intervals = [iv for iv in self.intervals if iv[1] > step_start]
        s = self.counts.staleness
        return {"async/max_staleness": self.k, "async/staleness_mean": sum(s) / len(s) if s else 0.0,
                "async/staleness_max": max(s, default=0), "async/dropped_stale": self.counts.dropped_stale,
                "async/in_flight": len(self.pending), "time/learner_wait": self.counts.learner_wait,
                "time/rollout_wait": max(0.0, (now - step_start) - busy_within(self.intervals, step_start, now)),
                "time/generate": self.counts.gen_s}

    # ------------------------------------------------------------------ checkpoint and resume
    def state(self) -> dict:
        """The draws in flight: their steps and prompt indices (the rollouts are not saved)."""
        return {str(step): list(d.indices) for step, d in sorted(self.pending.items())}

    def restore(self, in_flight: dict) -> None:
        """Submit again the draws a checkpoint had in flight (same prompts, same request seeds)."""
        for step, indices in sorted((int(s), i) for s, i in in_flight.items()):
            self.pending[step] = self._submit(self._make(step, [int(i) for i in indices], 0))

    def discard(self) -> None:
        """Forget the draws in flight (after a learner restart the run goes back to a checkpoint,
        whose record of them is submitted again), once the workers are done with them."""
        self.settle()
        self.pending.clear()

    def shutdown(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
