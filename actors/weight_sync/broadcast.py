"""The broadcast transport: a process group of its own (sender = rank 0, every engine rank
after it), one collective per bucket as a flat byte buffer. ``nccl`` between GPUs; the same
code over ``gloo`` on CPU, which is how the tests run it here."""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch

from actors.weight_sync.buckets import WeightHandle, bucket_names


def make_weight_group(host: str, port: int, rank: int, world_size: int, backend: str,
                      timeout_s: float | None = None):
    """A process group apart from DeepSpeed's and vLLM's default groups: a TCPStore plus the
    backend's c10d process group class. Created once per run (persistent), rebuilt only when a
    member restarts (a restarted process cannot rejoin a finished rendezvous) or died during a
    broadcast. ``timeout_s`` bounds the rendezvous and every collective (a peer alive but
    never answering); a peer whose process died fails gloo's collectives at once (its socket
    closes). NCCL: the same timeout, then its watchdog (untested here)."""
    from datetime import timedelta

    from torch.distributed import PrefixStore, TCPStore

    timeout = timedelta(seconds=group_timeout_s(timeout_s))
    store = PrefixStore("avar-weights", TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timeout))
    if backend == "nccl":
        from torch.distributed import ProcessGroupNCCL

        options = ProcessGroupNCCL.Options()
        options._timeout = timeout
        return ProcessGroupNCCL(store, rank, world_size, options)
    if backend != "gloo":
        raise ValueError(f"weight broadcast backend must be 'nccl' or 'gloo', got {backend!r}")
    from torch.distributed import ProcessGroupGloo

    return ProcessGroupGloo(store, rank, world_size, timeout)


def group_timeout_s(timeout_s: float | None) -> float:
    """``timeout_s``, or ``rl.weight_sync_timeout_s``'s default."""
    from avar_ray.config import RLConfig

    return float(RLConfig.weight_sync_timeout_s if timeout_s is None else timeout_s)


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.replace("torch.", ""))


def _nbytes(shape, dtype: torch.dtype) -> int:
    return int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()


def broadcast_bucket(group, tensors: list[torch.Tensor] | None, shapes: list, device) -> list[torch.Tensor]:
    """Broadcast one bucket from rank 0 as a single flat byte buffer (one collective per
    bucket, not per parameter); receivers pass ``tensors=None`` and get the tensors back
    (views into one buffer: nothing is copied again on the receiver)."""
    from torch.distributed import BroadcastOptions

    sizes = [_nbytes(shape, _dtype(dt)) for shape, dt in shapes]
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


def broadcast_table(entries: Iterable[tuple[str, Sequence[int], torch.dtype]], bucket_bytes: int,
                    version: int, backend: str) -> WeightHandle:
    """The receivers' recipe for one broadcast sync: names and (shape, dtype) per bucket, from
    ``(name, full shape, dtype)`` in parameter order (pure: no tensor needed; filter the
    entries first to move only trainable weights)."""
    entries = [(n, list(shape), dtype) for n, shape, dtype in entries]
    sizes = [(n, _nbytes(shape, dt)) for n, shape, dt in entries]
    names = bucket_names(sizes, bucket_bytes)
    lookup = {n: (shape, str(dt)) for n, shape, dt in entries}
    shapes = [[lookup[n] for n in bucket] for bucket in names]
    return WeightHandle(version, backend, names=names, shapes=shapes, total_bytes=sum(size for _, size in sizes),
                        bucket_bytes=bucket_bytes)


def send_broadcast(group, named: Iterable[tuple[str, torch.Tensor]], handle: WeightHandle, device) -> int:
    """The sender's side: broadcast each bucket of ``handle`` as soon as its tensors came out
    of ``named`` (names not in the table are skipped: the filter). Returns bytes sent."""
    wanted = {n for bucket in handle.names for n in bucket}
    bucket, pending, sent = 0, [], 0
    for name, tensor in named:
        if name not in wanted:
            continue
        expected = handle.names[bucket][len(pending)]
        if name != expected:
            raise RuntimeError(f"weight broadcast: parameter {name!r} where the table has {expected!r}")
        pending.append(tensor)
        if len(pending) == len(handle.names[bucket]):
            sent += sum(t.numel() * t.element_size() for t in broadcast_bucket(group, pending, handle.shapes[bucket],
                                                                               device))
            bucket, pending = bucket + 1, []
    if bucket != handle.num_buckets:
        raise RuntimeError(f"weight broadcast: sent {bucket} of {handle.num_buckets} buckets (parameters missing)")
    return sent


def receive_broadcast(group, handle: WeightHandle, device) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The receivers' side: one bucket's ``(name, tensor)`` pairs per step, each received only
    when asked for (a consumer that loads as it iterates holds one bucket at a time)."""
    for names, shapes in zip(handle.names, handle.shapes):
        yield list(zip(names, broadcast_bucket(group, None, shapes, device)))
