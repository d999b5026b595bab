"""``avar rl -c CONFIG [key.path=value ...] [--resume]``: stage 3, GRPO with the
visual-attention reward on Ray actors. Prints the final HF model's path last."""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("-c", "--config", required=True, help="run config (YAML)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rl.steps=10 rl.placement.learners=2")
    parser.add_argument("--resume", action="store_true",
                        help="rl.resume=true: continue from the newest checkpoint in rl.out (same step count and data "
                             "position); the default rl.resume=auto does so too, or starts fresh, or says a "
                             "finished rl.out is complete")


def run(args) -> int:
    from avar_ray.config import load_config
    from avar_ray.plan import preflight
    from avar_ray.rl import run_rl

    cfg = load_config(args.config, args.overrides)
    preflight(cfg, "rl", config_path=args.config)  # before any actor starts
    report = run_rl(cfg, resume=args.resume)
    print(report.summary())
    print(f"metrics: {report.metrics_path}, TensorBoard: {report.out}/tensorboard, "
          f"checkpoints: {report.out}/checkpoints")
    print(f"final model: {report.final_model}")
    return 0
