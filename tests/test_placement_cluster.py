"""Placement of the 7B config's actors on a simulated multi-node cluster (issue 21, item 3).

``ray.cluster_utils.Cluster`` on this machine: a head with no GPUs and the config's
``cluster.nodes`` worker nodes of ``cluster.gpus_per_node`` logical GPUs. The RL actors are
created with their real requests (``actors.placement``: the learners' placement group first,
as ``RLSystem`` does, then the rollout workers and the reward actor), and so are the synthesis
anchor teachers (Ray Data asks ``synth.anchor.num_gpus`` per actor); each is a small probe
reporting its node and GPU ids (no engine, no model). The Cluster runs in a child process:
Ray is initialised once per process and the suite's session Ray may be up.

The tiny RL job runs to completion on such a cluster with its real requests (learners and the
rollout engine asking for logical GPUs, the reward actor for CPUs): the learners find no CUDA
behind their GPU ids and run gloo on CPU, as does the weight broadcast (``where_am_i``).
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


def _run_tiny(model_dir: str, data: str, out: str) -> dict:
    """In the child: the tiny RL job (2 steps) on a head without GPUs and two nodes of logical GPUs."""
    from ray.cluster_utils import Cluster

    from avar_ray.config import load_config
    from avar_ray.rl import run_rl

    store = 80 * 2 ** 20
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "object_store_memory": store})
    for gpus in (TINY_LEARNERS, 1):  # the learners' node, the rollout engine's node
        cluster.add_node(num_cpus=gpus + 1, num_gpus=gpus, object_store_memory=store)
    cluster.wait_for_nodes()
    cfg = load_config(str(REPO / "configs" / "tiny_local.yaml"), [
        f"model.path={model_dir}", f"data.train={data}", f"rl.out={out}", f"ray.address={cluster.address}",
        "rl.steps=2", "rl.prompts_per_step=2", "rl.n_samples=2", "rl.max_new_tokens=8", "rl.save_every=0",
        "rl.reward.visual_gate=false", "rl.gpu_memory_utilization=0.1", "rl.weight_sync_backend=broadcast",
        f"rl.placement.learners={TINY_LEARNERS}", "rl.placement.learner_gpus=1", "rl.placement.learner_cpus=1",
        "rl.placement.rollout_workers=1", "rl.placement.rollout_gpus=1", "rl.placement.rollout_cpus=1",
        "rl.placement.reward_gpus=0", "rl.placement.reward_cpus=1"])
    import ray

    from avar_ray.ray_utils import init_ray

    init_ray(cfg.ray)
    head = ray.get_runtime_context().get_node_id()
    report = run_rl(cfg)
    ray.shutdown()
    cluster.shutdown()
    return {"head": head, "steps": report.steps, "placement": report.placement}


TINY_LEARNERS = 2


def _child(*args: str) -> dict:
    env = {**os.environ, "RAY_prestart_worker_first_driver": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_tiny_rl_job_completes_on_a_simulated_multi_node_cluster(tiny_model_dir, procedural_parquet, tmp_path):
    """The job's steps all done; the learners on one node, each holding its own GPU id; the rollout
    engine holding one GPU off the head; the reward actor holding none; no actor found CUDA (so
    the learners and the weight sync ran gloo, not the NCCL a real GPU node would take)."""
    out = _child("tiny", str(tiny_model_dir), str(procedural_parquet), str(tmp_path / "rl"))
    assert out["steps"] == 2
    placed, head = out["placement"], out["head"]
    learners = placed["learner"]
    assert len(learners) == TINY_LEARNERS and len({a["node"] for a in learners}) == 1
    assert sorted(g for a in learners for g in a["gpus"]) == sorted({g for a in learners for g in a["gpus"]})
    assert all(len(a["gpus"]) == 1 and a["node"] != head for a in learners + placed["rollout"])
    assert placed["rollout"][0]["node"] != learners[0]["node"]  # the learners' node has no GPU left
    assert placed["reward"][0]["gpus"] == []
    assert not any(a["cuda"] for role in placed.values() for a in role)


@pytest.mark.slow
def test_7b_actors_on_a_simulated_2x8_cluster():
    out = _child(str(CONFIG_7B))
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
    print(json.dumps(_run_tiny(*sys.argv[2:]) if sys.argv[1] == "tiny" else _place(sys.argv[1])))
