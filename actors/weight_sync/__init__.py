"""Weight sync from the learner group to the rollout engines (design and benchmark:
``actors/WEIGHT_SYNC.md``).

``WeightSync`` is the one interface (``engine.py``); the transports are the object store
(``buckets.py``) and a persistent gloo/nccl broadcast group (``broadcast.py``); the receiving
end inside vLLM streams the buckets into one reload (``vllm_ext.py``). The names below are the
package's public API.
"""
from __future__ import annotations

from actors.weight_sync.broadcast import (broadcast_bucket, broadcast_table, make_weight_group, receive_broadcast,
                                          send_broadcast)
from actors.weight_sync.buckets import (MIB, WeightHandle, bucket_names, fetch_buckets, iter_buckets,
                                        load_into_module, pack_bucket, publish_object_store, tensor_nbytes,
                                        trainable_only, unpack_bucket)
from actors.weight_sync.engine import BACKENDS, WeightSync
from actors.weight_sync.vllm_ext import VLLMWeightExtension, refresh_tied_heads

__all__ = ["BACKENDS", "MIB", "VLLMWeightExtension", "WeightHandle", "WeightSync",
           "broadcast_bucket", "broadcast_table", "bucket_names", "fetch_buckets", "iter_buckets", "load_into_module",
           "make_weight_group", "pack_bucket", "publish_object_store", "receive_broadcast", "refresh_tied_heads",
           "send_broadcast", "tensor_nbytes", "trainable_only", "unpack_bucket"]
