"""The ``cluster:`` section: the GPU cluster a run is planned for (``avar plan`` and the check
every stage command runs before it starts anything; ``avar_ray.plan``). Its own module so that
``avar_ray/config.py`` stays one file of sections it reads everywhere."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ClusterConfig:
    """The cluster the run is planned for (`avar plan`, the stage commands' pre-flight check)."""

    nodes: int = 0  # GPU worker nodes; 0: not described (GPU totals and node packing are not checked)
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0  # per GPU, as the driver reports it (an "80 GB" H100 shows ~79.1 GiB)
    cpus_per_node: int = 0  # recorded (tests/test_placement_cluster.py builds its nodes so); the plan checks GPUs and memory
    host_mem_gib: float = 0.0  # per node; 0: not checked on a GPU cluster (a CPU run checks this machine's)
    # The part of each GPU a role may plan to use: the rest is the CUDA context, NCCL buffers and
    # the allocator's fragmentation, which no formula here counts.
    usable_fraction: float = 0.92
