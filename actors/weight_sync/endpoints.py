"""The two ends as plain building blocks (bench, tests).

``ModuleSender``: the sender protocol of ``WeightSync`` over one in-memory module in one
process (one rank): the benchmark and the tests drive the engine with it; the learner group
implements the same methods over DeepSpeed ranks. ``EngineReceiver``: the receiver protocol
over one vLLM engine, through the same ``vllm_ext.engine_*`` calls as the rollout workers."""
from __future__ import annotations

import time
from typing import Optional

import torch

from actors.weight_sync.broadcast import broadcast_table, make_weight_group, send_broadcast
from actors.weight_sync.buckets import MIB, WeightHandle, publish_object_store
from actors.weight_sync.vllm_ext import (EXTENSION, engine_join_group, engine_receive_broadcast,
                                         engine_update_object_store, reset_engine_caches)


class ModuleSender:
    """Sends ``module``'s parameters (only ``requires_grad`` ones if ``trainable_only``)."""

    def __init__(self, module: torch.nn.Module, trainable_only: bool = False):
        self.module, self.trainable_only = module, trainable_only
        self._group, self._backend = None, None

    def named(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, p.detach()) for n, p in self.module.named_parameters()
                if p.requires_grad or not self.trainable_only]

    def address(self) -> tuple[str, int, str]:
        from avar_ray.ray_utils import free_port

        return "127.0.0.1", free_port(), ""

    def init_weight_group(self, host: str, port: int, world_size: int, backend: str,
                          timeout_s: float | None = None) -> None:
        self._group = None  # the previous group's sockets close first
        self._group, self._backend = make_weight_group(host, port, 0, world_size, backend, timeout_s), backend

    def publish_weights(self, version: int, bucket_mb: float) -> WeightHandle:
        return publish_object_store(self.named(), version, bucket_mb)

    def weight_table(self, version: int, bucket_mb: float) -> WeightHandle:
        return broadcast_table(((n, t.shape, t.dtype) for n, t in self.named()), int(bucket_mb * MIB), version,
                               self._backend)

    def broadcast_weights(self, handle: WeightHandle) -> float:
        start = time.perf_counter()
        send_broadcast(self._group, self.named(), handle, next(self.module.parameters()).device)
        return time.perf_counter() - start


class EngineReceiver:
    """A Ray actor body owning one vLLM engine with the receiving extension: the receiver
    protocol of ``WeightSync`` (what a rollout worker does, without the sampling around it).
    Load methods return seconds; ``last_stats`` the receiving worker's statistics."""

    def __init__(self, model_dir: str, max_model_len: int = 512, gpu_memory_utilization: float = 0.5,
                 **engine_kwargs):
        from avar_ray.config import ModelConfig
        from avar_ray.engines import start_llm

        self.llm = start_llm(ModelConfig(path=model_dir, max_model_len=max_model_len), max_images=1,
                             enforce_eager=True, seed=0, gpu_memory_utilization=gpu_memory_utilization,
                             worker_extension_cls=EXTENSION, **engine_kwargs)
        self.stats: dict = {}

    def ready(self) -> bool:
        return True

    def _loaded(self, stats: dict) -> float:
        reset_engine_caches(self.llm)
        self.stats = stats
        return stats["load_s"]

    def update_weights(self, handle: WeightHandle) -> float:
        return self._loaded(engine_update_object_store(self.llm, handle))

    def init_weight_group(self, host: str, port: int, rank: int, world: int, backend: str,
                          timeout_s: float | None = None) -> list[int]:
        return engine_join_group(self.llm, host, port, rank, world, backend, timeout_s)

    def receive_broadcast(self, handle: WeightHandle) -> float:
        return self._loaded(engine_receive_broadcast(self.llm, handle))

    def last_stats(self) -> dict:
        return self.stats


class ReceiverPool:
    """Receiver actors as ``WeightSync`` sees a rollout pool (``actors``, ``restarts``,
    ``handle``), without the sampling around them (bench, tests)."""

    def __init__(self, actors):
        self.actors, self.restarts, self.handle = actors, 0, None

    def update_weights(self, handle) -> float:
        import ray

        self.handle = handle
        return max(ray.get([a.update_weights.remote(handle) for a in self.actors]))

    def revive(self, indices: list[int]) -> None:
        """Receivers Ray restarted (created with ``max_restarts``): wait until they answer."""
        import ray

        ray.get([self.actors[i].ready.remote() for i in indices])
        self.restarts += len(indices)
