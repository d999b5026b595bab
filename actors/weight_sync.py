"""Weight sync from the learner group to the rollout workers and the reward scorer.

Learner rank 0 packs the full weights into buckets of about ``bucket_mb`` MiB (safetensors
bytes), puts each bucket into the Ray object store once and hands out a ``WeightHandle``
(version + object refs); every receiver reads the same objects. On the vLLM side a worker
extension collects the buckets and loads them with ONE ``model_runner.reload_weights`` call:
the CPU backend repacks linear weights after start-up, so a plain ``load_weights`` fails there,
and a layer split across two reload calls would be half-loaded (ARCHITECTURE.md, verified
recipe). Tensors cannot travel as ``collective_rpc`` arguments; safetensors bytes can.

The ``nccl`` backend (``BroadcastWeightSync``) broadcasts the same buckets over a process group
of its own instead of the object store: learner rank 0 is the source, each rollout engine a
receiver, one collective per bucket. The same code runs with ``gloo`` on CPU, which is how the
tests exercise it here; with ``nccl`` it is UNTESTED on these CPU machines (written for GPU
runs: one engine per rollout worker, tensor parallel size 1). The reward scorer keeps reading
the object store, and a broadcast group cannot take in a restarted engine: restarts need the
object-store backend.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch

MIB = 1024 * 1024


# ----------------------------------------------------------------------------- packing (pure)
def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def bucket_names(sizes: Iterable[tuple[str, int]], bucket_bytes: int) -> list[list[str]]:
    """Group parameter names, in order, into buckets of at most ``bucket_bytes`` (a tensor larger
    than a bucket gets one of its own). Keeping the order keeps a layer's tensors together."""
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
    """safetensors bytes of one bucket (tensors are copied to contiguous CPU memory)."""
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


def unpack_bucket(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(bytes(data))


def iter_buckets(buckets: Iterable[bytes]) -> Iterator[tuple[str, torch.Tensor]]:
    for data in buckets:
        yield from unpack_bucket(data).items()


# ----------------------------------------------------------------------------- handle
@dataclass
class WeightHandle:
    """What a receiver needs to load one version of the policy.

    ``refs`` (object-store backend) are Ray object refs of bucket bytes, put once by learner
    rank 0. Keeping the handle alive keeps the objects alive, so a restarted worker can still
    read the current weights. ``names`` lists the parameter names per bucket (nccl backend:
    the receivers' recipe for the broadcast)."""

    version: int
    backend: str
    refs: list = field(default_factory=list)
    names: list[list[str]] = field(default_factory=list)
    shapes: list[list[tuple[list[int], str]]] = field(default_factory=list)
    total_bytes: int = 0
    bucket_bytes: int = 0
    pack_s: float = 0.0

    @property
    def num_buckets(self) -> int:
        return len(self.refs) if self.backend == "object_store" else len(self.names)


def publish_object_store(named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
                         bucket_mb: float) -> WeightHandle:
    """Pack ``named_tensors`` into buckets and ``ray.put`` each once (learner rank 0)."""
    import ray

    start = time.perf_counter()
    bucket_bytes = int(bucket_mb * MIB)
    refs, names, total = [], [], 0
    current: dict[str, torch.Tensor] = {}
    used = 0
    for name, tensor in named_tensors:
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
    return WeightHandle(version, "object_store", refs=refs, names=names, total_bytes=total, bucket_bytes=bucket_bytes,
                        pack_s=time.perf_counter() - start)


def fetch_buckets(handle: WeightHandle) -> Iterator[bytes]:
    """The handle's bucket bytes, one at a time (a receiver holds one bucket, not the model)."""
    import ray

    for ref in handle.refs:
        yield ray.get(ref)


def load_into_module(module: torch.nn.Module, named: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Copy tensors into an HF module's parameters by name (the reward scorer); every parameter
    must be covered, so a renamed or missing weight fails loudly instead of scoring with stale
    weights. Returns the number of tensors copied."""
    params = dict(module.named_parameters())
    seen = set()
    with torch.no_grad():
        for name, tensor in named:
            if name not in params:
                raise KeyError(f"weight sync: parameter {name!r} does not exist in {type(module).__name__}")
            params[name].copy_(tensor.to(params[name].dtype))
            seen.add(name)
    missing = set(params) - seen
    if missing:
        raise KeyError(f"weight sync: {len(missing)} parameters not sent, e.g. {sorted(missing)[:3]}")
    return len(seen)


# ----------------------------------------------------------------------------- vLLM side
class VLLMWeightExtension:
    """Mixed into every vLLM worker (``worker_extension_cls``); methods run through
    ``llm.collective_rpc(name, args=...)`` inside the engine process.

    Buckets are collected first and loaded by one ``reload_weights`` call at the end, because
    vLLM's layerwise reload processes a layer only once all its tensors arrived."""

    def avar_begin_weight_update(self) -> None:
        self._avar_pending = []

    def avar_receive_weight_buckets(self, buckets: list) -> int:
        self._avar_pending.extend(bytes(b) for b in buckets)
        return len(self._avar_pending)

    def avar_finish_weight_update(self) -> int:
        pending = self._avar_pending
        self._avar_pending = []
        names = []

        def weights():
            for name, tensor in iter_buckets(pending):
                names.append(name)
                yield name, tensor

        self.model_runner.reload_weights(weights_iterator=weights(), is_checkpoint_format=True)
        refresh_tied_heads(self.model_runner.get_model())
        return len(names)

    # ---- nccl/gloo broadcast path (GPU): rank 0 is learner rank 0, ranks 1.. the engines
    def avar_init_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str) -> None:
        self._avar_group = make_weight_group(host, port, rank, world_size, backend)

    def avar_receive_weight_broadcast(self, names: list, shapes: list) -> int:
        device = self.model_runner.device
        tensors = []
        for bucket_names_, bucket_shapes in zip(names, shapes):
            received = broadcast_bucket(self._avar_group, None, bucket_shapes, device)
            tensors.extend(zip(bucket_names_, received))
        self.model_runner.reload_weights(weights_iterator=iter(tensors), is_checkpoint_format=True)
        refresh_tied_heads(self.model_runner.get_model())
        return len(tensors)


def refresh_tied_heads(model: torch.nn.Module) -> int:
    """Re-prepare an LM head tied to the input embedding after a reload.

    vLLM skips ``lm_head.weight`` of a tied model, so the reload never re-processes the head;
    on CPU the head keeps a packed copy of the weight made at start-up (``cpu_linear``) and
    would go on computing logits with the old embedding. Found by the logprob test (diff ~1
    after an update that changed the embedding). Returns the number of heads refreshed."""
    embeddings = {m.weight.data_ptr() for m in model.modules() if type(m).__name__ == "VocabParallelEmbedding"}
    count = 0
    for module in model.modules():
        if type(module).__name__ != "ParallelLMHead" or module.weight.data_ptr() not in embeddings:
            continue
        module.quant_method.process_weights_after_loading(module)
        count += 1
    return count


# ----------------------------------------------------------------------------- broadcast backend
def make_weight_group(host: str, port: int, rank: int, world_size: int, backend: str):
    """A process group of its own (learner rank 0 + the engines), apart from DeepSpeed's and
    vLLM's default groups: a TCPStore plus the backend's c10d process group class."""
    from torch.distributed import PrefixStore, TCPStore

    store = PrefixStore("avar-weights", TCPStore(host, port, world_size, is_master=(rank == 0), timeout=_timeout()))
    if backend == "nccl":
        from torch.distributed import ProcessGroupNCCL

        return ProcessGroupNCCL(store, rank, world_size)
    from torch.distributed import ProcessGroupGloo

    return ProcessGroupGloo(store, rank, world_size)


def _timeout():
    from datetime import timedelta

    return timedelta(minutes=10)


def broadcast_bucket(group, tensors: list[torch.Tensor] | None, shapes: list, device) -> list[torch.Tensor]:
    """Broadcast one bucket from rank 0 as a single flat byte buffer (one collective per
    bucket, not per parameter); receivers pass ``tensors=None`` and get the tensors back."""
    from torch.distributed import BroadcastOptions

    sizes = [int(torch.Size(shape).numel()) * torch.empty((), dtype=_dtype(dt)).element_size() for shape, dt in shapes]
    if tensors is not None:
        flat = torch.cat([t.detach().contiguous().view(-1).view(torch.uint8) for t in tensors]).to(device)
    else:
        flat = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    if flat.numel() != sum(sizes):
        raise ValueError(f"weight broadcast: bucket has {flat.numel()} bytes, its table says {sum(sizes)}")
    opts = BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([flat], opts).wait()
    out, offset = [], 0
    for (shape, dt), size in zip(shapes, sizes):
        out.append(flat[offset:offset + size].view(_dtype(dt)).view(shape))
        offset += size
    return out


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.replace("torch.", ""))


