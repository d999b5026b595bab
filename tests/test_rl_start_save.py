"""Fast start and resume, and checkpoints off the critical path (issue 24, items 5 and 6).

Prompts (``avar_ray.rl.prompts``): checked once, the verdicts cached beside the run's output;
a second start with the same data and settings runs no processor, a changed setting or data
file checks again; a prompt whose image cannot be read is skipped and named; the process pool
gives the verdicts of the in-process check. Lengths are held against the learner's own
encoding of each prompt (``actors.learner_batches.encode_prompt``), not the checked function.

Checkpoints (``avar_ray.rl.checkpoint.Saver``): a save is written into ``step_N.partial`` and
only a whole one is renamed and named by ``latest``; a writer process that dies mid-save (a
real crash of a Ray worker) leaves a ``.partial`` folder that resume, ``finished`` and pruning
ignore, and the next save of that step replaces it. The DeepSpeed side of the same protocol
runs in tests/test_rl_run.py (the resume loads a renamed checkpoint) and
tests/test_rl_resume_kill.py (SIGKILL during a save).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from avar_ray.config import load_config
from avar_ray.rl import checkpoint, prompts

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny_local.yaml")


# ----------------------------------------------------------------------------- prompts
def _data(tmp_path: Path, n: int = 24, corrupt: int | None = None, odd: int | None = None) -> tuple[Path, list]:
    """Procedural prompts; ``corrupt``: that row's image bytes undecodable (the reader's bad row);
    ``odd``: that row's image 500 x 2 pixels (decodes; Qwen2-VL's processor refuses its aspect ratio)."""
    from dataclasses import replace

    from PIL import Image

    from avar_ray.data.procedural import generate_samples
    from avar_ray.data.schema import encode_png, write_parquet

    samples = generate_samples(n, seed=0)
    if corrupt is not None:
        samples[corrupt] = replace(samples[corrupt], images=[b"\x89PNG not really"])
    if odd is not None:
        samples[odd] = replace(samples[odd], images=[encode_png(Image.new("RGB", (500, 2)))])
    return write_parquet(samples, tmp_path / "data" / "train.parquet"), samples


def _lengths(model_dir: Path, cfg, samples) -> dict[str, int]:
    """Each prompt's length as the learner encodes it (the reference)."""
    from actors.learner_batches import encode_prompt
    from avar_ray.modeling import load_processor

    processor = load_processor(str(model_dir), cfg.model)
    return {s.id: len(encode_prompt(processor, s, cfg.model.system_prompt).ids) for s in samples}


