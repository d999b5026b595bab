"""The problems a plan can find, one line each naming the keys to change: a role that does
not fit its GPU (by how many GiB), a GPU-bound actor with no GPU, the roles' GPUs above the
cluster's, learners that cannot share a node, a KV cache too small for one full-length
sequence; on a CPU run, the roles' memory above this machine's."""
from __future__ import annotations

from avar_ray.plan.memory import GIB
from avar_ray.plan.roles import Role


def gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def fit_problems(roles: list[Role], cluster) -> list[str]:
    usable = cluster.gpu_mem_gib * GIB * cluster.usable_fraction
    out = []
    for r in roles:
        if r.gpus <= 0:
            continue
        kv = r.info.get("_kv_raw")
        if kv is not None:  # a vLLM engine: gpu_memory_utilization is its budget
            if kv <= 0:
                out.append(f"{r.stage}: {r.name}: weights and vLLM's own use exceed gpu_memory_utilization's share "
                           f"by {gib(-kv)} GiB; change {r.fit_keys}")
            elif r.info["full-length sequences in KV"] < 1:
                out.append(f"{r.stage}: {r.name}: KV cache {gib(kv)} GiB holds "
                           f"{r.info['full-length sequences in KV']:.2f} full-length sequences (< 1); change {r.fit_keys}")
            continue
        share = usable * min(r.gpus, 1.0) if r.tp == 1 else usable
        if r.peak() > share:
            out.append(f"{r.stage}: {r.name} does not fit: {gib(r.peak())} GiB per GPU, {gib(r.peak() - share)} GiB "
                       f"above the {gib(share)} GiB usable of a {cluster.gpu_mem_gib:g} GiB GPU; change {r.fit_keys}")
    return out


def gpu_bound_problems(roles: list[Role]) -> list[str]:
    """On a GPU cluster every GPU-bound actor must ask for its GPUs: one that asks for none lands
    anywhere (the head pod included), sees every GPU of its node and shares cuda:0."""
    out = []
    for r in roles:
        if r.gpu_bound and r.gpus <= 0:
            fix = {"sft.use_gpu": "sft.use_gpu: true",
                   "eval.num_engines": "eval.num_engines >= 1 with eval.engine_gpus: 1 and eval.stats_gpus: 1 "
                                       "(the driver runs on the head pod, which has no GPU)"}.get(r.key, f"{r.key} >= 1")
            out.append(f"{r.stage}: {r.name} is GPU-bound but asks for no GPU; set {fix}")
        if r.tp > 1 and r.gpus < r.tp:
            out.append(f"{r.stage}: {r.name}: tensor_parallel_size {r.tp} needs {r.tp} GPUs per actor, it asks for "
                       f"{r.gpus:g}; set {r.key}: {r.tp}")
    return out


def placement_problems(roles: list[Role], cluster, learner_strategy: str) -> list[str]:
    """First-fit of the stage's GPU actors onto ``cluster.nodes`` x ``gpus_per_node``: the
    learners first, together when STRICT_PACK (as ``avar_ray.rl.system`` creates their group
    before any other GPU actor), then every other actor whole (a tensor-parallel engine on one node)."""
    if cluster.nodes <= 0:
        return []
    free = [float(cluster.gpus_per_node)] * cluster.nodes
    out, placed, need = [], 0.0, sum(r.count * r.gpus for r in roles)
    total = cluster.nodes * cluster.gpus_per_node
    if need > total + 1e-9:
        keys = ", ".join(f"{r.count_key or r.key} / {r.key}" for r in roles if r.gpus > 0)
        return [f"{roles[0].stage}: the roles ask for {need:g} GPUs, the cluster has {total} "
                f"({cluster.nodes} x {cluster.gpus_per_node}); lower {keys}"]
    for r in sorted(roles, key=lambda r: (r.name != "learner rank", -r.gpus)):
        if r.gpus <= 0:
            continue
        if r.name == "learner rank" and learner_strategy == "STRICT_PACK":
            group = r.count * r.gpus
            node = next((i for i, f in enumerate(free) if f >= group - 1e-9), None)
            if node is None:
                out.append(f"rl: the {r.count} learners ({group:g} GPUs, STRICT_PACK) cannot share a node of "
                           f"{cluster.gpus_per_node} GPUs; lower rl.placement.learners, or set "
                           "rl.placement.learner_strategy: PACK (ZeRO-3 collectives then cross nodes)")
                continue
            free[node] -= group
            continue
        for _ in range(r.count):
            node = next((i for i, f in enumerate(free) if f >= r.gpus - 1e-9), None)
            if node is None:
                out.append(f"{r.stage}: no node has {r.gpus:g} free GPUs left for a {r.name} after "
                           f"{placed:g} placed; change {r.count_key or r.key} or the cluster section")
                break
            free[node] -= r.gpus
            placed += r.gpus
    return out


def host_problems(roles: list[Role], host_bytes: float, where: str) -> list[str]:
    need = sum(r.count * (r.peak() + sum(r.host.values())) for r in roles)
    if need > host_bytes:
        names = ", ".join(f"{r.count} x {r.name}" for r in roles)
        return [f"{roles[0].stage}: {names} need {gib(need)} GiB of host memory, {where} has {gib(host_bytes)} GiB "
                f"({gib(need - host_bytes)} GiB short); change {roles[0].fit_keys or roles[0].key}"]
    return []