def broadcast_table(entries: Iterable[tuple[str, Sequence[int], torch.dtype]], bucket_bytes: int,
                    version: int, backend: str) -> WeightHandle:
    """The receivers' recipe for one broadcast sync: names and (shape, dtype) per bucket, from
    ``(name, full shape, dtype)`` in parameter order (pure: no tensor needed)."""
    entries = [(n, list(shape), dtype) for n, shape, dtype in entries]
    sizes = [(n, int(torch.Size(shape).numel()) * torch.empty((), dtype=dt).element_size()) for n, shape, dt in entries]
    names = bucket_names(sizes, bucket_bytes)
    lookup = {n: (shape, str(dt)) for n, shape, dt in entries}
    shapes = [[lookup[n] for n in bucket] for bucket in names]
    return WeightHandle(version, backend, names=names, shapes=shapes, total_bytes=sum(size for _, size in sizes),
                        bucket_bytes=bucket_bytes)


class BroadcastWeightSync:
    """The ``nccl`` weight-sync backend, driven from the driver (``gloo`` on CPU).

    ``learners`` is a ``LearnerGroup``; ``receivers`` are rollout-worker actor handles. Every
    sync: rank 0 makes the table (``WeightHandle`` with names/shapes), then all learner ranks
    (ZeRO-3 gathers are collectives) and every receiver enter the bucket broadcasts at once."""

    def __init__(self, learners, receivers: list, backend: str = "nccl"):
        import ray

        if backend not in ("nccl", "gloo"):
            raise ValueError(f"weight broadcast backend must be 'nccl' or 'gloo', got {backend!r}")
        self.learners, self.receivers, self.backend = learners, list(receivers), backend
        host, port, _ = ray.get(learners.actors[0].address.remote())
        world = 1 + len(self.receivers)
        # Every member blocks in the rendezvous until all have joined: start them together.
        ray.get([a.init_weight_group.remote(host, port, world, backend) for a in learners.actors]
                + [w.init_weight_group.remote(host, port, i + 1, world, backend) for i, w in enumerate(self.receivers)])

    def sync(self, version: int, bucket_mb: float) -> tuple[WeightHandle, float]:
        """Broadcast the current weights as ``version``; returns the handle and the slowest
        receiver's seconds."""
        import ray

        handle = ray.get(self.learners.actors[0].weight_table.remote(version, bucket_mb))
        sends = [a.broadcast_weights.remote(handle) for a in self.learners.actors]
        loads = [w.receive_broadcast.remote(handle) for w in self.receivers]
        ray.get(sends)
        return handle, max(ray.get(loads), default=0.0)
