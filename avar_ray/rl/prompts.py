"""The prompts of an RL run: read, checked once, and the verdicts cached.

``data.train`` is read (rows the readers cannot parse: skipped and counted), then every prompt
is checked: its images decoded, at most ``rl.max_images``, none over ``rl.max_image_pixels``,
and its prompt tokens as the engines see them (the HF processor, image placeholders expanded)
plus ``rl.max_new_tokens`` within ``model.max_model_len``. Prompts that fail are skipped,
counted and named. The processor is the cost (about 0.1 s a prompt on a CPU core): a cold
start checks the prompts in parallel (``rl.prompt_workers`` processes), and the verdicts are
cached beside the run's output (``<rl.out>/prompt_cache/<name>-<key>.json``, ``rl.prompt_cache``).
The key hashes the data files (path, size, modification time: images referenced by path are
not part of it) and every setting a verdict depends on (the processor's files in
``model.path``, the pixel bounds, the system prompt, the limits above, the data columns, the
transformers version), so a resume, or a rerun with the same data and settings, reads the
verdicts and runs no processor; any change misses and checks again.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from avar_ray.data.schema import Sample

OK, TOO_MANY_IMAGES, TOO_LARGE, TOO_LONG, UNREADABLE = "ok", "too_many_images", "too_large", "too_long", "unreadable"
CACHE_VERSION = 1  # bump when a verdict's meaning changes
# the files of a checkpoint that make its processor (what the token counts depend on)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "special_tokens_map.json", "chat_template.json", "chat_template.jinja")
POOL_MIN_PROMPTS = 128  # per process: below this a pool's start-up (imports, processor load) costs more


@dataclass
class PromptSet:
    samples: list[Sample]
    path: str
    bad_rows: int = 0  # rows the reader could not parse (skipped)
    too_many_images: int = 0  # samples with more images than rl.max_images (skipped)
    too_long: list[str] = field(default_factory=list)  # ids: prompt tokens + max_new_tokens > max_model_len
    too_large: list[str] = field(default_factory=list)  # ids: an image over rl.max_image_pixels
    unreadable: list[str] = field(default_factory=list)  # ids: an image or prompt the processor could not read
    checked: int = 0  # prompts this start ran through the processor (0 on a cache hit)
    cache: str = "off"  # "hit", "miss" (checked and written) or "off"
    check_s: float = 0.0

    @property
    def filtered(self) -> int:
        return self.too_many_images + len(self.too_long) + len(self.too_large) + len(self.unreadable)

    def summary(self) -> str:
        return (f"{len(self.samples)} prompts from {self.path} ({self.bad_rows} bad rows skipped, "
                f"{self.too_many_images} with more than the allowed images, {len(self.too_long)} too long "
                f"for the context, {len(self.too_large)} with an image over the pixel limit, {len(self.unreadable)} "
                f"unreadable: skipped; checked in {self.check_s:.1f}s, cache {self.cache})")


def require_images(samples: list[Sample]) -> None:
    """Every RL prompt has an image: under ZeRO-3 every rank must run the vision tower's gathers
    in each micro-batch, and a rank whose micro-batch had none would wait for the others forever.
    The readers skip text-only rows (counted); a prompt source that let one through is refused."""
    text_only = [s.id for s in samples if not s.images]
    if text_only:
        raise ValueError(f"data.train: {len(text_only)} text-only prompts (no image), e.g. {text_only[:5]}: RL needs "
                         "an image in every prompt (a rank without one would hang ZeRO-3's vision-tower gathers)")


def prompt_tokens(processor, sample: Sample, system_prompt: str | None) -> int:
    """Tokens of the sample's prompt as the engines see it (image placeholders expanded)."""
    from actors.records import conversation

    messages, images = conversation(sample, system_prompt)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=[text], images=images or None, return_tensors="pt")["input_ids"].shape[1]


@dataclass(frozen=True)
class Check:
    """What a prompt's verdict depends on (pickled to the pool's processes)."""

    model: object  # ModelConfig: the processor at the engines' resolution
    max_images: int
    max_pixels: int
    budget: int  # model.max_model_len - rl.max_new_tokens

    @classmethod
    def of(cls, cfg) -> "Check":
        rl = cfg.rl
        return cls(cfg.model, rl.max_images, rl.max_image_pixels, cfg.model.max_model_len - rl.max_new_tokens)


def verdict(processor, sample: Sample, check: Check) -> str:
    """``ok``, or why no step could use the prompt (``unreadable: <error>`` names the error)."""
    from io import BytesIO

    from PIL import Image

    if len(sample.images) > check.max_images:
        return TOO_MANY_IMAGES
    try:
        for data in sample.images:
            with Image.open(BytesIO(data)) as image:  # the header: the size before any decode
                if image.size[0] * image.size[1] > check.max_pixels:
                    return TOO_LARGE
        if processor is not None and prompt_tokens(processor, sample, check.model.system_prompt) > check.budget:
            return TOO_LONG
    except Exception as exc:  # noqa: BLE001 - a prompt the processor cannot read is skipped and named
        return f"{UNREADABLE}: {type(exc).__name__}: {str(exc)[:200]}"
    return OK


_worker: dict = {}  # a pool process's processor and check


def _init_worker(check: Check) -> None:
    import torch

    from avar_ray.modeling import load_processor

    torch.set_num_threads(1)  # one core per process: the pool is the parallelism
    _worker.update(check=check, processor=load_processor(check.model.path, check.model))


def _verdicts(samples: list[Sample]) -> list[str]:
    return [verdict(_worker["processor"], s, _worker["check"]) for s in samples]


