"""The weight-sync engine: the driver's one interface (``WeightSync.sync(version)``) over the
two transports.

* ``object_store``: the senders publish every bucket once (``ray.put``), every receiver reads
  the same objects and streams them into its engine. Works everywhere.
* ``gloo`` / ``nccl`` (broadcast): a persistent process group made once at start-up (learner
  rank 0 = rank 0; engine ``i``'s tensor-parallel rank ``r`` = ``1 + i * tp + r``); each sync is
  one collective per bucket and nothing goes through the object store. A receiver that Ray
  restarted gets the current weights from the object store (published on demand, once per
  version: the only object-store use of this mode), and the group is rebuilt with it before
  the next sync.

Senders are the learner ranks (an object with ``actors``: every rank takes part, ZeRO-3 gathers
are collectives) with ``address``, ``publish_weights``, ``init_weight_group``, ``weight_table``
and ``broadcast_weights``; receivers are a pool (``actors``, ``restarts``, ``handle``) whose
actors have ``update_weights``, ``init_weight_group`` and ``receive_broadcast``.
"""
from __future__ import annotations

import logging
import time

from actors.weight_sync.buckets import WeightHandle

log = logging.getLogger(__name__)
BACKENDS = ("object_store", "gloo", "nccl")


class WeightSync:
    def __init__(self, senders, pool, backend: str, bucket_mb: float, tensor_parallel_size: int = 1):
        if backend not in BACKENDS:
            raise ValueError(f"weight sync backend must be one of {BACKENDS}, got {backend!r}")
        if tensor_parallel_size < 1:
            raise ValueError(f"rollout tensor parallel size must be >= 1, got {tensor_parallel_size}")
        self.senders, self.pool, self.backend = senders, pool, backend
        self.bucket_mb, self.tp = bucket_mb, tensor_parallel_size
        self.version = 0
        self.cold_publishes = 0
        self.group_builds = 0
        self._cold: WeightHandle | None = None
        self.last_handle: WeightHandle | None = None
        self._restarts_at_group = None
        if self.broadcast:
            self._build_group()

    @property
    def broadcast(self) -> bool:
        return self.backend != "object_store"

    # ------------------------------------------------------------------ broadcast group
    def _build_group(self) -> None:
        import ray

        from actors.placement import broadcast_ranks

        host, port, _ = ray.get(self.senders.actors[0].address.remote())
        offsets, world = broadcast_ranks(len(self.pool.actors), self.tp)
        # Every member blocks in the rendezvous until all have joined: start them together.
        ray.get([a.init_weight_group.remote(host, port, world, self.backend) for a in self.senders.actors]
                + [w.init_weight_group.remote(host, port, rank, world, self.backend)
                   for w, rank in zip(self.pool.actors, offsets)])
        self._restarts_at_group = getattr(self.pool, "restarts", 0)
        self.group_builds += 1

    def _group_stale(self) -> bool:
        return getattr(self.pool, "restarts", 0) != self._restarts_at_group

    # ------------------------------------------------------------------ cold receivers
    def cold_handle(self) -> WeightHandle:
        """The current weights in the object store, for a receiver that (re)started cold;
        published at most once per version."""
        if self._cold is None or self._cold.version != self.version:
            self._cold = self._publish(self.version)
            self.cold_publishes += 1
        return self._cold

    def _publish(self, version: int) -> WeightHandle:
        import ray

        return ray.get([a.publish_weights.remote(version, self.bucket_mb) for a in self.senders.actors])[0]

    # ------------------------------------------------------------------ one sync
    def sync(self, version: int) -> dict:
        """Learner weights -> every receiver as ``version``; returns the sync's metrics."""
        import ray

        start = time.perf_counter()
        rebuilt = 0
        if not self.broadcast:
            handle = self._publish(version)
            publish_s = time.perf_counter() - start
            load_s = self.pool.update_weights(handle)  # the pool keeps it for restarted actors
        else:
            if self._group_stale():
                log.warning("weight sync: a receiver restarted; rebuilding the broadcast group")
                self._build_group()
                rebuilt = 1
            handle = ray.get(self.senders.actors[0].weight_table.remote(version, self.bucket_mb))
            publish_s = time.perf_counter() - start
            sends = [a.broadcast_weights.remote(handle) for a in self.senders.actors]
            loads = [w.receive_broadcast.remote(handle) for w in self.pool.actors]
            ray.get(sends)
            load_s = max(ray.get(loads), default=0.0)
            self._cold = None
            # A receiver Ray restarts before the next sync loads the current weights from here.
            self.pool.handle = self.cold_handle
        self.version, self.last_handle = version, handle
        return {"sync/s": time.perf_counter() - start, "sync/publish_s": publish_s, "sync/load_s": load_s,
                "sync/buckets": handle.num_buckets, "sync/mb": handle.total_bytes / 2**20,
                "sync/broadcast": int(self.broadcast), "sync/group_rebuilt": rebuilt,
                "sync/cold_publishes": self.cold_publishes}
