"""The prompts of the RL run: the training file read once (bad rows skipped and counted by the
readers), samples with more images than a prompt may hold left out and counted, and a seeded
sampler whose position (epoch, index) goes into every checkpoint so that ``--resume`` draws
exactly the prompts the uninterrupted run would have drawn."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from avar_ray.data.schema import Sample


@dataclass
class PromptSet:
    samples: list[Sample]
    path: str
    bad_rows: int = 0  # rows the reader could not parse (skipped)
    too_many_images: int = 0  # samples with more images than rl.max_images (skipped)

    def summary(self) -> str:
        return (f"{len(self.samples)} prompts from {self.path} ({self.bad_rows} bad rows skipped, "
                f"{self.too_many_images} with more than the allowed images skipped)")


def load_prompts(path: str, max_images: int) -> PromptSet:
    from pathlib import Path

    from avar_ray.data.readers import read_samples

    if not Path(path).is_file():
        raise FileNotFoundError(f"data.train: no training file at {path} (write procedural data with "
                                "`avar make-data -c CONFIG`)")
    samples, report = read_samples(path)
    kept = [s for s in samples if len(s.images) <= max_images]
    prompts = PromptSet(kept, str(path), bad_rows=report.skipped, too_many_images=len(samples) - len(kept))
    if not kept:
        raise ValueError(f"data.train: {prompts.summary()}: nothing to train on")
    return prompts


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
