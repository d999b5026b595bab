"""The actors of an RL run, built from the config: the rollout workers (vLLM), the reward
actor (text rewards and their combination; no model) and the learner group (DeepSpeed, which
also computes r_visual in its no-grad pass), placed as ``rl.placement`` says.

Resources are checked before anything starts (a clear error instead of actors waiting forever
for CPUs that do not exist). The learners' placement group (``rl.placement.learner_strategy``,
STRICT_PACK by default: one node) is placed first, before any other GPU actor exists, so that
rollout engines cannot take the GPUs of the one node that could hold all the learners. Then
the three kinds start at the same time (each start is mostly waiting on model loads and engine
start-up), and a start that fails tears the others down.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from actors.learner_group import LearnerGroup
from actors.placement import check_resources, learner_placement_group, reward_options, rollout_options
from actors.reward import RewardService
from actors.rollout import RolloutPool, SamplingSpec
from actors.weight_sync import WeightSync


def sampling_spec(cfg) -> SamplingSpec:
    rl = cfg.rl
    return SamplingSpec(n=rl.n_samples, max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, top_p=rl.top_p)


def transport(rl, cuda: bool = True) -> str:
    """``rl.weight_sync_backend`` as a transport: broadcast is nccl when the learners and the
    rollout workers each have whole GPUs, else gloo (the same code, over CUDA tensors too; how
    the CPU tests run it). Fractional shares may put two ranks on one GPU, which NCCL refuses
    ("Duplicate GPU detected"). ``cuda``: whether the learners found CUDA where Ray placed them
    (a simulated cluster's logical GPUs have none: gloo)."""
    if rl.weight_sync_backend == "object_store":
        return "object_store"
    return "nccl" if cuda and rl.placement.rollout_gpus >= 1 and rl.placement.learner_gpus >= 1 else "gloo"


class RLSystem:
    """Rollout pool + reward service + learner group, and the weight sync between them."""

    def __init__(self, cfg, model_path: str | Path) -> None:
        import ray

        tp = cfg.rl.rollout_tensor_parallel_size
        check_resources(cfg.rl.placement, ray.available_resources(), tp)
        model = replace(cfg.model, path=str(Path(model_path).resolve()))
        placement = cfg.rl.placement
        attempts = placement.max_restarts + 1
        start = time.perf_counter()
        learner_group = learner_placement_group(placement)  # before any other GPU actor
        builders = {
            "rollout": lambda: RolloutPool(cfg.rl, model, rollout_options(placement, tp), attempts),
            "reward": lambda: RewardService(cfg.rl.reward, reward_options(placement), attempts,
                                            placement.reward_workers),
            "learners": lambda: LearnerGroup(cfg.rl, model, cfg.attention, learner_group),
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
            if "learners" not in built:  # the group's own shutdown removes it otherwise
                from ray.util.placement_group import remove_placement_group

                remove_placement_group(learner_group)
            name, exc = next(iter(errors.items()))
            raise RuntimeError(f"RL start-up: the {name} actors failed to start: {exc}") from exc
        self.rollout, self.reward, self.learners = built["rollout"], built["reward"], built["learners"]
        self.cfg, self.model, self.learner_restarts = cfg, model, 0
        self.weights = self._weight_sync()
        self.start_s = time.perf_counter() - start

    def _weight_sync(self) -> WeightSync:
        cuda = all(info["cuda"] for info in self.learners.info)
        return WeightSync(self.learners, self.rollout, transport(self.cfg.rl, cuda), self.cfg.rl.weight_sync_bucket_mb,
                          self.cfg.rl.rollout_tensor_parallel_size, self.cfg.rl.weight_sync_timeout_s)

    def learner_died(self, exc: BaseException) -> bool:
        """Whether ``exc`` is (or came with) the death of a learner rank."""
        import ray

        from actors.recovery import actor_death_errors

        deaths = actor_death_errors()
        if not isinstance(exc, deaths):
            return False
        ids = {a._actor_id.hex() for a in self.learners.actors}
        if getattr(exc, "actor_id", None) in ids:
            return True
        try:  # another actor's error: ask the learners
            ray.get([a.address.remote() for a in self.learners.actors], timeout=60)
        except deaths:
            return True
        except ray.exceptions.GetTimeoutError:
            return True  # a rank stuck in a collective whose peer died
        return False

    def restart_learners(self) -> None:
        """A new learner group (the surviving ranks of the old one may wait in a collective for
        the dead one: all go) and a weight sync over it; the caller loads a checkpoint."""
        self.learners.shutdown()
        self.learners = LearnerGroup(self.cfg.rl, self.model, self.cfg.attention)
        self.weights = self._weight_sync()
        self.learner_restarts += 1

    def sync_weights(self, version: int) -> dict:
        """Learner weights (the trainable ones) -> every rollout worker (``actors.weight_sync``)."""
        return self.weights.sync(version)

    def placement(self) -> dict[str, list[dict]]:
        """Where each actor runs: per role, each actor's node, GPU ids (Ray's) and CUDA."""
        roles = {"learner": self.learners.info, "rollout": self.rollout.info, "reward": self.reward.info}
        return {role: [{k: info[k] for k in ("node", "gpus", "cuda")} for info in infos] for role, infos in roles.items()}

    def restarts(self) -> dict:
        return {"restarts/rollout": self.rollout.restarts, "restarts/reward": self.reward.restarts,
                "restarts/learner": self.learner_restarts}

    def shutdown(self) -> None:
        for part in (self.rollout, self.reward, self.learners):
            part.shutdown()
