"""The weight-sync engine: the driver's one interface (``WeightSync.sync(version)``) over the
two transports.

* ``object_store``: the senders publish every bucket once (``ray.put``), every receiver reads
  the same objects and streams them into its engine. Works everywhere.
* ``gloo`` / ``nccl`` (broadcast): a persistent process group made once at start-up (learner
  rank 0 = rank 0; engine ``i``'s tensor-parallel rank ``r`` = ``1 + i * tp + r``); each sync is
  one collective per bucket and nothing goes through the object store. A receiver that Ray
  restarted gets the current weights from the object store (published on demand, once per
  version: the only object-store use of this mode), and the group is rebuilt with it before
  the next sync. A receiver that dies DURING a broadcast: the driver waits for the others (the
  sender's collective fails when the peer's socket closes, or at the group's timeout), Ray's
  restart of the dead one is awaited, the group is rebuilt with every member and the broadcast
  redone (``sync/redone``); a learner rank that died is raised as is (the learner recovery).

Senders are the learner ranks (an object with ``actors``: every rank takes part, ZeRO-3 gathers
are collectives) with ``address``, ``publish_weights``, ``init_weight_group``, ``weight_table``
and ``broadcast_weights``; receivers are a pool (``actors``, ``restarts``, ``handle``) whose
actors have ``update_weights``, ``init_weight_group`` and ``receive_broadcast``; the pool's
``revive(indices)`` waits until Ray restarted those actors.
"""
from __future__ import annotations

import logging
import time

from actors.weight_sync.broadcast import group_timeout_s
from actors.weight_sync.buckets import WeightHandle

log = logging.getLogger(__name__)
BACKENDS = ("object_store", "gloo", "nccl")
# After one member of a broadcast failed, how much longer than the group's own timeout the
# driver waits for the others to fail or finish before it gives up on them.
_SETTLE_MARGIN_S = 30.0


class WeightSync:
    def __init__(self, senders, pool, backend: str, bucket_mb: float, tensor_parallel_size: int = 1,
                 timeout_s: float | None = None):
        """``timeout_s``: the broadcast group's timeout (``rl.weight_sync_timeout_s``; None: that
        key's default, and the members' ``init_weight_group`` is called without it)."""
        if backend not in BACKENDS:
            raise ValueError(f"weight sync backend must be one of {BACKENDS}, got {backend!r}")
        if tensor_parallel_size < 1:
            raise ValueError(f"rollout tensor parallel size must be >= 1, got {tensor_parallel_size}")
        self.senders, self.pool, self.backend = senders, pool, backend
        self.bucket_mb, self.tp, self.timeout_s = bucket_mb, tensor_parallel_size, timeout_s
        self._wait_s = group_timeout_s(timeout_s) + _SETTLE_MARGIN_S
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
        """A fresh group (new rendezvous port) with every member; a member's previous group,
        broken or not, is dropped when it joins this one."""
        import ray

        from actors.placement import broadcast_ranks

        host, port, _ = ray.get(self.senders.actors[0].address.remote())
        offsets, world = broadcast_ranks(len(self.pool.actors), self.tp)
        extra = () if self.timeout_s is None else (self.timeout_s,)
        # Every member blocks in the rendezvous until all have joined: start them together.
        ray.get([a.init_weight_group.remote(host, port, world, self.backend, *extra) for a in self.senders.actors]
                + [w.init_weight_group.remote(host, port, rank, world, self.backend, *extra)
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
        start = time.perf_counter()
        rebuilt = redone = 0
        if not self.broadcast:
            handle = self._publish(version)
            publish_s = time.perf_counter() - start
            load_s = self.pool.update_weights(handle)  # the pool keeps it for restarted actors
        else:
            attempts = getattr(self.pool, "max_attempts", 3)
            for attempt in range(1, attempts + 1):
                if self._group_stale():
                    log.warning("weight sync: a receiver restarted; rebuilding the broadcast group")
                    self._build_group()
                    rebuilt += 1
                handle = self._table(version)
                publish_s = time.perf_counter() - start
                load_s, dead = self._broadcast(handle)
                if not dead:
                    break
                if attempt == attempts:
                    raise RuntimeError(f"weight sync: receivers {dead} died in each of {attempts} broadcasts of "
                                       f"version {version}; giving up")
                log.warning("weight sync: receivers %s died during the broadcast of version %d; waiting for their "
                            "restart, then a new group and the broadcast again (attempt %d of %d)", dead, version,
                            attempt + 1, attempts)
                self.pool.revive(dead)  # counts the restarts: the group is stale now
                redone += 1
            self._cold = None
            # A receiver Ray restarts before the next sync loads the current weights from here.
            self.pool.handle = self.cold_handle
        self.version, self.last_handle = version, handle
        return {"sync/s": time.perf_counter() - start, "sync/publish_s": publish_s, "sync/load_s": load_s,
                "sync/buckets": handle.num_buckets, "sync/mb": handle.total_bytes / 2**20,
                "sync/broadcast": int(self.broadcast), "sync/group_rebuilt": rebuilt, "sync/redone": redone,
                "sync/cold_publishes": self.cold_publishes}

    def _table(self, version: int) -> WeightHandle:
        import ray

        return ray.get(self.senders.actors[0].weight_table.remote(version, self.bucket_mb))

    def _broadcast(self, handle: WeightHandle) -> tuple[float, list[int]]:
        """One broadcast: (the slowest receiver's load seconds, indices of receivers that died).

        Nothing is waited on forever: once any member failed, the others get the group's
        timeout (plus a margin) to fail or finish; a receiver still stuck after that is killed
        (Ray restarts it) and counted dead. A learner that died, or is still stuck, is raised:
        that is the learner recovery's case (``RLSystem.learner_died``)."""
        import ray

        from actors.recovery import actor_death_errors

        deaths = actor_death_errors()
        sends = [a.broadcast_weights.remote(handle) for a in self.senders.actors]
        loads = [w.receive_broadcast.remote(handle) for w in self.pool.actors]
        results, errors, pending = {}, {}, sends + loads
        deadline = None
        while pending:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=wait)
            if not ready:
                break  # past the deadline: what is left is stuck
            try:
                results[ready[0]] = ray.get(ready[0])
            except Exception as exc:  # noqa: BLE001 - sorted out below
                errors[ready[0]] = exc
                if deadline is None:
                    deadline = time.monotonic() + self._wait_s
        for ref in sends:
            if isinstance(errors.get(ref), deaths):
                raise errors[ref]
        if any(ref in pending for ref in sends):
            raise RuntimeError("weight sync: a learner rank still in the broadcast after a member failed "
                               f"({next(iter(errors.values()))!r})")
        dead = [i for i, ref in enumerate(loads) if isinstance(errors.get(ref), deaths) or ref in pending]
        for i in dead:
            if loads[i] in pending:
                log.warning("weight sync: receiver %d still in the broken broadcast; killing it for a restart", i)
                ray.kill(self.pool.actors[i], no_restart=False)
        if errors and not dead:
            raise next(iter(errors.values()))  # nobody died: a real failure, not a casualty of one
        for ref, exc in errors.items():
            if not isinstance(exc, deaths):
                log.warning("weight sync: a member left the broken broadcast: %s", str(exc).splitlines()[-1][:300])
        return max((results[ref] for ref in loads if ref in results), default=0.0), dead
