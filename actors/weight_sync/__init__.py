"""Weight sync from the learner group to the rollout engines (design and benchmark:
``actors/WEIGHT_SYNC.md``).

``WeightSync`` is the one interface (``engine.py``); the transports are the object store
(``buckets.py``) and a persistent gloo/nccl broadcast group (``broadcast.py``); the receiving
end inside vLLM streams the buckets into one reload (``vllm_ext.py``). The names below are the
package's public API; ``BroadcastWeightSync`` keeps the former broadcast-only API working.
"""
from __future__ import annotations

from actors.weight_sync.broadcast import (broadcast_bucket, broadcast_table, make_weight_group, receive_broadcast,
                                          send_broadcast)
from actors.weight_sync.buckets import (MIB, WeightHandle, bucket_names, fetch_buckets, iter_buckets,
                                        load_into_module, pack_bucket, publish_object_store, tensor_nbytes,
                                        trainable_only, unpack_bucket)
from actors.weight_sync.engine import BACKENDS, WeightSync
from actors.weight_sync.vllm_ext import VLLMWeightExtension, refresh_tied_heads


class _Receivers:
    """A fixed list of receivers seen as a pool (no restarts)."""

    def __init__(self, actors: list):
        self.actors, self.restarts, self.handle = list(actors), 0, None


class BroadcastWeightSync:
    """The former broadcast-only API: a broadcast ``WeightSync`` over a list of receivers;
    ``sync`` returns the table handle and the slowest receiver's seconds."""

    def __init__(self, learners, receivers: list, backend: str = "nccl"):
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"weight broadcast backend must be 'nccl' or 'gloo', got {backend!r}")
        self.engine = WeightSync(learners, _Receivers(receivers), backend, bucket_mb=64.0)

    def sync(self, version: int, bucket_mb: float) -> tuple[WeightHandle, float]:
        self.engine.bucket_mb = bucket_mb
        metrics = self.engine.sync(version)
        return self.engine.last_handle, metrics["sync/load_s"]


__all__ = ["BACKENDS", "MIB", "BroadcastWeightSync", "VLLMWeightExtension", "WeightHandle", "WeightSync",
           "broadcast_bucket", "broadcast_table", "bucket_names", "fetch_buckets", "iter_buckets", "load_into_module",
           "make_weight_group", "pack_bucket", "publish_object_store", "receive_broadcast", "refresh_tied_heads",
           "send_broadcast", "tensor_nbytes", "trainable_only", "unpack_bucket"]
