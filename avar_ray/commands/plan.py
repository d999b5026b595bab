"""``avar plan -c CONFIG [key.path=value ...] [--nodes N --gpus-per-node G --gpu-mem-gib M]``

Per stage (synth, sft, rl, eval, serve) and role, the GPUs and the per-GPU memory the run
needs, itemised, from the model's config.json alone (``model.path``'s, else a shipped copy of
the published config matching its name, else ``--model-config``). The cluster comes from the
config's ``cluster:`` section or the flags. Exits 1 with one ``problem:`` line per problem,
naming the keys to change; every stage command runs the same check for its stage."""
from __future__ import annotations

from avar_ray.plan import STAGES


def add_arguments(parser) -> None:
    parser.add_argument("-c", "--config", required=True, help="run config (YAML)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rl.micro_batch_size=2")
    parser.add_argument("--nodes", type=int, help="GPU worker nodes (cluster.nodes)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node (cluster.gpus_per_node)")
    parser.add_argument("--gpu-mem-gib", type=float, help="memory per GPU in GiB (cluster.gpu_mem_gib)")
    parser.add_argument("--model-config", help="a config.json (or its directory) to plan with instead of model.path's")
    parser.add_argument("--stage", action="append", choices=STAGES, help="only these stages (repeatable)")


def run(args) -> int:
    from avar_ray.config import load_config
    from avar_ray.plan import build_plan, format_plan

    flags = {"nodes": args.nodes, "gpus_per_node": args.gpus_per_node, "gpu_mem_gib": args.gpu_mem_gib}
    overrides = list(args.overrides) + [f"cluster.{k}={v}" for k, v in flags.items() if v is not None]
    cfg = load_config(args.config, overrides)
    plan = build_plan(cfg, tuple(args.stage or STAGES), model_config=args.model_config)
    print(format_plan(plan, cfg.cluster))
    return 1 if plan.problems else 0
