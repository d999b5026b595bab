"""RL checkpoints under ``<rl.out>/checkpoints``: per saved step a DeepSpeed checkpoint
(``step_N/``, written by every learner rank; DeepSpeed's ``latest`` file names the newest), the
HF export of the policy (``step_N/hf``: what eval and vLLM load) and the driver's state (step,
policy version, prompt sampler position) inside the DeepSpeed checkpoint's client state, so
that the weights and the data position can never disagree. ``driver_state.json`` beside it is
for people to read, and written last: a step whose file is there is saved and exported whole. Tags and the ``latest`` file: ``avar_ray.checkpoints`` (shared with SFT)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from avar_ray.checkpoints import TAG, latest_step, tag  # noqa: F401 - latest_step: the driver's and tests' name


def hf_dir(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / tag(step) / "hf"


def save(learners, ckpt_dir: Path, step: int, state: dict, export_hf: bool, keep: int) -> Path | None:
    """Save step ``step``; returns the HF export's path (None when ``export_hf`` is off)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    learners.save_checkpoint(str(ckpt_dir), tag(step), state)
    exported = None
    if export_hf:
        exported = hf_dir(ckpt_dir, step)
        learners.export_hf(str(exported))
    (ckpt_dir / tag(step) / DRIVER_STATE).write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    prune(ckpt_dir, keep)
    return exported


DRIVER_STATE = "driver_state.json"


def finished(ckpt_dir: Path, steps: int) -> int | None:
    """The step of the newest checkpoint when it is at or past ``steps`` and was saved whole
    (DeepSpeed checkpoint, HF export, driver state): the run is done; else None."""
    saved = latest_step(ckpt_dir)
    if saved is None or saved < steps or not (ckpt_dir / tag(saved) / DRIVER_STATE).is_file():
        return None
    return saved


def prune(ckpt_dir: Path, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` checkpoints (0 keeps all); returns the deleted steps."""
    if keep <= 0:
        return []
    steps = sorted(int(m.group(1)) for p in ckpt_dir.iterdir() if p.is_dir() and (m := TAG.match(p.name)))
    doomed = steps[:-keep]
    for step in doomed:
        shutil.rmtree(ckpt_dir / tag(step))
    return doomed
