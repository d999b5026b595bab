"""The prompts of the RL run: the training file read once (bad rows skipped and counted by the
readers), prompts no step could use (too many or too large images, too long for the context)
left out, counted and named, and a seeded
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
    too_long: list[str] = field(default_factory=list)  # ids: prompt tokens + max_new_tokens > max_model_len
    too_large: list[str] = field(default_factory=list)  # ids: an image over rl.max_image_pixels

    @property
    def filtered(self) -> int:
        return self.too_many_images + len(self.too_long) + len(self.too_large)

    def summary(self) -> str:
        return (f"{len(self.samples)} prompts from {self.path} ({self.bad_rows} bad rows skipped, "
                f"{self.too_many_images} with more than the allowed images, {len(self.too_long)} too long "
                f"for the context, {len(self.too_large)} with an image over the pixel limit: skipped)")


def _too_large(sample: Sample, max_pixels: int) -> bool:
    from io import BytesIO

    from PIL import Image

    for data in sample.images:
        with Image.open(BytesIO(data)) as image:  # the header only: no decode
            if image.size[0] * image.size[1] > max_pixels:
                return True
    return False


def prompt_tokens(processor, sample: Sample, system_prompt: str | None) -> int:
    """Tokens of the sample's prompt as the engines see it (image placeholders expanded)."""
    from actors.records import conversation

    messages, images = conversation(sample, system_prompt)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=[text], images=images or None, return_tensors="pt")["input_ids"].shape[1]


def load_prompts(cfg) -> PromptSet:
    """``data.train``, minus the prompts no step could use: more images than ``rl.max_images``,
    an image over ``rl.max_image_pixels``, or prompt tokens + ``rl.max_new_tokens`` beyond
    ``model.max_model_len`` (vLLM would refuse the request). Each filtered id is logged."""
    from pathlib import Path

    from avar_ray.data.readers import read_samples
    from avar_ray.modeling import load_processor

    rl, path = cfg.rl, cfg.data.train
    if not Path(path).is_file():
        raise FileNotFoundError(f"data.train: no training file at {path} (write procedural data with "
                                "`avar make-data -c CONFIG`)")
    samples, report = read_samples(path)
    kept = [s for s in samples if len(s.images) <= rl.max_images]
    prompts = PromptSet([], str(path), bad_rows=report.skipped, too_many_images=len(samples) - len(kept))
    processor = load_processor(cfg.model.path, cfg.model) if Path(cfg.model.path).is_dir() else None
    budget = cfg.model.max_model_len - rl.max_new_tokens
    for sample in kept:
        if _too_large(sample, rl.max_image_pixels):
            prompts.too_large.append(sample.id)
        elif processor is not None and prompt_tokens(processor, sample, cfg.model.system_prompt) > budget:
            prompts.too_long.append(sample.id)
        else:
            prompts.samples.append(sample)
    for what, ids in (("longer than model.max_model_len - rl.max_new_tokens", prompts.too_long),
                      ("with an image over rl.max_image_pixels", prompts.too_large)):
        if ids:
            print(f"rl: {len(ids)} prompts {what} skipped: {', '.join(ids[:20])}{' ...' if len(ids) > 20 else ''}",
                  flush=True)
    if not prompts.samples:
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
