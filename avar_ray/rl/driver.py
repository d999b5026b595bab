"""The RL driver: ``run_rl(cfg)`` runs GRPO with the visual-attention reward (SPEC.md §5).

Each step: draw prompts (seeded; the position is checkpointed) -> n rollouts per prompt on
the vLLM workers -> the text rewards (reward actor) -> the learners' no-grad pass (r_visual
from the attention statistics of the rollouts the gate lets through, when ``lambda_v > 0``; the
old log-probs of every rollout only with several optimizer steps per update, else the update's
own forward gives them; every prompt's ids checked against vLLM's) -> the combined reward
(reward actor) -> [dynamic sampling: drop equal-reward groups, draw more] -> group advantages
(``avar_ray.grpo``) -> the learners' DeepSpeed update -> weight sync to the rollout workers ->
metrics -> a checkpoint every ``rl.save_every`` steps and at the last one (written while the next
step generates: ``avar_ray.rl.checkpoint.Saver``).
With ``rl.max_staleness = k >= 1`` the rollouts of the next k steps are generated meanwhile
(``avar_ray.rl.pipeline``). Outputs under ``rl.out``: ``metrics.jsonl``,
``tensorboard/``, ``checkpoints/step_N/`` (DeepSpeed + ``hf/``) and ``rl_report.json``.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from actors.records import Rollout, Scored, TrainItem
from actors.reward_pool import VERIFY_TIMEOUT
from avar_ray.checkpoints import start_step
from avar_ray.config import TrackingConfig, to_dict
from avar_ray.grpo import grpo_advantages, informative_groups
from avar_ray.rl import checkpoint
from avar_ray.rl.heldout import HeldOut, due
from avar_ray.rl.pipeline import PromptSampler, RolloutPipeline, SamplerState, require_system_span_for_vars
from avar_ray.rl.prompts import load_prompts
from avar_ray.tracking import METRICS, Tracker, read_metrics

# ---- per-step metrics: the reward parts, accuracy, the responses' VAS and lengths (a pure summary
# of the step's rollouts), the learners' statistics and the phase timings, written through the
# tracker (``avar_ray.tracking``: metrics.jsonl, TensorBoard, W&B, MLflow) and as a progress line.

# The phases of a step, in order (the keys "time/<phase>" of every record).
PHASES = ("sample", "rollout", "reward", "advantage", "update", "weight_sync", "eval", "checkpoint")


def _mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def rollout_metrics(rollouts: Sequence[Rollout], scored: Sequence[Scored], advantages: Sequence[float]) -> dict:
    """What the step's rollouts and rewards say (no Ray, no model): means over rollouts."""
    lengths = [len(r.response_ids) for r in rollouts]
    versions = [r.policy_version for r in rollouts]
    return {
        "reward/total": _mean(s.total for s in scored),
        "reward/accuracy": _mean(s.accuracy for s in scored),
        "reward/format": _mean(s.format for s in scored),
        "reward/visual": _mean(s.visual for s in scored),
        "reward/errors": sum(1 for s in scored if s.error),
        "reward/verify_timeouts": sum(1 for s in scored if s.error.startswith(VERIFY_TIMEOUT)),
        "vas/response": _mean(s.vas for s in scored),  # every rollout, correct or not
        "response/length_mean": _mean(lengths),
        "response/length_max": max(lengths, default=0),
        "response/clipped": _mean(1.0 if r.finish_reason == "length" else 0.0 for r in rollouts),
        # the behaviour policy's (vLLM's) mean log-prob per sampled token
        "rollout/logprob_mean": _mean(lp for r in rollouts for lp in r.logprobs),
        "advantage/abs_mean": _mean(abs(a) for a in advantages),
        "rollout/count": len(rollouts),
        "rollout/policy_version_min": min(versions, default=-1),
        "rollout/policy_version_max": max(versions, default=-1),
    }


class MetricsWriter(Tracker):
    """The RL step metrics through the one tracker (``metrics.jsonl`` always, plus the
    backends of ``tracking``) and a tqdm bar. A
    resumed run keeps the records up to its checkpoint's step and drops any written after it
    (they are redone)."""

    def __init__(self, out: Path, total_steps: int, start_step: int,
                 tracking: Optional[TrackingConfig] = None, run_config: Optional[dict] = None) -> None:
        tracking = tracking if tracking is not None else TrackingConfig()
        super().__init__(tracking, out, "rl", run_config, start_step, total_steps, progress_line, always=("jsonl",))
        self.path = Path(out) / METRICS