def check_all(samples: list[Sample], check: Check, workers: int) -> list[str]:
    """Each sample's verdict, in order: in this process, or over ``workers`` spawned processes
    when there are enough prompts for a pool to pay for its start-up."""
    import multiprocessing as mp

    has_model = Path(check.model.path).is_dir()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(1, min(workers or cores, len(samples) // POOL_MIN_PROMPTS))
    if workers == 1 or not has_model:
        from avar_ray.modeling import load_processor

        processor = load_processor(check.model.path, check.model) if has_model else None
        return [verdict(processor, s, check) for s in samples]
    size = -(-len(samples) // (workers * 4))  # a few chunks per process: the slow ones even out
    chunks = [samples[i:i + size] for i in range(0, len(samples), size)]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(check,)) as pool:
        return [v for got in pool.map(_verdicts, chunks) for v in got]


# ---------------------------------------------------------------------------- the cache
def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_inputs(cfg, files: list[Path]) -> dict:
    """Everything a verdict depends on (hashed into the cache key; written beside it for people)."""
    import transformers

    from avar_ray.data.readers import DataKeys

    model_dir = Path(cfg.model.path)
    check = Check.of(cfg)
    return {
        "version": CACHE_VERSION,
        "data": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        "columns": asdict(DataKeys.of(cfg.data)),
        "processor": {name: _file_hash(model_dir / name) for name in PROCESSOR_FILES if (model_dir / name).is_file()},
        "model": {"path": str(model_dir.resolve()), "min_pixels": cfg.model.min_pixels,
                  "max_pixels": cfg.model.max_pixels, "system_prompt": cfg.model.system_prompt},
        "limits": {"max_images": check.max_images, "max_image_pixels": check.max_pixels, "budget": check.budget},
        "transformers": transformers.__version__,
    }


def _key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def _read_cache(path: Path, samples: list[Sample]) -> Optional[list[str]]:
    """The cached verdicts when the file is there and was written for these rows, else None."""
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if cached.get("ids") != [s.id for s in samples] or len(cached.get("verdicts", ())) != len(samples):
        return None
    return cached["verdicts"]


def _write_cache(path: Path, inputs: dict, samples: list[Sample], verdicts: list[str]) -> None:
    """Written whole (a temporary file renamed into place); older entries of ``name`` go."""
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name.rsplit("-", 1)[0]
    for old in path.parent.glob(f"{name}-*.json"):
        if old != path:
            old.unlink(missing_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"inputs": inputs, "ids": [s.id for s in samples], "verdicts": verdicts}) + "\n")
    os.replace(tmp, path)


def _report(prompts: PromptSet, what: str, ids: list[str], reasons: Optional[dict] = None) -> None:
    if ids:
        named = ", ".join(f"{i} ({reasons[i]})" if reasons else i for i in ids[:20])
        print(f"rl: {len(ids)} prompts {what} skipped: {named}{' ...' if len(ids) > 20 else ''}", flush=True)


def load_prompts(cfg, cache_dir: Optional[Path] = None, name: str = "train") -> PromptSet:
    """``data.train`` minus the prompts no step could use (module docstring); each skipped id
    is logged. ``cache_dir``: where the verdicts are cached (None, or ``rl.prompt_cache``
    false: checked every time); ``name``: the entry's name there (the training or held-out set)."""
    from avar_ray.data import sources
    from avar_ray.data.readers import DataKeys, read_samples

    rl, path = cfg.rl, cfg.data.train
    if not sources.exists(path):
        raise FileNotFoundError(f"data.train: no training data at {path} (write procedural data with "
                                "`avar make-data -c CONFIG`)")
    start = time.perf_counter()
    samples, read = read_samples(path, keys=DataKeys.of(cfg.data))
    require_images(samples)
    prompts = PromptSet([], str(path), bad_rows=read.skipped)
    verdicts, entry, inputs = None, None, None
    if cache_dir is not None and rl.prompt_cache and Path(cfg.model.path).is_dir():
        inputs = cache_inputs(cfg, sources.data_files(path))
        entry = Path(cache_dir) / f"{name}-{_key(inputs)}.json"
        verdicts = _read_cache(entry, samples)
        prompts.cache = "miss" if verdicts is None else "hit"
    if verdicts is None:
        verdicts = check_all(samples, Check.of(cfg), rl.prompt_workers)
        prompts.checked = len(samples)
        if entry is not None:
            _write_cache(entry, inputs, samples, verdicts)
    unreadable = {}
    for sample, v in zip(samples, verdicts):
        if v == OK:
            prompts.samples.append(sample)
        elif v == TOO_MANY_IMAGES:
            prompts.too_many_images += 1
        elif v == TOO_LARGE:
            prompts.too_large.append(sample.id)
        elif v == TOO_LONG:
            prompts.too_long.append(sample.id)
        else:
            prompts.unreadable.append(sample.id)
            unreadable[sample.id] = v.removeprefix(f"{UNREADABLE}: ")
    prompts.check_s = time.perf_counter() - start
    if read.bad_rows:
        named = ", ".join(f"{file} row {row} ({why})" for file, row, why in read.bad_rows[:5])
        print(f"rl: {read.skipped} bad rows skipped: {named}{' ...' if read.skipped > 5 else ''}", flush=True)
    _report(prompts, "longer than model.max_model_len - rl.max_new_tokens", prompts.too_long)
    _report(prompts, "with an image over rl.max_image_pixels", prompts.too_large)
    _report(prompts, "the processor could not read", prompts.unreadable, unreadable)
    if not prompts.samples:
        first = next(iter(unreadable.values()), "")
        raise ValueError(f"data.train: {prompts.summary()}: nothing to train on" + (f" (e.g. {first})" if first else ""))
    return prompts
