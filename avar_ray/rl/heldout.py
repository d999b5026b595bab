"""The held-out curve of an RL run (``rl.eval_every``): the current policy answers a fixed set of
prompts it does not train on, on the rollout workers' engines between steps (no second model).

Each evaluation generates one greedy answer per prompt and ``rl.eval_samples`` answers at the
rollout temperature (seeded per prompt, the same seeds at every evaluation, so the curve moves
with the policy and not with the sampling), scores them with the reward actor's text rewards (the
one accuracy mechanism of the run) and reports

- ``eval/accuracy``: greedy accuracy; ``eval/accuracy_sampled``: mean accuracy of the samples;
- ``eval/pass_at_k``: the share of prompts some sample answers (RL can only sharpen what sampling
  already finds: pass@k above pass@1 is the room it has);
- ``eval/format``, ``eval/response_length_mean`` (greedy), ``eval/n``, ``time/eval``.

Evaluations run at the start (step 0, unless resuming), every ``eval_every`` steps after the
weight sync and at the last step. Each is a line of ``<rl.out>/heldout.jsonl`` (the curve; kept up
to the checkpoint on resume) and its answers go to ``<rl.out>/heldout/step_N.jsonl`` (per prompt: id,
task, answer, the greedy prediction, correct, text, and ``sampled``: each sample's accuracy, from
which ``per_task`` computes pass@1 and pass@k per task); the step's metrics record carries the same
``eval/*`` figures.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from actors.records import PromptRequest
from actors.rollout import SamplingSpec
from avar_ray.tracking import keep_records_upto

CURVE = "heldout.jsonl"
ANSWERS = "heldout"
SEED_STREAM = 0x4E1D  # the held-out samples' seeds: a stream of rl.seed that no training step uses


def due(step: int, eval_every: int, last_step: int) -> bool:
    """Whether the policy after ``step`` is evaluated (0: the starting policy)."""
    return eval_every > 0 and (step == 0 or step % eval_every == 0 or step == last_step)


class HeldOut:
    """The held-out prompts of a run and their evaluation on the run's rollout pool."""

    def __init__(self, cfg, system, out: Path, start_step: int) -> None:
        import ray

        from avar_ray.data import sources
        from avar_ray.rl.prompts import load_prompts

        rl = cfg.rl
        if not sources.exists(rl.eval_data):  # a file, a folder or glob of shards, a datasets directory
            raise FileNotFoundError(f"rl.eval_data: no held-out data at {rl.eval_data}")
        # the training prompts' filters (images, pixels, prompt length) apply to the held-out set alike
        self.prompts = load_prompts(replace(cfg, data=replace(cfg.data, train=rl.eval_data)), Path(out) / "prompt_cache",
                                    "eval").samples
        self.rl, self.system, self.out = rl, system, Path(out)
        self.refs = [ray.put(s) for s in self.prompts]
        self.text_only = {s.id: replace(s, images=[]) for s in self.prompts}
        seeds = np.random.default_rng([rl.seed, SEED_STREAM]).integers(0, 2**31 - 1, len(self.prompts))
        self.requests = [PromptRequest(i, ref, int(seed)) for i, (ref, seed) in enumerate(zip(self.refs, seeds))]
        (self.out / ANSWERS).mkdir(parents=True, exist_ok=True)  # before rewind: a fresh run has no rl.out yet
        self.rewind(start_step)

    def rewind(self, step: int) -> None:
        """Keep the curve up to ``step`` (a resumed or recovered run redoes the steps after it)."""
        keep_records_upto(self.out / CURVE, step)

    def _score(self, spec: SamplingSpec) -> tuple[list, list]:
        rollouts = self.system.rollout.generate(self.requests, spec)
        return rollouts, self.system.reward.text(rollouts, self.text_only)

    def evaluate(self, step: int, policy_version: int) -> dict:
        """Evaluate the policy the rollout workers hold now; returns the ``eval/*`` figures."""
        from rewards.accuracy import extract_answer

        t0 = time.perf_counter()
        rl = self.rl
        greedy, text = self._score(SamplingSpec(n=1, max_new_tokens=rl.max_new_tokens, temperature=0.0, top_p=1.0))
        correct = {r.prompt_index: t[0] for r, t in zip(greedy, text)}
        record = {"eval/n": len(self.prompts), "eval/answered": len(greedy),
                  "eval/accuracy": sum(correct.values()) / len(self.prompts),
                  "eval/format": float(np.mean([t[1] for t in text])) if text else 0.0,
                  "eval/response_length_mean": float(np.mean([len(r.response_ids) for r in greedy])) if greedy else 0.0}
        per_prompt: dict[int, list[float]] = {}
        if rl.eval_samples:
            sampled, stext = self._score(SamplingSpec(n=rl.eval_samples, max_new_tokens=rl.max_new_tokens,
                                                      temperature=rl.temperature, top_p=rl.top_p))
            for r, t in zip(sampled, stext):
                per_prompt.setdefault(r.prompt_index, []).append(t[0])
            # a prompt whose request failed counts as unanswered (0), as in the greedy figure
            record["eval/accuracy_sampled"] = sum(sum(v) for v in per_prompt.values()) / (
                len(self.prompts) * rl.eval_samples)
            record["eval/pass_at_k"] = sum(max(v) for v in per_prompt.values()) / len(self.prompts)
        record["time/eval"] = time.perf_counter() - t0
        with (self.out / CURVE).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, "policy_version": policy_version, **record}) + "\n")
        answers = []
        for r in greedy:
            sample = self.prompts[r.prompt_index]
            answers.append({"id": sample.id, "task": sample.meta.get("task", sample.source), "answer": sample.answer,
                            "prediction": extract_answer(r.text), "correct": correct[r.prompt_index], "text": r.text,
                            "sampled": per_prompt.get(r.prompt_index, [])})
        (self.out / ANSWERS / f"step_{step}.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
        print(f"rl: held-out after step {step}: greedy {record['eval/accuracy']:.3f}"
              + (f", sampled {record['eval/accuracy_sampled']:.3f}, pass@{rl.eval_samples} "
                 f"{record['eval/pass_at_k']:.3f}" if rl.eval_samples else "")
              + f" (n = {len(self.prompts)}, {record['time/eval']:.1f}s)", flush=True)
        return record


def per_task(answers_path: str | Path) -> dict[str, dict]:
    """pass@1 (greedy), the sampled accuracy with its 95% interval and pass@k per task of one
    evaluation's answers (``heldout/step_N.jsonl``), and over all of them (``"all"``). Where pass@k
    is above pass@1, sampling finds answers the greedy policy misses: the room RL has to sharpen.
    The interval is over prompts (each prompt's mean over its k samples; the k samples of one
    prompt are not independent draws, so a binomial interval over all n x k would be too narrow)."""
    rows = [json.loads(line) for line in Path(answers_path).read_text(encoding="utf-8").splitlines()]
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row.get("task", "?"), []).append(row)
    return {task: _summary(group) for task, group in [*sorted(groups.items()), ("all", rows)]}


def _summary(rows: list[dict]) -> dict:
    summary = {"n": len(rows), "pass@1": float(np.mean([r["correct"] for r in rows])),
               "sampled": None, "sampled_ci": None, "pass@k": None}
    sampled = [r["sampled"] for r in rows if r.get("sampled")]
    if sampled:
        per_prompt = np.array([np.mean(v) for v in sampled])
        mean = float(per_prompt.mean())
        half = 1.96 * float(per_prompt.std(ddof=1)) / np.sqrt(len(per_prompt)) if len(per_prompt) > 1 else 0.0
        summary["sampled"], summary["sampled_ci"] = mean, (max(0.0, mean - half), min(1.0, mean + half))
        summary["pass@k"] = float(np.mean([max(v) for v in sampled]))
    return summary
