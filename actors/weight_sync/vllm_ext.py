"""The receiving end inside vLLM: a ``worker_extension_cls`` whose methods run in every
engine worker through ``llm.collective_rpc(name, args=...)``, and the ``engine_*`` functions
that make those calls (the one implementation the rollout workers and the bench/tests use).

Streaming: every sync is ONE ``reload_weights`` call whose weights iterator yields tensors as
buckets arrive. vLLM's layerwise reload keeps the tensors of a layer until the layer is
complete, then materialises, repacks and copies it (the CPU backend repacks linear weights
after start-up, which is why a plain ``load_weights`` fails there), and frees them. Two reload
calls per sync would not do: the layer that straddles a bucket boundary would be processed
half-loaded by the first call. So what is buffered at any time is the bucket in hand (plus at
most one queued), and the tensors of the layers not yet complete, in parameter order at most
one or two (q/k/v or gate/up packed into one vLLM layer).

* broadcast (gloo/nccl): the RPC itself runs the reload; its iterator receives bucket k from
  the group when the loader asks for it.
* object store: one RPC per bucket (bytes: tensors cannot travel as RPC arguments). The reload
  runs in a thread of the worker fed by a queue of two buckets; ``avar_finish_weight_update``
  ends the stream and waits for it. The engine is idle meanwhile (the driver does not sample
  during a sync), so the thread and the engine loop do not race.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Iterable, Iterator

import torch

from actors.weight_sync.broadcast import make_weight_group, receive_broadcast
from actors.weight_sync.buckets import WeightHandle, fetch_buckets, unpack_bucket

_END = object()
# what a ``vllm.LLM`` is built with (``worker_extension_cls``) to receive weights
EXTENSION = "actors.weight_sync.VLLMWeightExtension"


def loader_state(model: torch.nn.Module) -> tuple[int, int]:
    """(layers already reloaded, bytes held for layers still incomplete) in the middle of a
    layerwise reload; read from vLLM's bookkeeping (``LAYERWISE_INFO``)."""
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    done, held = 0, 0
    for module in model.modules():
        info = LAYERWISE_INFO.get(module)
        if info is None or not any(True for _ in module.parameters(recurse=False)):
            continue
        if not info.can_load():
            done += 1
        elif info.load_numel:
            held += sum(v.numel() * v.element_size() for _, args in info.loaded_weights
                        for v in args.arguments.values() if isinstance(v, torch.Tensor) and v.device.type != "meta")
    return done, held


class _Meter:
    """What a sync did on this receiver: buckets, bytes, the most it held at once, and how many
    layers were already reloaded when the last bucket arrived (> 0: loading as they arrive)."""

    def __init__(self, model):
        self.model, self.start = model, time.perf_counter()
        self.buckets = self.bytes = self.peak_held = self.layers_done_before_last = self.tensors = 0

    def arrived(self, bucket_bytes: int, queued_bytes: int = 0) -> None:
        done, held = loader_state(self.model)
        self.layers_done_before_last = done
        self.buckets += 1
        self.bytes += bucket_bytes
        self.peak_held = max(self.peak_held, held + bucket_bytes + queued_bytes)

    def stats(self) -> dict:
        return {"buckets": self.buckets, "bytes": self.bytes, "tensors": self.tensors, "peak_held_bytes": self.peak_held,
                "layers_done_before_last_bucket": self.layers_done_before_last,
                "load_s": time.perf_counter() - self.start}


class _ObjectStoreStream:
    """One reload in a worker thread, fed bucket bytes through a small queue."""

    def __init__(self, worker):
        self.worker, self.meter = worker, _Meter(worker.model_runner.get_model())
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.queued_bytes = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="avar-weight-reload", daemon=True)
        self.thread.start()

    def _tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        while (data := self.queue.get()) is not _END:
            self.queued_bytes -= len(data)
            tensors = unpack_bucket(data)
            self.meter.arrived(sum(t.numel() * t.element_size() for t in tensors.values()), self.queued_bytes)
            del data
            self.meter.tensors += len(tensors)
            yield from tensors.items()

    def _run(self) -> None:
        try:
            _reload(self.worker, self._tensors())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller in finish()
            self.error = exc

    def put(self, data) -> None:
        data = bytes(data)
        while self.thread.is_alive():  # a reload that failed stops taking buckets
            try:
                self.queued_bytes += len(data)
                self.queue.put(data, timeout=1.0)
                return
            except queue.Full:
                self.queued_bytes -= len(data)
        self.finish()  # raises the reload's error
        raise RuntimeError("weight sync: the streaming reload ended before its last bucket")

    def finish(self) -> dict:
        if self.thread.is_alive():
            self.queue.put(_END)
            self.thread.join()
        if self.error is not None:
            raise RuntimeError(f"weight sync: the streaming reload failed: {self.error!r}") from self.error
        return self.meter.stats()


