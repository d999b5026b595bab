"""Placement of the 7B config's actors on a simulated multi-node cluster (issue 21, item 3).

``ray.cluster_utils.Cluster`` on this machine: a head with no GPUs and the config's
``cluster.nodes`` worker nodes of ``cluster.gpus_per_node`` logical GPUs. The RL actors are
created with their real requests (``actors.placement``: the learners' placement group first,
as ``RLSystem`` does, then the rollout workers and the reward actor), and so are the synthesis
anchor teachers (Ray Data asks ``synth.anchor.num_gpus`` per actor); each is a small probe
reporting its node and GPU ids (no engine, no model). The Cluster runs in a child process:
Ray is initialised once per process and the suite's session Ray may be up.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG_7B = REPO / "configs" / "qwen2_5_vl_7b.yaml"


def _place(config: str) -> dict:
    """In the child: start the cluster, create the actors, report where they are."""
    import ray
    from ray.cluster_utils import Cluster

    from actors.placement import learner_options, learner_placement_group, reward_options, rollout_options
    from avar_ray.config import load_config

    cfg = load_config(config)
    store = 80 * 2 ** 20
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "object_store_memory": store})
    for _ in range(cfg.cluster.nodes):
        cluster.add_node(num_cpus=cfg.cluster.cpus_per_node, num_gpus=cfg.cluster.gpus_per_node,
                         object_store_memory=store)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    head = ray.get_runtime_context().get_node_id()  # the driver's node

    @ray.remote
    class Probe:
        def where(self):
            ctx = ray.get_runtime_context()
            return ctx.get_node_id(), [str(g) for g in ray.get_gpu_ids()]

    p, tp = cfg.rl.placement, cfg.rl.rollout_tensor_parallel_size
    pg = learner_placement_group(p, timeout_s=120)  # first, as avar_ray.rl.system.RLSystem
    actors = {"learner": [Probe.options(**learner_options(p, pg, r)).remote() for r in range(p.learners)],
              "rollout": [Probe.options(**rollout_options(p, tp)).remote() for _ in range(p.rollout_workers)],
              "reward": [Probe.options(**reward_options(p)).remote()]}
    rl = {k: ray.get([a.where.remote() for a in v], timeout=300) for k, v in actors.items()}
    for group in actors.values():
        for a in group:
            ray.kill(a)
    ray.util.remove_placement_group(pg)
    t = cfg.synth.anchor  # the next stage, alone on the cluster (as its own job would be)
    teachers = [Probe.options(num_cpus=t.num_cpus, num_gpus=t.num_gpus).remote() for _ in range(cfg.synth.num_actors)]
    synth = {"anchor": ray.get([a.where.remote() for a in teachers], timeout=300)}
    ray.shutdown()
    cluster.shutdown()
    requested = {"learner": p.learner_gpus, "rollout": tp * p.rollout_gpus, "reward": p.reward_gpus,
                 "anchor": t.num_gpus}
    return {"head": head, "rl": rl, "synth": synth, "requested": requested, "learners": p.learners}


@pytest.mark.slow
def test_7b_actors_on_a_simulated_2x8_cluster():
    env = {**os.environ, "RAY_prestart_worker_first_driver": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, __file__, str(CONFIG_7B)], capture_output=True, text=True, env=env,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    head, requested = out["head"], out["requested"]
    for stage in ("rl", "synth"):
        per_node: dict[str, list[str]] = {}
        for kind, placed in out[stage].items():
            for node, gpus in placed:
                assert len(gpus) == requested[kind], f"{kind} holds GPUs {gpus}, asked for {requested[kind]}"
                if requested[kind] > 0:
                    assert node != head, f"a GPU-bound {kind} is on the head node"
                per_node.setdefault(node, []).extend(gpus)
        for node, gpus in per_node.items():  # every GPU id at most once per node
            assert len(gpus) == len(set(gpus)), f"{stage}: GPU ids shared on node {node}: {sorted(gpus)}"
    learner_nodes = {node for node, _ in out["rl"]["learner"]}
    assert len(out["rl"]["learner"]) == out["learners"] and len(learner_nodes) == 1, learner_nodes
    rollout_nodes = {node for node, _ in out["rl"]["rollout"]}
    assert not rollout_nodes & learner_nodes  # 8 learners fill their node: the engines are on the other
    assert out["rl"]["reward"][0][1] == []  # the reward actor holds no GPU


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    print(json.dumps(_place(sys.argv[1])))
