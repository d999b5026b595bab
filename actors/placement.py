"""Where the RL actors run: one config section (``rl.placement``) decides how many rollout
workers and learners there are and what CPUs/GPUs each gets. Learners share one placement
group (they form a torch.distributed group); rollout workers and the reward actor are plain
restartable actors. The learners' group is STRICT_PACK by default (one node: their ZeRO-3
collectives on NVLink) and ``avar_ray.rl.system`` places it before any other GPU actor.

``rl.rollout_tensor_parallel_size`` (tp): one vLLM engine spans tp GPUs, so a rollout worker
asks for ``tp * rollout_gpus`` GPUs (``rollout_gpus`` is per tensor-parallel rank) and its
engine takes tp ranks of the weight-broadcast group. Counted and validated on CPU; the GPU
path is untested here."""
from __future__ import annotations

from dataclasses import dataclass


class PlacementError(RuntimeError):
    """The cluster cannot hold what ``rl.placement`` asks for."""


@dataclass
class Demand:
    cpus: float
    gpus: float


def total_demand(placement, tensor_parallel_size: int = 1) -> Demand:
    p = placement
    return Demand(
        cpus=p.rollout_workers * p.rollout_cpus + p.learners * p.learner_cpus + p.reward_cpus,
        gpus=p.rollout_workers * tensor_parallel_size * p.rollout_gpus + p.learners * p.learner_gpus + p.reward_gpus,
    )


def check_resources(placement, available: dict, tensor_parallel_size: int = 1) -> None:
    """Fail early, naming the keys, instead of waiting forever for actors that cannot be placed."""
    need = total_demand(placement, tensor_parallel_size)
    have_cpu, have_gpu = float(available.get("CPU", 0)), float(available.get("GPU", 0))
    if need.cpus > have_cpu + 1e-9 or need.gpus > have_gpu + 1e-9:
        raise PlacementError(
            f"rl.placement asks for {need.cpus:g} CPUs and {need.gpus:g} GPUs "
            f"(rollout_workers x rollout_cpus, rollout_workers x rl.rollout_tensor_parallel_size "
            f"({tensor_parallel_size}) x rollout_gpus, learners x learner_cpus/gpus, reward_cpus/gpus) "
            f"but the Ray cluster has {have_cpu:g} CPUs and {have_gpu:g} GPUs; lower rl.placement.* "
            "or give Ray more (ray.num_cpus for a local Ray)")


def _resources(cpus: float, gpus: float) -> dict:
    out = {"num_cpus": cpus}
    if gpus:
        out["num_gpus"] = gpus
    return out


def rollout_options(placement, tensor_parallel_size: int = 1) -> dict:
    return {**_resources(placement.rollout_cpus, tensor_parallel_size * placement.rollout_gpus),
            "max_restarts": placement.max_restarts, "max_task_retries": 0}


def broadcast_ranks(rollout_workers: int, tensor_parallel_size: int = 1) -> tuple[list[int], int]:
    """Rank offsets of the engines in the weight-broadcast group and its world size: the
    sender is rank 0, engine i's tensor-parallel rank r is ``1 + i * tp + r``."""
    return [1 + i * tensor_parallel_size for i in range(rollout_workers)], 1 + rollout_workers * tensor_parallel_size


def reward_options(placement) -> dict:
    return {**_resources(placement.reward_cpus, placement.reward_gpus), "max_restarts": placement.max_restarts,
            "max_task_retries": 0}


def learner_bundles(placement) -> list[dict]:
    bundle = {"CPU": placement.learner_cpus}
    if placement.learner_gpus:
        bundle["GPU"] = placement.learner_gpus
    return [dict(bundle) for _ in range(placement.learners)]


def learner_placement_group(placement, timeout_s: float = 300.0):
    """The learners' placement group, ready; a clear error if it cannot be placed in time."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group(learner_bundles(placement), strategy=placement.learner_strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        hint = ""
        if placement.learner_strategy == "STRICT_PACK":
            hint = (f": STRICT_PACK needs one node with {placement.learners * placement.learner_gpus:g} free GPUs and "
                    f"{placement.learners * placement.learner_cpus:g} CPUs (`avar plan` checks the config's cluster); "
                    "rl.placement.learner_strategy: PACK lets the learners cross nodes")
        raise PlacementError(f"the learner placement group ({placement.learners} x {learner_bundles(placement)[0]}, "
                             f"{placement.learner_strategy}) could not be placed within {timeout_s:g} s{hint}")
    return pg


def learner_options(placement, pg, rank: int) -> dict:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {**_resources(placement.learner_cpus, placement.learner_gpus),
            "scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank)}