def _reload(worker, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    worker.reload_weights(weights_iterator=iter(tensors), is_checkpoint_format=True)
    refresh_tied_heads(worker.model_runner.get_model())


class VLLMWeightExtension:
    """Mixed into every vLLM worker (``worker_extension_cls``)."""

    # ---- object store: begin, one call per bucket, finish
    def avar_begin_weight_update(self) -> None:
        self._avar_stream = _ObjectStoreStream(self)

    def avar_receive_weight_buckets(self, buckets: list) -> int:
        for data in buckets:
            self._avar_stream.put(data)
        return self._avar_stream.meter.buckets

    def avar_finish_weight_update(self) -> dict:
        stream, self._avar_stream = self._avar_stream, None
        return stream.finish()

    # ---- broadcast: rank = the engine's rank offset + this worker's tensor-parallel rank
    def avar_init_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str,
                               timeout_s: float | None = None) -> int:
        from vllm.distributed import get_tensor_model_parallel_rank

        rank += get_tensor_model_parallel_rank()
        self._avar_group = None  # the previous group (if any) goes first: its sockets close
        self._avar_group = make_weight_group(host, port, rank, world_size, backend, timeout_s)
        return rank

    def avar_receive_weight_broadcast(self, names: list, shapes: list) -> dict:
        from actors.weight_sync.buckets import WeightHandle

        meter = _Meter(self.model_runner.get_model())
        handle = WeightHandle(0, "broadcast", names=names, shapes=shapes)

        def tensors():
            for bucket in receive_broadcast(self._avar_group, handle, self.model_runner.device):
                meter.arrived(sum(t.numel() * t.element_size() for _, t in bucket))
                meter.tensors += len(bucket)
                yield from bucket

        try:
            _reload(self, tensors())
        except BaseException:
            # A member died mid-broadcast. Leave the group (closing its sockets fails the peers
            # still waiting on this rank at once) and vLLM's reload bookkeeping finished, so the
            # next full reload starts clean: the layers not reloaded get their old tensors back,
            # the half-received ones hold garbage until then (the driver redoes the sync before
            # any sampling).
            self._avar_group = None
            from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

            finalize_layerwise_reload(self.model_runner.get_model(), self.model_runner.model_config)
            raise
        return meter.stats()


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


# ---- the caller side: what the process holding the ``vllm.LLM`` (a rollout worker, the bench
# and tests' receiver) calls; each load returns the receiving worker's statistics (``_Meter``).
def _first(results: list) -> dict:
    return results[0]  # every tensor-parallel worker loads the same buckets; rank 0 speaks for them


def engine_update_object_store(llm, handle: WeightHandle) -> dict:
    """Stream ``handle``'s buckets into the engine, one RPC per bucket (the next bucket is
    fetched while the engine loads the last one)."""
    llm.collective_rpc("avar_begin_weight_update")
    for data in fetch_buckets(handle):
        llm.collective_rpc("avar_receive_weight_buckets", args=([data],))
    return _first(llm.collective_rpc("avar_finish_weight_update"))


def engine_join_group(llm, host: str, port: int, rank_offset: int, world_size: int, backend: str,
                      timeout_s: float | None = None) -> list[int]:
    """Every worker of the engine joins the broadcast group at ``rank_offset + its TP rank``."""
    return llm.collective_rpc("avar_init_weight_group", args=(host, port, rank_offset, world_size, backend,
                                                              timeout_s))


def engine_receive_broadcast(llm, handle: WeightHandle) -> dict:
    return _first(llm.collective_rpc("avar_receive_weight_broadcast", args=(handle.names, handle.shapes)))


def reset_engine_caches(llm) -> None:
    """After every update: stale vision embeddings, or an "Encoder cache miss" that kills the
    engine, otherwise (ARCHITECTURE.md)."""
    llm.llm_engine.reset_encoder_cache()
    llm.reset_prefix_cache()