@pytest.mark.slow  # a process pool (two interpreters importing transformers: 15-30 s on a loaded machine)
def test_prompt_checks_are_cached_and_a_changed_setting_or_file_checks_again(tiny_model_dir, tmp_path, monkeypatch,
                                                                           capsys):
    path, samples = _data(tmp_path, corrupt=5, odd=6)
    calls = []
    counted = prompts.prompt_tokens
    monkeypatch.setattr(prompts, "prompt_tokens", lambda *a: calls.append(1) or counted(*a))

    def cfg(*extra):
        return load_config(CONFIG, [f"model.path={tiny_model_dir}", f"data.train={path}", "model.max_model_len=200",
                                    f"rl.out={tmp_path / 'rl'}", *extra])

    good = [s for i, s in enumerate(samples) if i not in (5, 6)]
    lengths = _lengths(tiny_model_dir, cfg(), good)
    budget = sorted(lengths.values())[len(lengths) // 2]  # half the prompts too long
    new_tokens = 200 - budget
    cache = tmp_path / "rl" / "prompt_cache"

    with monkeypatch.context() as pool:  # the cold start on 2 processes, as with thousands of prompts
        pool.setattr(prompts, "POOL_MIN_PROMPTS", 1)
        first = prompts.load_prompts(cfg(f"rl.max_new_tokens={new_tokens}", "rl.prompt_workers=2"), cache)
    too_long = sorted(i for i, n in lengths.items() if n > budget)
    assert (first.cache, first.checked, sorted(first.too_long)) == ("miss", len(samples) - 1, too_long)
    assert 0 < len(too_long) < len(good)
    printed = capsys.readouterr().out
    assert first.bad_rows == 1 and "1 bad rows skipped: " in printed and "row 5 (corrupt image" in printed
    assert first.unreadable == [samples[6].id] and f"{samples[6].id} (ValueError: absolute aspect ratio" in printed
    assert [s.id for s in first.samples] == [s.id for s in good if s.id not in too_long]
    assert not calls  # it ran in the pool's processes

    calls.clear()
    again = prompts.load_prompts(cfg(f"rl.max_new_tokens={new_tokens}"), cache)  # a resume
    assert (again.cache, again.checked, calls) == ("hit", 0, [])
    assert ([s.id for s in again.samples], again.too_long, again.unreadable) == \
        ([s.id for s in first.samples], first.too_long, first.unreadable)
    assert [s.images for s in again.samples] == [s.images for s in first.samples]
    assert len(list(cache.glob("train-*.json"))) == 1

    looser = prompts.load_prompts(cfg(f"rl.max_new_tokens={new_tokens - 10}"), cache)  # a changed setting
    assert (looser.cache, looser.checked, len(calls)) == ("miss", len(samples) - 1, len(samples) - 1)  # in process
    assert sorted(looser.too_long) == sorted(i for i, n in lengths.items() if n > budget + 10)
    assert looser.unreadable == first.unreadable  # the pool's verdicts are the in-process ones
    assert len(list(cache.glob("train-*.json"))) == 1  # the older entry went

    path, samples = _data(tmp_path, n=25)  # the data file rewritten
    changed = prompts.load_prompts(cfg(f"rl.max_new_tokens={new_tokens - 10}"), cache)
    assert (changed.cache, changed.checked, changed.unreadable) == ("miss", 25, [])
    off = prompts.load_prompts(cfg(f"rl.max_new_tokens={new_tokens - 10}", "rl.prompt_cache=false"), cache)
    assert (off.cache, off.checked) == ("off", 25)


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_schedule():
    def steps(*extra):
        rl = load_config(CONFIG, ["rl.steps=10", *extra]).rl
        return [s for s in range(1, 11) if checkpoint.due(s, rl)], [s for s in range(1, 11) if checkpoint.hf_due(s, rl)]

    assert steps("rl.save_every=3", "rl.save_hf_every=4") == ([3, 4, 6, 8, 9, 10], [4, 8, 10])
    assert steps("rl.save_every=3") == ([3, 6, 9, 10], [10])  # the default: the last step's export only
    assert steps("rl.save_every=0", "rl.save_hf_every=0") == ([10], [10])
    assert steps("rl.save_every=5", "rl.save_hf_every=2", "rl.export_hf=false") == ([5, 10], [])


def _write_shard(folder: str, rank: int, crash: bool) -> str:
    """A rank's part of a save; ``crash``: the process dies half-way (a file already written)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"rank_{rank}.pt").write_bytes(b"x" * 1000)
    if crash:
        os._exit(1)
    (Path(folder) / f"rank_{rank}.done").touch()
    return folder


def _submit(ray, crash_rank: int | None = None):
    write = ray.remote(max_retries=0)(_write_shard)

    def submit(directory: str, folder: str, state: dict, hf: str | None) -> list:
        return [write.remote(str(Path(directory) / folder), r, r == crash_rank) for r in range(2)]

    return submit


@pytest.mark.slow
def test_a_save_that_crashes_is_never_resumed_from(ray_local, tmp_path):
    from ray import cloudpickle

    from avar_ray.checkpoints import start_step

    ray = ray_local
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import a test module
    ckpt = tmp_path / "checkpoints"
    saver = checkpoint.Saver(ckpt, keep=2)
    saver.start(_submit(ray), 1, {"step": 1}, hf=False)
    assert saver.pending is not None and not (ckpt / "latest").exists()  # in flight: the driver went on
    saver.finish()
    assert checkpoint.latest_step(ckpt) == 1 and json.loads((ckpt / "step_1" / "driver_state.json").read_text()) == {
        "step": 1}
    assert sorted(p.name for p in (ckpt / "step_1").iterdir()) == ["driver_state.json", "rank_0.done", "rank_0.pt",
                                                                    "rank_1.done", "rank_1.pt"]

    saver.start(_submit(ray, crash_rank=1), 2, {"step": 2}, hf=False)
    with pytest.raises(ray.exceptions.RayError):
        saver.finish()
    assert (ckpt / "step_2.partial" / "rank_1.pt").is_file()  # half-written ...
    assert not (ckpt / "step_2").exists() and checkpoint.latest_step(ckpt) == 1  # ... and never named
    assert start_step(ckpt, "auto", "rl", "x") == 1 and checkpoint.finished(ckpt, 2) is None
    assert checkpoint.prune(ckpt, 1) == [] and (ckpt / "step_2.partial").is_dir()  # not a checkpoint to prune
    assert saver.finish() == 0.0  # a failed save is not retried

    waiting = checkpoint.Saver(ckpt, keep=2, background=False)  # rl.save_async=false
    waiting.start(_submit(ray), 2, {"step": 2}, hf=True)
    assert waiting.pending is None and checkpoint.latest_step(ckpt) == 2 and checkpoint.finished(ckpt, 2) == 2
    assert not (ckpt / "step_2.partial").exists() and waiting.final_model == str(ckpt / "step_2" / "hf")
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_1", "step_2"]
