"""DeepSpeed checkpoint tags under ``<out>/checkpoints`` (SFT and RL alike): ``step_N/`` per
saved step and DeepSpeed's ``latest`` file naming the newest; where a run starts from them."""
from __future__ import annotations

import re
from pathlib import Path

TAG = re.compile(r"^step_(\d+)$")


def tag(step: int) -> str:
    return f"step_{step}"


def latest_step(ckpt_dir: Path) -> int | None:
    """The step of the newest complete DeepSpeed checkpoint, or None."""
    latest = ckpt_dir / "latest"
    if not latest.exists():
        return None
    match = TAG.match(latest.read_text().strip())
    if match is None:
        raise ValueError(f"{latest}: unexpected checkpoint tag {latest.read_text().strip()!r} (expected step_N)")
    return int(match.group(1))


def start_step(ckpt_dir: Path, resume: bool | str, stage: str, how_to_resume: str) -> int:
    """The step a ``stage`` ("sft", "rl") run starts at. ``resume`` true or "auto": the newest
    checkpoint's (0 when there is none: "auto" starts fresh without a word); false: 0, and a
    directory holding an earlier run's checkpoints fails (``how_to_resume`` says how to continue
    it) rather than mixing them. The run's identity is its output directory: a checkpoint whose
    data position does not fit this run's data is refused when it is loaded."""
    saved = latest_step(ckpt_dir)
    if saved is None:
        if resume is True:
            print(f"{stage}: no checkpoint under {ckpt_dir} to resume from; starting at step 0", flush=True)
        return 0
    if resume is False:
        raise ValueError(f"{stage}.out: {ckpt_dir} holds checkpoints of an earlier run (step {saved}); "
                         f"{how_to_resume}, or choose another {stage}.out")
    print(f"{stage}: continuing from the checkpoint of step {saved} under {ckpt_dir} ({stage}.resume={resume})",
          flush=True)
    return saved
