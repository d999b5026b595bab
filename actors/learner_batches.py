"""The learners' model inputs, built from a per-step prompt cache (issue 10, data plane).

The n rollouts of a prompt share its image, and a learner rank uses each rollout several
times in a step (the no-grad ``score`` pass, then every micro-batch of every PPO epoch).
``PromptCache`` fetches each prompt from the object store, decodes its images and runs the
HF processor on it ONCE per rank and step; micro-batches are assembled from the cached
tensors (the prompt's ids, ``pixel_values``, ``image_grid_thw``) plus each rollout's response
ids. The learner clears the cache when its step's update is done, so host memory holds one
step's prompts at most (plus those of steps whose update was skipped, until the next update).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

from actors.records import conversation, resolve_samples
from avar_ray.modeling import Encoded, append_response, collate, encode_batch


@dataclass
class Prompt:
    """The processor's output for one prompt alone (``[1, P]`` token tensors, its images'
    ``pixel_values`` / ``image_grid_thw``) and the sample it came from."""

    inputs: dict
    sample_id: str
    sample: Any = None  # a plain Sample keyed by identity is kept alive with its entry

    @property
    def ids(self) -> list[int]:
        return self.inputs["input_ids"][0].tolist()


def encode_prompt(processor, sample, system_prompt: str | None = None) -> Prompt:
    """One processor call: the generation prompt of ``sample`` exactly as vLLM saw it."""
    messages, images = conversation(sample, system_prompt)
    return Prompt(encode_batch(processor, [messages], [images]).inputs, sample.id)


def assemble(processor, prompts: Sequence[Prompt], response_ids: Sequence[Sequence[int]]) -> Encoded:
    """Prompt + response ids per row, right-padded: ``modeling.encode_batch(...,
    response_ids=...)``'s padding on the cached prompts, without the processor."""
    rows = [append_response(p.inputs, r) for p, r in zip(prompts, response_ids)]
    return collate(processor, rows, [p.inputs["input_ids"].shape[1] for p in prompts], "right")


def _key(sample) -> tuple:
    """Object refs by their id (the driver puts each prompt once per step: one ref, one
    content); plain Samples (tests, diagnostics) by identity."""
    import ray

    return ("ref", sample.binary()) if isinstance(sample, ray.ObjectRef) else ("obj", id(sample))


class PromptCache:
    """Prompts of the current step, each encoded once; ``encodes`` / ``seconds``: processor
    calls and their time (fetch and image decoding included) since the last ``clear``."""

    def __init__(self, processor, system_prompt: str | None = None):
        self.processor, self.system_prompt = processor, system_prompt
        self.entries: dict[tuple, Prompt] = {}
        self.encodes, self.seconds = 0, 0.0

    def prompts(self, samples: Sequence) -> list[Prompt]:
        """The cached prompt of each sample (a Sample or an object ref), encoding the new ones."""
        keys = [_key(s) for s in samples]
        new = {k: s for k, s in zip(keys, samples) if k not in self.entries}
        if new:
            start = time.perf_counter()
            for (kind, key), sample in zip(new, resolve_samples(list(new.values()))):
                prompt = encode_prompt(self.processor, sample, self.system_prompt)
                if kind == "obj":
                    prompt.sample = sample
                self.entries[(kind, key)] = prompt
            self.encodes += len(new)
            self.seconds += time.perf_counter() - start
        return [self.entries[k] for k in keys]

    def encode(self, items) -> tuple[Encoded, list[Prompt]]:
        """The model inputs of ``items`` (TrainItems) and the prompt of each."""
        prompts = self.prompts([it.sample for it in items])
        return assemble(self.processor, prompts, [it.response_ids for it in items]), prompts

    def clear(self) -> dict:
        """Empties the cache; returns the counts since the last clear."""
        counts = {"encodes": self.encodes, "seconds": self.seconds, "prompts": len(self.entries)}
        self.entries.clear()
        self.encodes, self.seconds = 0, 0.0
        return counts


class CountingProcessor:
    """An HF processor that counts its calls (each resizes and normalises the images it is
    given): how the tests and ``bench/rl_step.py`` watch the cache."""

    def __init__(self, processor):
        self._processor, self.calls = processor, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._processor(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._processor, name)