def progress_line(record: dict) -> str:
    def f(key: str, fmt: str = ".3g") -> str:
        value = record.get(key)
        return "n/a" if value is None else format(value, fmt)

    return (f"reward {f('reward/total')} acc {f('reward/accuracy', '.2f')} vas {f('vas/response')} "
            f"len {f('response/length_mean', '.1f')} step {f('time/step', '.1f')}s")


# Called with (step, phase) as each phase of a step begins (progress displays, tests).
PhaseHook = Callable[[int, str], None]


@dataclass
class RLReport:
    out: str
    steps: int = 0  # the last step done (the run's step count)
    start_step: int = 0  # 0, or the checkpoint step a resumed run continued from
    final_model: str = ""  # HF export of the last step (evaluate this)
    metrics_path: str = ""
    prompts: int = 0
    prompts_s: float = 0.0  # reading and checking them (a cache hit: reading only)
    prompt_cache: str = ""  # "hit", "miss" or "off" (avar_ray.rl.prompts)
    seconds: float = 0.0
    start_s: float = 0.0  # actor start-up
    restarts: dict = field(default_factory=dict)
    placement: dict = field(default_factory=dict)  # role -> each actor's node, GPU ids, CUDA (RLSystem.placement)
    first: dict = field(default_factory=dict)  # metrics of this run's first step
    last: dict = field(default_factory=dict)

    def summary(self) -> str:
        changes = ", ".join(f"{label} {_fmt(self.first.get(key))} -> {_fmt(self.last.get(key))}"
                            for label, key in SUMMARY_KEYS)
        return (f"rl: steps {self.start_step}->{self.steps} in {self.seconds:.1f}s (actors started in "
                f"{self.start_s:.1f}s, restarts {self.restarts}); {changes}; metrics {self.metrics_path}; "
                f"final model {self.final_model}")


SUMMARY_KEYS = (("reward", "reward/total"), ("accuracy", "reward/accuracy"), ("response VAS", "vas/response"))


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def visual_wanted(text: list[tuple[float, float, str]], reward) -> list[bool]:
    """The rollouts whose attention statistics the learners compute: those SPEC.md §5's gate lets
    through, when r_visual can change a reward (``reward.lambda_v > 0``); with one optimizer step
    per update the learners' no-grad pass runs on these alone (``LearnerGroup.score``)."""
    from actors.reward import needs_visual

    return needs_visual(text, reward.visual_gate) if reward.lambda_v > 0 else [False] * len(text)


class PhaseClock:
    """Seconds per phase of one step; calls the hook as each phase begins."""

    def __init__(self, step: int, hook: Optional[PhaseHook]) -> None:
        self.step, self.hook = step, hook
        self.seconds = {f"time/{p}": 0.0 for p in PHASES}
        self.start = time.perf_counter()

    @contextmanager
    def phase(self, name: str, announce: bool = True):
        if announce and self.hook is not None:
            self.hook(self.step, name)
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[f"time/{name}"] += time.perf_counter() - t

    def total(self) -> dict:
        return {**self.seconds, "time/step": time.perf_counter() - self.start}


