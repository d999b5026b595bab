"""The actors of an RL run, built from the config: the rollout workers (vLLM), the reward
actor (HF scorer) and the learner group (DeepSpeed), placed as ``rl.placement`` says.

Resources are checked before anything starts (a clear error instead of actors waiting forever
for CPUs that do not exist). The three kinds start at the same time (each start is mostly
waiting on model loads and engine start-up), and a start that fails tears the others down.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from actors.learner import LearnerGroup, LearnerSpec
from actors.placement import check_resources, reward_options, rollout_options
from actors.reward import RewardService, ScorerSpec
from actors.rollout import EngineSpec, RolloutPool, SamplingSpec
from actors.weight_sync import BroadcastWeightSync


def engine_spec(cfg, model_path: str) -> EngineSpec:
    rl = cfg.rl
    return EngineSpec(model_path=model_path, dtype=cfg.model.dtype, max_model_len=cfg.model.max_model_len,
                      max_images=rl.max_images, enforce_eager=rl.enforce_eager,
                      gpu_memory_utilization=rl.gpu_memory_utilization, seed=rl.seed,
                      system_prompt=cfg.model.system_prompt, model=cfg.model)


def scorer_spec(cfg, model_path: str) -> ScorerSpec:
    r = cfg.rl.reward
    return ScorerSpec(model_path=model_path, dtype=cfg.model.dtype, lambda_v=r.lambda_v, lambda_f=r.lambda_f,
                      visual_norm=r.visual_norm, visual_layers=r.visual_layers, eps=r.eps, batch_size=r.batch_size,
                      visual_gate=r.visual_gate, chunk_size=cfg.attention.chunk_size,
                      system_prompt=cfg.model.system_prompt)


def learner_spec(cfg, model_path: str) -> LearnerSpec:
    rl = cfg.rl
    return LearnerSpec(model_path=model_path, dtype=cfg.model.dtype, zero_stage=rl.zero_stage, lr=rl.lr,
                       weight_decay=rl.weight_decay, grad_clip=rl.grad_clip, micro_batch_size=rl.micro_batch_size,
                       share_size=rl.prompts_per_step * rl.n_samples // rl.placement.learners,
                       ppo_epochs=rl.ppo_epochs, clip_ratio=rl.clip_ratio, rollout_n=rl.n_samples,
                       kl_coef=rl.kl_coef, kl_type=rl.kl_type, loss_agg_mode=rl.loss_agg_mode,
                       temperature=rl.temperature, system_prompt=cfg.model.system_prompt, seed=rl.seed,
                       use_gpu=rl.placement.learner_gpus > 0)


def sampling_spec(cfg) -> SamplingSpec:
    rl = cfg.rl
    return SamplingSpec(n=rl.n_samples, max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, top_p=rl.top_p)


class RLSystem:
    """Rollout pool + reward service + learner group, and the weight sync between them."""

    def __init__(self, cfg, model_path: str | Path) -> None:
        import ray

        check_resources(cfg.rl.placement, ray.available_resources())
        path = str(Path(model_path).resolve())
        placement = cfg.rl.placement
        self.bucket_mb = cfg.rl.weight_sync_bucket_mb
        attempts = placement.max_restarts + 1
        start = time.perf_counter()
        builders = {
            "rollout": lambda: RolloutPool(engine_spec(cfg, path), placement.rollout_workers,
                                           rollout_options(placement), attempts),
            "reward": lambda: RewardService(scorer_spec(cfg, path), reward_options(placement), attempts),
            "learners": lambda: LearnerGroup(learner_spec(cfg, path), placement),
        }
        with ThreadPoolExecutor(len(builders)) as pool:
            futures = {name: pool.submit(build) for name, build in builders.items()}
            built, errors = {}, {}
            for name, future in futures.items():
                try:
                    built[name] = future.result()
                except Exception as exc:  # noqa: BLE001 - tear down the others, then re-raise
                    errors[name] = exc
        if errors:
            for part in built.values():
                part.shutdown()
            name, exc = next(iter(errors.items()))
            raise RuntimeError(f"RL start-up: the {name} actors failed to start: {exc}") from exc
        self.rollout, self.reward, self.learners = built["rollout"], built["reward"], built["learners"]
        self.broadcast = None
        if cfg.rl.weight_sync_backend == "nccl":
            # NCCL between GPUs; the same broadcast over gloo when the rollout workers have none
            # (how the CPU tests exercise this path).
            backend = "nccl" if placement.rollout_gpus > 0 and placement.learner_gpus > 0 else "gloo"
            self.broadcast = BroadcastWeightSync(self.learners, self.rollout.actors, backend)
            self._restarts_at_group = self.rollout.restarts
        self.start_s = time.perf_counter() - start

    def _broadcast_usable(self) -> bool:
        """A rollout worker Ray restarted is not a member of the broadcast group (its rendezvous
        is over): from then on every sync goes through the object store."""
        if self.broadcast is not None and self.rollout.restarts != self._restarts_at_group:
            print("weight sync: a rollout worker was restarted and cannot rejoin the broadcast group; "
                  "using the object store from now on", flush=True)
            self.broadcast = None
        return self.broadcast is not None

    def sync_weights(self, version: int) -> dict:
        """Learner weights -> every rollout worker and the reward scorer, in buckets: through the
        object store (put once, every receiver reads the same objects), or with
        ``rl.weight_sync_backend: nccl`` broadcast to the rollout workers while the reward
        scorer still reads the object store. Either way the pools keep the object-store handle,
        which is what a restarted actor loads."""
        t = time.perf_counter()
        handle = self.learners.publish_weights(version, self.bucket_mb)
        publish_s = time.perf_counter() - t
        with ThreadPoolExecutor(2) as pool:  # both receivers load at once
            if self._broadcast_usable():
                self.rollout.handle = handle
                rollout = pool.submit(lambda: self.broadcast.sync(version, self.bucket_mb)[1])
            else:
                rollout = pool.submit(self.rollout.update_weights, handle)
            reward = pool.submit(self.reward.update_weights, handle)
            rollout_s, reward_s = rollout.result(), reward.result()
        return {"sync/publish_s": publish_s, "sync/rollout_load_s": rollout_s, "sync/reward_load_s": reward_s,
                "sync/buckets": handle.num_buckets, "sync/mb": handle.total_bytes / 2**20,
                "sync/broadcast": int(self.broadcast is not None)}

    def restarts(self) -> dict:
        return {"restarts/rollout": self.rollout.restarts, "restarts/reward": self.reward.restarts}

    def shutdown(self) -> None:
        for part in (self.rollout, self.reward, self.learners):
            part.shutdown()
