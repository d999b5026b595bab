"""Buckets: parameter tensors grouped in order into pieces of about ``bucket_mb`` MiB (pure
packing), and the object-store transport built on them (``ray.put`` once per bucket, every
receiver reads the same objects)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

MIB = 1024 * 1024


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def bucket_names(sizes: Iterable[tuple[str, int]], bucket_bytes: int) -> list[list[str]]:
    """Group parameter names, in order, into buckets of at most ``bucket_bytes`` (a tensor larger
    than a bucket gets one of its own). Keeping the order keeps a layer's tensors together, so
    a streaming receiver completes (and frees) each layer soon after its bucket arrives."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size must be positive, got {bucket_bytes} bytes")
    buckets: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, size in sizes:
        if current and used + size > bucket_bytes:
            buckets.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        buckets.append(current)
    return buckets


def pack_bucket(tensors: dict[str, torch.Tensor]) -> bytes:
    """safetensors bytes of one bucket (tensors are copied to contiguous CPU memory). Bytes,
    because tensors cannot travel as vLLM ``collective_rpc`` arguments."""
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


def unpack_bucket(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(bytes(data))


def iter_buckets(buckets: Iterable[bytes]) -> Iterator[tuple[str, torch.Tensor]]:
    for data in buckets:
        yield from unpack_bucket(data).items()


def trainable_only(named: Iterable[tuple[str, torch.nn.Parameter]]) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """The weight filter: only parameters that train move (``rl.freeze_vision`` leaves the
    vision tower out; the engines keep the copy they started with, which is the same)."""
    return ((n, p) for n, p in named if p.requires_grad)


@dataclass
class WeightHandle:
    """What a receiver needs to load one version of the policy.

    ``backend`` "object_store": ``refs`` are Ray object refs of bucket bytes, put once by the
    sender; keeping the handle alive keeps the objects alive, so a restarted receiver can read
    them. "gloo"/"nccl": ``names`` and ``shapes`` per bucket are the receivers' recipe for the
    broadcast (nothing in the object store)."""

    version: int
    backend: str
    refs: list = field(default_factory=list)
    names: list[list[str]] = field(default_factory=list)
    shapes: list[list[tuple[list[int], str]]] = field(default_factory=list)
    total_bytes: int = 0
    bucket_bytes: int = 0

    @property
    def num_buckets(self) -> int:
        return len(self.refs) if self.backend == "object_store" else len(self.names)


def publish_object_store(named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
                         bucket_mb: float, keep: Callable[[str], bool] | None = None) -> WeightHandle:
    """Pack ``named_tensors`` into buckets and ``ray.put`` each once (the sender). ``keep``
    filters by name (e.g. the trainable names; see ``trainable_only``)."""
    import ray

    bucket_bytes = int(bucket_mb * MIB)
    refs, names, total = [], [], 0
    current: dict[str, torch.Tensor] = {}
    used = 0
    for name, tensor in named_tensors:
        if keep is not None and not keep(name):
            continue
        size = tensor_nbytes(tensor)
        if current and used + size > bucket_bytes:
            refs.append(ray.put(pack_bucket(current)))
            names.append(list(current))
            current, used = {}, 0
        current[name] = tensor
        used += size
        total += size
    if current:
        refs.append(ray.put(pack_bucket(current)))
        names.append(list(current))
    return WeightHandle(version, "object_store", refs=refs, names=names, total_bytes=total, bucket_bytes=bucket_bytes)


def fetch_buckets(handle: WeightHandle) -> Iterator[bytes]:
    """The handle's bucket bytes, one at a time (a receiver holds one bucket, not the model)."""
    import ray

    for ref in handle.refs:
        yield ray.get(ref)


def load_into_module(module: torch.nn.Module, named: Iterable[tuple[str, torch.Tensor]],
                     partial: bool = False) -> int:
    """Copy tensors into an HF module's parameters by name. Unless ``partial`` (a filtered
    sync), every parameter must be covered, so a renamed or missing weight fails loudly instead
    of computing with stale weights. Returns the number of tensors copied."""
    params = dict(module.named_parameters())
    seen = set()
    with torch.no_grad():
        for name, tensor in named:
            if name not in params:
                raise KeyError(f"weight sync: parameter {name!r} does not exist in {type(module).__name__}")
            params[name].copy_(tensor.to(params[name].dtype))
            seen.add(name)
    missing = set(params) - seen
    if missing and not partial:
        raise KeyError(f"weight sync: {len(missing)} parameters not sent, e.g. {sorted(missing)[:3]}")
    return len(seen)