class Run:
    """One run's state between steps: the actors, the prompt sampler, the policy version."""

    def __init__(self, cfg, system, prompts, sampler: PromptSampler, out: Path, hook: Optional[PhaseHook]) -> None:
        self.cfg, self.system, self.prompts, self.sampler = cfg, system, prompts, sampler
        self.out, self.hook = out, hook
        self.ckpt_dir = out / "checkpoints"
        self.saver = checkpoint.Saver(self.ckpt_dir, cfg.rl.keep_checkpoints, cfg.rl.save_async)
        self.version = 0  # the policy version the rollout workers hold (0: the starting checkpoint)
        self.drawn: list = []  # the prompts drawn in the current step (refills included)
        self.pipeline = RolloutPipeline(cfg, system, prompts, sampler)
        self.heldout: Optional[HeldOut] = None  # the held-out curve (rl.eval_every), set by run_rl

    def state(self, step: int) -> dict:
        return {"step": step, "policy_version": self.version, "sampler": self.sampler.state.to_dict(),
                "seed": self.cfg.rl.seed, "prompts": len(self.prompts.samples), "in_flight": self.pipeline.state()}

    @contextmanager
    def learner_calls(self):
        """Around each learner call of this (the driver's main) thread: the checkpoint in flight
        is committed first (its save is queued before the call on every rank anyway), then the
        lock is held under which a rollout worker restarted by the background generation
        publishes the weights from the learners, never in the middle of a train or score call
        (``actors.recovery``)."""
        self.saver.finish()
        with self.system.rollout.handle_lock:
            yield

    def save(self, step: int) -> None:
        """Step ``step``'s checkpoint, submitted to the learners (``checkpoint.Saver``)."""
        with self.learner_calls():
            self.saver.start(checkpoint.learner_submit(self.system.learners), step, self.state(step),
                             checkpoint.hf_due(step, self.cfg.rl))

    def restore(self, step: int) -> None:
        with self.learner_calls():
            state = self.system.learners.load_checkpoint(str(self.ckpt_dir), checkpoint.tag(step))
        if state.get("prompts") != len(self.prompts.samples) or state.get("seed") != self.cfg.rl.seed:
            raise ValueError(f"rl resume: the checkpoint of step {step} drew from {state.get('prompts')} prompts with "
                             f"seed {state.get('seed')}, this run has {len(self.prompts.samples)} with seed "
                             f"{self.cfg.rl.seed}; the data position would not carry over (data.train, rl.seed)")
        self.sampler.load_state(state["sampler"])
        self.version = int(state["policy_version"])
        with self.learner_calls():
            self.system.sync_weights(self.version)  # the workers started from model.path
        self.pipeline.restore(state.get("in_flight", {}))  # regenerated from the same prompts and seeds

    def recover_learners(self) -> int:
        """After a learner rank died: a new learner group from the newest checkpoint (the start
        when there is none yet); returns the step it holds (the run goes on after it)."""
        self.saver.abandon()  # its ranks are gone: the .partial folder stays, unread
        self.pipeline.discard()
        with self.learner_calls():
            self.system.restart_learners()
        saved = checkpoint.latest_step(self.ckpt_dir)
        if self.heldout is not None:
            self.heldout.rewind(saved or 0)
        if saved is not None:
            self.restore(saved)
            return saved
        self.sampler.load_state(SamplerState().to_dict())
        self.version = 0
        with self.learner_calls():
            self.system.sync_weights(0)  # the workers hold later weights: back to model.path's
        return 0

    def _collect(self, step: int, clock: "PhaseClock") -> tuple[list, list, list, list, dict]:
        """Rollouts, rewards and the learners' pass for the step's prompts: ``(batch, rollouts,
        scored, passes, counts)``, ``batch`` holding ``(sample, object ref)`` per kept prompt. With ``rl.dynamic_sampling`` groups whose rewards are all
        equal are dropped and more prompts drawn, up to ``rl.dynamic_sampling_max_refills``
        times (DAPO); ``prompt_index`` is then renumbered over the kept groups."""
        rl, system = self.cfg.rl, self.system
        batch, rollouts, scored, passes = [], [], [], []
        counts = {"dynamic/dropped_groups": 0, "dynamic/refills": 0, "rollout/failed_prompts": 0, "data/image_bytes": 0,
                  "learner/prompt_mismatch": 0, "learner/visual_stats_rollouts": 0, "learner/score_rollouts": 0}
        learner_metrics: dict = {}
        draws = 1 + (rl.dynamic_sampling_max_refills if rl.dynamic_sampling else 0)
        for draw in range(draws):
            need = rl.prompts_per_step - len(batch)
            if need <= 0:
                break
            counts["dynamic/refills"] += int(draw > 0)
            with clock.phase("sample"):
                # Data plane: each prompt (its image bytes) enters the object store once per step;
                # the rollout workers and learners get refs, the reward actor the text fields only.
                d = (self.pipeline.first(step, rl.steps) if draw == 0
                     else self.pipeline.draw(step, need, len(self.drawn)))
                drawn, refs = d.samples, d.refs
                self.drawn.extend(drawn)
                counts["data/image_bytes"] += sum(len(b) for s in drawn for b in s.images)
            with clock.phase("rollout"):
                got, served = self.pipeline.rollouts(d, self.version)
            counts["rollout/failed_prompts"] += len(drawn) - served
            with clock.phase("reward"):
                text = system.reward.text(got, {s.id: replace(s, images=[]) for s in drawn})
                items = [TrainItem(refs[r.prompt_index], r.response_ids, 0.0, r.logprobs, r.prompt_ids) for r in got]
                want = visual_wanted(text, rl.reward)
            with clock.phase("checkpoint", announce=False):  # the previous step's save, if it outlasted the above
                self.saver.finish()
            with clock.phase("reward", announce=False):
                with self.learner_calls():
                    got_passes, learner_metrics = system.learners.score(items, want, step=step) if items else ([], {})
                got_scored = system.reward.combine(got, text, [p.vas for p in got_passes],
                                                   [p.error for p in got_passes])
            for key in ("learner/prompt_mismatch", "learner/visual_stats_rollouts", "learner/score_rollouts"):
                counts[key] += learner_metrics.get(key, 0)
            groups = sorted({r.prompt_index for r in got})
            if rl.dynamic_sampling:
                keep = set(informative_groups(np.array([s.total for s in got_scored]),
                                              np.array([r.prompt_index for r in got])).tolist())
                counts["dynamic/dropped_groups"] += len(groups) - len(keep)
                groups = [g for g in groups if g in keep][:need]
            renumber = {g: len(batch) + k for k, g in enumerate(groups)}
            batch.extend((drawn[g], refs[g]) for g in groups)
            for r, sc, ps in zip(got, got_scored, got_passes):
                if r.prompt_index in renumber:
                    r.prompt_index = renumber[r.prompt_index]
                    rollouts.append(r)
                    scored.append(sc)
                    passes.append(ps)
        for key in ("actor/logprob_diff_max", "actor/logprob_diff_mean", "time/old_logprob_forward"):
            if key in learner_metrics:
                counts[key] = learner_metrics[key]
        return batch, rollouts, scored, passes, counts

    def step(self, step: int) -> dict:
        rl, system = self.cfg.rl, self.system
        clock = PhaseClock(step, self.hook)
        self.drawn = []
        self.pipeline.begin_step()
        batch, rollouts, scored, passes, counts = self._collect(step, clock)
        with clock.phase("advantage"):
            advantages = grpo_advantages(np.array([s.total for s in scored]),
                                         np.array([r.prompt_index for r in rollouts]),
                                         norm_by_std=rl.norm_adv_by_std) if rollouts else np.zeros(0)
            items = [TrainItem(batch[r.prompt_index][1], r.response_ids, float(a), r.logprobs, r.prompt_ids,
                               p.old_logprobs, p.masked_logprobs) for r, a, p in zip(rollouts, advantages, passes)]
        learner = {}
        with clock.phase("update"), self.learner_calls():
            if len(items) >= rl.placement.learners * rl.mini_batches:
                learner = system.learners.train_step(items, step)
            else:  # nothing (or too little) with a GRPO signal: no update this step
                print(f"rl: step {step}: {len(items)} rollouts left to train on; update skipped", flush=True)
            self.version = step
            # What the learners hold from now on: a worker restarted before the sync gets these weights
            # under this version (the generation in flight must not get them labelled as the old one).
            system.weights.version = step
        counts["actor/update_skipped"] = int(not learner)
        with clock.phase("rollout", announce=False):  # the step's rollout phase began earlier
            self.pipeline.settle()  # the generation in flight ends on the weights it began with
        with clock.phase("weight_sync"), self.learner_calls():
            sync = system.sync_weights(self.version)
        evaluation = {}
        if self.heldout is not None and due(step, rl.eval_every, rl.steps):
            with clock.phase("eval"):  # on the weights just synced; nothing is generating meanwhile
                evaluation = self.heldout.evaluate(step, self.version)
        with clock.phase("checkpoint"):
            if checkpoint.due(step, rl):
                self.save(step)
                if step == rl.steps:  # nothing left to overlap it with
                    self.saver.finish()
        timing = clock.total()
        pipeline = self.pipeline.metrics(clock.start)
        tokens = sum(len(r.response_ids) for r in rollouts)
        return {**rollout_metrics(rollouts, scored, advantages), **counts, **learner, **sync, **system.restarts(),
                **evaluation, **timing, **pipeline, "policy_version": self.version,
                "rollout/tokens_per_s": tokens / max(pipeline["time/generate"], 1e-9),
                "data/epoch": self.sampler.state.epoch, "data/position": self.sampler.state.position,
                "data/prompt_ids": [s.id for s in self.drawn], "data/filtered": self.prompts.filtered}


