"""Auto-resume (``rl.resume`` / ``sft.resume`` = auto, the default): a used output directory is
continued, a complete one is said to be complete and left as is (exit 0), ``false`` still
refuses one and ``true`` / ``avar rl --resume`` still continue. The re-applied pipeline chain
killed in RL is tests/test_rl_resume_kill.py's first test.

And the asynchronous run's restart hazard (issue 21, 6b): a rollout worker restarted in the
background generation thread publishes the learners' weights (collectives on every rank) under
``ActorSet.handle_lock``, the lock the driver holds around its own learner calls, so the ranks
never see a publish between the halves of a train or score call.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from avar_ray.checkpoints import start_step
from avar_ray.config import load_config
from avar_ray.rl import checkpoint

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny_local.yaml")


def _checkpoint(ckpt_dir: Path, step: int, whole: bool = True) -> None:
    """The files a save leaves (DeepSpeed's ``latest``, the HF export, the driver state last)."""
    (ckpt_dir / checkpoint.tag(step) / "hf").mkdir(parents=True)
    (ckpt_dir / "latest").write_text(checkpoint.tag(step))
    if whole:
        (ckpt_dir / checkpoint.tag(step) / checkpoint.DRIVER_STATE).write_text("{}")


def test_start_step_auto_true_false(tmp_path, capsys):
    assert start_step(tmp_path, "auto", "rl", "x") == 0 and capsys.readouterr().out == ""  # fresh, quietly
    _checkpoint(tmp_path, 4)
    assert start_step(tmp_path, "auto", "rl", "x") == 4
    assert "continuing from the checkpoint of step 4" in capsys.readouterr().out
    assert start_step(tmp_path, True, "rl", "x") == 4
    with pytest.raises(ValueError, match=r"rl\.out: .* earlier run \(step 4\)"):
        start_step(tmp_path, False, "rl", "x")


def test_rl_on_a_complete_output_says_so_and_exits_0(tmp_path, capsys):
    from avar_ray.rl import run_rl

    out = tmp_path / "rl"
    _checkpoint(out / "checkpoints", 3)
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward/total": s / 10}) + "\n"
                                               for s in (1, 2, 3)))
    # nothing starts (no Ray, no model: model.path is a directory with no model in it)
    overrides = [f"rl.out={out}", "rl.steps=3", f"model.path={tmp_path}"]
    report = run_rl(load_config(CONFIG, overrides))
    assert (report.steps, report.start_step, report.last["step"]) == (3, 3, 3)
    assert report.final_model == str(out / "checkpoints" / "step_3" / "hf")
    assert "is complete" in capsys.readouterr().out
    assert run_rl(load_config(CONFIG, overrides + ["rl.resume=false"]), resume=True).steps == 3  # --resume
    with pytest.raises(ValueError, match=r"rl\.out: .* earlier run \(step 3\)"):  # false: a used rl.out is refused
        run_rl(load_config(CONFIG, overrides + ["rl.resume=false"]))
    assert checkpoint.finished(out / "checkpoints", 4) is None  # rl.steps grew: not complete, continued
    cut = tmp_path / "cut" / "checkpoints"
    _checkpoint(cut, 3, whole=False)  # killed inside the last save: its export is redone, not skipped
    assert checkpoint.finished(cut, 3) is None


def test_rl_cli_on_a_complete_output(tmp_path, capsys, tiny_model_dir, procedural_parquet):
    from avar_ray.cli import main

    out = tmp_path / "rl"
    _checkpoint(out / "checkpoints", 2)
    args = ["rl", "-c", CONFIG, f"rl.out={out}", "rl.steps=2", f"model.path={tiny_model_dir}",
            f"data.train={procedural_parquet}"]
    for extra in ([], ["--resume"]):
        assert main(args + extra) == 0
        printed = capsys.readouterr().out
        assert "is complete" in printed and printed.rstrip().endswith(f"final model: {out}/checkpoints/step_2/hf")


def test_sft_on_a_finished_output_says_so(tmp_path, capsys):
    from avar_ray.sft import run_sft
    from avar_ray.sft.loop import EXPORT_NOTE
    from avar_ray.sft.trainer import finished

    out = tmp_path / "sft"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_8")
    assert finished(out) is None  # checkpoints, no export: continued, not skipped
    (out / "final").mkdir()
    (out / "final" / EXPORT_NOTE).write_text(json.dumps({"steps": 4}))
    assert finished(out) is None  # an export of an older step
    (out / "final" / EXPORT_NOTE).write_text(json.dumps({"steps": 8}))
    assert finished(out) == 8
    report = run_sft(load_config(CONFIG, [f"sft.out={out}", f"model.path={tmp_path / 'gone'}"]))
    assert report.final_step == 8 and report.export == str(out / "final")
    assert "is complete" in capsys.readouterr().out


# ---------------------------------------------------------------- 6(b): a restart in the background


class _Rank:
    """A learner rank's call log: each call is one collective all ranks must enter in one order."""

    def __init__(self) -> None:
        self.log: list[str] = []

    def call(self, name: str, seconds: float) -> None:
        self.log.append(name)
        time.sleep(seconds)

    def calls(self) -> list[str]:
        return self.log


class _Worker:
    """A rollout worker that dies in its first generate (its process exits; Ray restarts it)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def ready(self) -> dict:
        return {"pid": os.getpid()}

    def update_weights(self, handle) -> float:
        return 0.0

    def generate(self) -> str:
        if not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)
        return "rollouts"


@pytest.mark.slow
def test_background_restart_publishes_between_the_main_threads_learner_calls(ray_local, tmp_path):
    import sys

    from ray import cloudpickle

    from actors.recovery import ActorSet

    ray = ray_local
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import a test module
    ranks = [ray.remote(_Rank).options(num_cpus=0).remote() for _ in range(2)]
    pool = ActorSet(_Worker, [(str(tmp_path / "died"),)], {"num_cpus": 0, "max_restarts": 1}, 2, "rollout worker")

    def collective(name: str, seconds: float, order: list, gap: float) -> None:
        refs = []
        for rank in order:  # one rank after the other: two threads' submissions can cross
            refs.append(rank.call.remote(name, seconds))
            time.sleep(gap)
        ray.get(refs)

    published = []  # the broadcast's cold publish (submitted in the other order: without the lock they cross)
    pool.handle = lambda: published.append(collective("publish", 0.05, ranks[::-1], 0.1))
    stop = threading.Event()

    def main_thread_calls() -> None:
        while not stop.is_set():
            with pool.handle_lock:  # Run.learner_calls
                collective("train", 0.05, ranks, 0.02)

    trainer = threading.Thread(target=main_thread_calls)
    trainer.start()
    try:
        time.sleep(0.2)
        assert pool.call([(0, "generate", ())]) == ["rollouts"]  # died, restarted, weights, redone
        time.sleep(0.2)
    finally:
        stop.set()
        trainer.join()
    logs = ray.get([r.calls.remote() for r in ranks])
    assert published and pool.restarts == 1
    assert "publish" in logs[0] and logs[0].index("publish") > 0  # it came among the train calls
    assert logs[0] == logs[1]  # every rank saw the same order: never a publish inside a train call
    pool.shutdown()
    for rank in ranks:
        ray.kill(rank)
