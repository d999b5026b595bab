"""``avar plan``: the GPUs and the per-GPU memory every role of every stage needs, from the
model's config.json and the run config alone, and the problems that would stop the job
(``checks``). Every stage command runs ``preflight`` for its own stage before it starts an
actor or a Ray Train worker, and fails with the same lines.

    plan = build_plan(cfg)              # all stages
    print(format_plan(plan)); plan.problems

Modules: ``model_spec`` (config.json -> shape; shipped copies of the published Qwen configs),
``memory`` (the itemised arithmetic), ``roles`` (each stage's actors from the config),
``checks`` (the problem lines), ``paths`` (missing model/data paths, with the command that
makes the tiny config's)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from avar_ray.plan import checks, roles
from avar_ray.plan.memory import GIB
from avar_ray.plan.model_spec import ModelSpec, load_spec

STAGES = ("synth", "sft", "rl", "eval", "serve")


@dataclass
class Plan:
    spec: Optional[ModelSpec]
    stages: dict = field(default_factory=dict)  # stage -> [Role]
    problems: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    cuda: dict = field(default_factory=dict)  # stage -> planned for GPUs


def _asks_gpus(cfg, stage: str) -> bool:
    p = cfg.rl.placement
    return {"synth": any(getattr(cfg.synth, s).num_gpus > 0 for s in ("caption", "reasoning", "anchor")),
            "sft": cfg.sft.use_gpu, "rl": p.learner_gpus > 0 or p.rollout_gpus > 0 or p.reward_gpus > 0,
            "eval": cfg.eval.engine_gpus > 0 or cfg.eval.stats_gpus > 0, "serve": cfg.serve.num_gpus > 0}[stage]


def _teacher_spec(plan: Plan):
    def find(path: str) -> Optional[ModelSpec]:
        try:
            return load_spec(path)
        except FileNotFoundError as exc:
            plan.problems.append(f"synth: teacher model {path}: {exc}")
            return None
    return find


def host_memory_bytes() -> float:
    import psutil

    return float(psutil.virtual_memory().total)


def build_plan(cfg, stages=STAGES, model_config: Optional[str] = None, model_path: Optional[str] = None) -> Plan:
    """``model_config``: a config.json (or its directory) to plan with instead of ``model.path``'s."""
    cluster = cfg.cluster
    try:
        spec = load_spec(model_path or cfg.model.path, model_config)
    except FileNotFoundError as exc:
        return Plan(None, problems=[f"model.path: {exc}"])
    plan = Plan(spec)
    gpu_bytes = cluster.gpu_mem_gib * GIB
    for stage in stages:
        cuda = cluster.nodes > 0 or _asks_gpus(cfg, stage)
        plan.cuda[stage] = cuda
        stage_roles = {"synth": lambda: roles.synth_roles(cfg, _teacher_spec(plan), cuda, gpu_bytes),
                       "sft": lambda: roles.sft_roles(cfg, spec, cuda),
                       "rl": lambda: roles.rl_roles(cfg, spec, cuda, gpu_bytes),
                       "eval": lambda: roles.eval_roles(cfg, spec, cuda, gpu_bytes),
                       "serve": lambda: roles.serve_roles(cfg, spec, cuda)}[stage]()
        plan.stages[stage] = stage_roles
        if not stage_roles:
            continue
        if cuda:
            plan.problems += checks.fit_problems(stage_roles, cluster)
            if cluster.nodes > 0:
                plan.problems += checks.gpu_bound_problems(stage_roles)
                plan.problems += checks.placement_problems(stage_roles, cluster, cfg.rl.placement.learner_strategy)
                if cluster.host_mem_gib > 0:
                    per_node = [r for r in stage_roles if r.host]
                    for r in per_node:
                        n = min(r.count, cluster.gpus_per_node)
                        plan.problems += checks.host_problems([_host_only(r, n)], cluster.host_mem_gib * GIB,
                                                              "a node (cluster.host_mem_gib)")
        else:
            plan.problems += checks.host_problems(stage_roles, host_memory_bytes() * cluster.usable_fraction,
                                                  "this machine")
    reward = cfg.rl.placement.reward_gpus
    if "rl" in stages and reward > 0:
        plan.warnings.append(f"rl.placement.reward_gpus: {reward:g} GPU(s) for the reward actor, which holds no "
                             "model (text rewards; r_visual comes from the learners): set 0")
    return plan


def _host_only(role, count: int):
    from dataclasses import replace

    return replace(role, count=count, items={}, phases={}, fit_keys="sft.num_workers (workers per node) or "
                   "cluster.host_mem_gib")


def format_plan(plan: Plan, cluster=None) -> str:
    spec = plan.spec
    lines = []
    if spec is not None:
        lines.append(f"model {spec.name} ({spec.params() / 1e9:.2f}B parameters, {spec.layers} layers, hidden "
                     f"{spec.hidden}, heads {spec.heads}/{spec.kv_heads}; from {spec.source})")
    if cluster is not None and cluster.nodes:
        lines.append(f"cluster {cluster.nodes} x {cluster.gpus_per_node} GPUs of {cluster.gpu_mem_gib:g} GiB "
                     f"({cluster.usable_fraction:.0%} usable per GPU)")
    for stage, stage_roles in plan.stages.items():
        where = "GPU" if plan.cuda.get(stage) else "CPU (host memory per process)"
        lines += ["", f"## {stage} ({where})", "", "| role | actors | GPUs each | GiB per GPU | itemised (GiB) |",
                  "| --- | --- | --- | --- | --- |"]
        if not stage_roles:
            lines.append("| (no GPU or memory-heavy role: API/oracle teachers) | | | | |")
        for r in stage_roles:
            parts = [f"{k} {v / GIB:.2f}" for k, v in r.items.items() if not k.startswith("_")]
            for phase, items in r.phases.items():
                parts.append(f"[{phase}: " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in items.items()
                                                       if not k.startswith("_")) + "]")
            parts += [f"host: {k} {v / GIB:.1f}" for k, v in r.host.items()]
            parts += [f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.info.items()
                      if not k.startswith("_")]
            tp = f" (TP {r.tp})" if r.tp > 1 else ""
            lines.append(f"| {r.name} | {r.count} | {r.gpus:g}{tp} | {r.peak() / GIB:.1f} | {'; '.join(parts)} |")
    if plan.warnings:
        lines += [""] + [f"warning: {w}" for w in plan.warnings]
    lines += [""] + ([f"problem: {p}" for p in plan.problems] or ["no problems: every role fits"])
    return "\n".join(lines)


def preflight(cfg, stage: str, *, model: Optional[str] = None, bench: Optional[list] = None,
              config_path: Optional[str] = None) -> None:
    """The check a stage command runs before it starts anything: missing paths, then the plan
    of this stage; SystemExit with one line per problem."""
    from avar_ray.plan.paths import path_problems

    problems = path_problems(cfg, stage, model=model, bench=bench, config_path=config_path)
    if not problems:
        plan = build_plan(cfg, (stage,), model_path=model)
        problems = plan.problems
    if problems:
        raise SystemExit("\n".join([f"avar {stage}: the pre-flight check (avar plan) failed:"] + problems))