def finished_report(out: Path, step: int, rl) -> RLReport:
    """A run whose newest checkpoint (saved whole) is at or past ``rl.steps``: said, not redone."""
    final = checkpoint.hf_dir(out / "checkpoints", step)
    report = RLReport(out=str(out), steps=step, start_step=step, final_model=str(final) if final.is_dir() else "",
                      metrics_path=str(out / METRICS))
    records = read_metrics(out / METRICS) if (out / METRICS).is_file() else []
    if records:
        report.first, report.last = records[0], records[-1]
    print(f"rl: {out} is complete: its checkpoint of step {step} is saved and exported (rl.steps={rl.steps}); "
          "nothing to do", flush=True)
    return report


def run_rl(cfg, resume: bool = False, on_phase: Optional[PhaseHook] = None) -> RLReport:
    """GRPO steps ``start+1 .. cfg.rl.steps`` (``start``: the newest checkpoint unless
    ``rl.resume`` is false; ``resume=True``: as ``rl.resume=true``). A run already complete
    returns at once. A learner rank that dies restarts the learner group from the newest
    checkpoint and the steps since are redone (at most ``rl.placement.max_restarts`` times).

    Uses the Ray it finds initialised (tests, ``avar demo``), else starts one from ``cfg.ray``.
    """
    import ray

    from avar_ray.ray_utils import init_ray
    from avar_ray.rl.system import RLSystem

    rl = cfg.rl
    out = Path(rl.out).resolve()
    mode = True if resume else rl.resume
    done = checkpoint.finished(out / "checkpoints", rl.steps) if mode is not False else None
    if done is not None:
        return finished_report(out, done, rl)
    if not Path(cfg.model.path).is_dir():
        raise FileNotFoundError(f"model.path: no model directory at {cfg.model.path}")
    start = start_step(out / "checkpoints", mode, "rl", "resume it with `avar rl --resume` (rl.resume=true or auto)")
    prompts = load_prompts(cfg, out / "prompt_cache")
    require_system_span_for_vars(cfg, prompts.samples[0])
    print(f"rl: {prompts.summary()}; steps {start + 1}..{rl.steps}, {rl.prompts_per_step} prompts x "
          f"{rl.n_samples} rollouts per step", flush=True)
    if not ray.is_initialized():
        init_ray(cfg.ray)
    import verl.trainer.ppo.core_algos  # noqa: F401 - a 2-3 s import: not inside step 1's timings
    t0 = time.perf_counter()
    system = RLSystem(cfg, cfg.model.path)
    print(f"rl: actors up in {system.start_s:.1f}s ({rl.placement.rollout_workers} rollout workers, "
          f"{rl.placement.learners} learners, 1 reward actor)", flush=True)
    report = RLReport(out=str(out), start_step=start, prompts=len(prompts.samples), start_s=system.start_s,
                      metrics_path=str(out / "metrics.jsonl"), prompts_s=prompts.check_s, prompt_cache=prompts.cache,
                      placement=system.placement())
    writer = run = None
    try:
        run = Run(cfg, system, prompts, PromptSampler(len(prompts.samples), rl.seed), out, on_phase)
        if start:
            run.restore(start)
        if rl.eval_every:
            run.heldout = HeldOut(cfg, system, out, start)
            if start == 0:
                run.heldout.evaluate(0, 0)  # the curve's first point: the starting policy
        writer = MetricsWriter(out, rl.steps, start, tracking=cfg.tracking, run_config=to_dict(cfg))
        step = start + 1
        while step <= rl.steps:
            try:
                record = run.step(step)
            except Exception as exc:  # noqa: BLE001 - re-raised unless a learner died
                if not system.learner_died(exc) or system.learner_restarts >= rl.placement.max_restarts:
                    raise
                print(f"rl: step {step}: a learner died ({type(exc).__name__}); restarting the learner group "
                      "from the newest checkpoint", flush=True)
                at = run.recover_learners()
                print(f"rl: learners restarted at step {at}; redoing steps {at + 1}..{step}", flush=True)
                writer.close()  # the records after the checkpoint go: those steps are redone
                writer = MetricsWriter(out, rl.steps, at, tracking=cfg.tracking, run_config=to_dict(cfg))
                step = at + 1
                continue
            writer.log(step, record)
            report.steps = step
            step += 1
        if start >= rl.steps:  # the last step's checkpoint has no driver state (an older save): save it whole
            run.save(start)
            report.steps = start
        run.saver.finish()
        report.final_model = run.saver.final_model
        report.restarts = system.restarts()
    finally:
        if writer is not None:
            writer.close()
        if run is not None:
            run.pipeline.shutdown()
        system.shutdown()
    report.seconds = time.perf_counter() - t0
    done = read_metrics(Path(report.metrics_path))
    mine = [r for r in done if r["step"] > start]
    if mine:
        report.first, report.last = mine[0], mine[-1]
    (out / "rl_report.json").write_text(json.dumps(asdict(report), indent=1, sort_keys=True, default=str) + "\n")
    return report
