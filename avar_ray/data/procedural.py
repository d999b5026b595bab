"""Procedural visual reasoning tasks: scene graph -> PNG + question + oracle caption.

Deterministic: sample i of seed s depends only on (s, i, image_size), so the first k samples of
generate_samples(n, s) equal generate_samples(k, s), and reruns give byte-identical rows.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from avar_ray.config import DataConfig
from avar_ray.data.captions import CHAIN_STYLES, anchor_phrases, caption, oracle_reasoning
from avar_ray.data.render import render_scene
from avar_ray.data.scenes import BUILDERS, EASY_BUILDERS
from avar_ray.data.schema import Sample, write_parquet

TASKS: tuple[str, ...] = tuple(BUILDERS)  # the default mix
EASY_TASKS: tuple[str, ...] = tuple(EASY_BUILDERS)  # what the tiny model learns in CPU minutes
ALL_BUILDERS = {**BUILDERS, **EASY_BUILDERS}
SOURCE = "procedural"


def check_tasks(tasks) -> tuple[str, ...]:
    """``tasks`` as a tuple of known task names (None or empty: the default mix TASKS)."""
    tasks = tuple(tasks or TASKS)
    unknown = [t for t in tasks if t not in ALL_BUILDERS]
    if unknown:
        raise ValueError(f"unknown procedural task(s) {unknown}; known: {sorted(ALL_BUILDERS)}")
    return tasks


def task_for(index: int, seed: int, tasks: tuple[str, ...] = TASKS) -> str:
    """Round-robin over a seed-dependent task order: counts differ by at most one."""
    order = list(tasks)
    random.Random(f"avar-proc-order-{seed}").shuffle(order)
    return order[index % len(order)]


def make_sample(index: int, seed: int, image_size: int = DataConfig.image_size, chain: str = "full",
                tasks: tuple[str, ...] = TASKS) -> Sample:
    task = task_for(index, seed, tasks)
    # A string seed is hashed with SHA-512 by random.Random: stable across runs and platforms.
    rng = random.Random(f"avar-proc-{seed}-{index}")
    draw = ALL_BUILDERS[task](rng, image_size)
    return Sample(
        id=f"proc-{seed}-{index:06d}",
        question=draw.question,
        answer=draw.answer,
        answer_type=draw.answer_type,  # type: ignore[arg-type]
        images=[render_scene(draw.scene)],
        choices=draw.choices,
        source=SOURCE,
        meta={"task": task, "scene": draw.scene, "target": draw.target,
              "caption": caption(draw.scene), "chain": chain},
    )


def generate_samples(n: int, seed: int, image_size: int = DataConfig.image_size, chain: str = "full",
                     tasks=None) -> list[Sample]:
    """``chain``: the oracle reasoning style the samples carry (captions.CHAIN_STYLES);
    ``tasks``: the task names drawn in turn (None: the default mix TASKS; EASY_TASKS: the easy set)."""
    tasks = check_tasks(tasks)
    if chain not in CHAIN_STYLES:
        raise ValueError(f"chain must be one of {CHAIN_STYLES}, got {chain!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if image_size < 56:
        raise ValueError(f"image_size {image_size} is too small to draw the tasks (>= 56)")
    return [make_sample(i, seed, image_size, chain, tasks) for i in range(n)]


def write_procedural(
    out_dir: str | Path, n: int, seed: int, image_size: int = DataConfig.image_size, split_name: str = "train",
    chain: str = "full", tasks=None,
) -> Path:
    """Write out_dir/{split_name}.parquet and print a one-line summary."""
    samples = generate_samples(n, seed, image_size, chain, tasks)
    path = write_parquet(samples, Path(out_dir) / f"{split_name}.parquet")
    counts = Counter(s.meta["task"] for s in samples)
    kinds = Counter(s.answer_type for s in samples)
    print(f"wrote {len(samples)} rows to {path} (seed {seed}, {image_size}px); tasks: "
          + ", ".join(f"{t}={k}" for t, k in sorted(counts.items()))
          + "; answer types: " + ", ".join(f"{k}={v}" for k, v in sorted(kinds.items())))
    return path


__all__ = [
    "EASY_TASKS",
    "TASKS",
    "anchor_phrases",
    "generate_samples",
    "make_sample",
    "oracle_reasoning",
    "write_procedural",
]
