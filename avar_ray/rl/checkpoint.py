"""RL checkpoints under ``<rl.out>/checkpoints``: per saved step a DeepSpeed checkpoint
(``step_N/``, written by every learner rank), the HF export of the policy (``step_N/hf``: what
eval and vLLM load; at the last step and every ``rl.save_hf_every`` steps) and the driver's
state (step, policy version, prompt sampler position) inside the DeepSpeed checkpoint's client
state, so that the weights and the data position can never disagree; ``driver_state.json``
beside it is for people to read.

Off the critical path, and never half-written (``Saver``): the learners write into
``step_N.partial/`` while the driver goes on with the next step (its generation and text
rewards overlap the save; the learners' next call queues behind it). Before the next learner
call the driver waits for the save's end, writes ``driver_state.json``, renames the folder to
``step_N`` and only then points ``latest`` at it (a file replaced whole). A crash during a save
leaves a ``.partial`` folder that nothing reads (resume follows ``latest``; pruning and tags
ignore it; the next save of that step replaces it). Tags and the ``latest`` file:
``avar_ray.checkpoints`` (shared with SFT)."""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from avar_ray.checkpoints import TAG, latest_step, tag  # noqa: F401 - latest_step: the driver's and tests' name

DRIVER_STATE = "driver_state.json"
PARTIAL = ".partial"


def hf_dir(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / tag(step) / "hf"


def partial_tag(step: int) -> str:
    """The folder a save writes into until it is whole (``TAG`` does not match it)."""
    return tag(step) + PARTIAL


def hf_due(step: int, rl) -> bool:
    """Whether step ``step``'s checkpoint carries an HF export: ``rl.export_hf`` and the last
    step, or a multiple of ``rl.save_hf_every`` (0: the last step only)."""
    return rl.export_hf and (step == rl.steps or (rl.save_hf_every > 0 and step % rl.save_hf_every == 0))


def due(step: int, rl) -> bool:
    """Whether step ``step`` saves a checkpoint: every ``rl.save_every`` steps (0: none before
    the last), the last step, and every step that exports an HF copy (``hf_due``)."""
    return (rl.save_every > 0 and step % rl.save_every == 0) or step == rl.steps or hf_due(step, rl)


# Submits a save (the learners' DeepSpeed save of the client state into <directory>/<folder>, then
# the HF export into the hf folder when one is given) and returns the Ray refs that end with it.
Submit = Callable[[str, str, dict, Optional[str]], list]


@dataclass
class _Pending:
    step: int
    state: dict
    refs: list
    hf: bool


class Saver:
    """One checkpoint in flight at a time (module docstring). ``background=False`` (``rl.save_async``
    false): every save is waited for where it starts (the step pays for it whole)."""

    def __init__(self, ckpt_dir: Path, keep: int, background: bool = True) -> None:
        self.ckpt_dir, self.keep, self.background = Path(ckpt_dir), keep, background
        self.pending: Optional[_Pending] = None
        self.final_model = ""  # the newest HF export committed

    def start(self, submit: Submit, step: int, state: dict, hf: bool) -> None:
        self.finish()
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        work = self.ckpt_dir / partial_tag(step)
        shutil.rmtree(work, ignore_errors=True)  # a crashed save of this step
        refs = submit(str(self.ckpt_dir), partial_tag(step), state, str(work / "hf") if hf else None)
        self.pending = _Pending(step, dict(state), refs, hf)
        if not self.background:
            self.finish()

    def finish(self) -> float:
        """Wait for the save in flight (if any) and commit it; returns the seconds waited. A
        failed save raises (its ``.partial`` folder stays, unread) and is not retried."""
        import ray

        pending, self.pending = self.pending, None
        if pending is None:
            return 0.0
        start = time.perf_counter()
        ray.get(pending.refs)
        waited = time.perf_counter() - start
        self._commit(pending)
        return waited

    def abandon(self) -> None:
        """Forget the save in flight (its learners are gone): the ``.partial`` folder stays, unread."""
        self.pending = None

    def _commit(self, pending: _Pending) -> None:
        work, final = self.ckpt_dir / partial_tag(pending.step), self.ckpt_dir / tag(pending.step)
        (work / DRIVER_STATE).write_text(json.dumps(pending.state, indent=1, sort_keys=True) + "\n")
        if final.exists():  # an older save of a redone step: never named by ``latest`` (it is past it)
            shutil.rmtree(final)
        os.replace(work, final)
        write_latest(self.ckpt_dir, pending.step)
        if pending.hf:
            self.final_model = str(hf_dir(self.ckpt_dir, pending.step))
        prune(self.ckpt_dir, self.keep)


def learner_submit(learners) -> Submit:
    """The learners' save (every rank) and HF export (rank 0 writes; a collective under ZeRO-3),
    queued on the learner actors in that order; nothing waited for."""

    def submit(directory: str, folder: str, state: dict, hf: Optional[str]) -> list:
        refs = learners.save_checkpoint(directory, folder, state, wait=False)
        return refs + (learners.export_hf(hf, wait=False) if hf else [])

    return submit


def write_latest(ckpt_dir: Path, step: int) -> None:
    """Point ``latest`` at ``step`` (a temporary file renamed over it: read whole or not at all)."""
    tmp = ckpt_dir / f"latest.tmp{os.getpid()}"
    tmp.write_text(tag(step))
    os.replace(tmp, ckpt_dir / "latest")


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
