"""Benchmark files -> prompts ready for generation and for the attention pass.

Every file goes through ``avar_ray.data.readers.read_samples`` (MathVista JSON, VLMEvalKit TSV,
JSONL, Parquet): its bad rows are skipped and counted there. Rows that read fine but cannot be
evaluated (an image PIL cannot decode, a prompt longer than the model's context) are skipped
and counted here, with the same (file, row, reason) record.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from avar_ray.data.fields import RowError
from avar_ray.data.readers import DataKeys, ReadReport, read_samples
from avar_ray.data.schema import ImageDecodeError, Sample, build_messages, pil_images

log = logging.getLogger("avar_ray.eval")


@dataclass
class EvalItem:
    """One sample to evaluate: its chat messages, decoded images and templated prompt."""

    benchmark: str
    sample: Sample
    messages: list[dict]
    images: list  # PIL images, in the order of the {"type": "image"} parts
    prompt_text: str  # chat template applied, generation prompt added
    prompt_len: int  # tokens, images expanded


@dataclass
class Benchmark:
    name: str
    path: str
    items: list[EvalItem] = field(default_factory=list)
    report: ReadReport = field(default_factory=ReadReport)

    def bad_rows(self) -> dict[str, Any]:
        """JSON-ready summary of every skipped row (reader's and ours)."""
        return {"count": self.report.skipped, "reasons": dict(self.report.reasons),
                "rows": [{"file": f, "row": r, "reason": why} for f, r, why in self.report.bad_rows]}


def benchmark_names(paths: Sequence[str | Path]) -> list[str]:
    """File stems, made unique (``a``, ``a_2``) when two files share one."""
    names: list[str] = []
    for p in paths:
        stem, name, k = Path(p).stem, Path(p).stem, 2
        while name in names:
            name, k = f"{stem}_{k}", k + 1
        names.append(name)
    return names


def prepare_item(processor, benchmark: str, sample: Sample, system_prompt: Optional[str],
                 max_prompt_tokens: int, images: Optional[list] = None) -> EvalItem:
    """Decode the images (unless already decoded: ``images``) and template the prompt;
    ``RowError`` when the row cannot be evaluated."""
    if images is None:
        try:
            images = pil_images(sample)
        except ImageDecodeError as exc:
            raise RowError("corrupt image", str(exc)) from exc
    messages = build_messages(sample, system_prompt=system_prompt)
    prompt_text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    kwargs = {"images": images} if images else {}
    prompt_len = len(processor(text=[prompt_text], **kwargs)["input_ids"][0])
    if prompt_len > max_prompt_tokens:
        raise RowError("prompt too long", f"prompt of {prompt_len} tokens leaves no room for the response "
                                       f"(at most {max_prompt_tokens} prompt tokens)")
    return EvalItem(benchmark, sample, messages, images, prompt_text, prompt_len)


def load_benchmarks(paths: Sequence[str | Path], processor, system_prompt: Optional[str], max_prompt_tokens: int,
                    max_samples: int = -1, keys: Optional[DataKeys] = None) -> list[Benchmark]:
    """Read and prepare every file; ``max_samples`` (> 0) keeps the first rows of each; ``keys``:
    the plain rows' columns (``data.prompt_key`` ...)."""
    if not paths:
        raise ValueError("no benchmark files given (--bench FILE... or data.eval in the config)")
    benchmarks = []
    for name, path in zip(benchmark_names(paths), paths):
        samples, report = read_samples(path, keys=keys)
        if max_samples > 0:
            samples = samples[:max_samples]
        bench = Benchmark(name, str(path), report=report)
        for sample in samples:
            try:
                bench.items.append(prepare_item(processor, name, sample, system_prompt, max_prompt_tokens))
            except RowError as exc:
                report.loaded -= 1  # the reader counted it as loaded
                report.skip(str(path), sample.id, exc)
        log.info("%s: %d samples to evaluate (%s)", path, len(bench.items), report)
        benchmarks.append(bench)
    return benchmarks
