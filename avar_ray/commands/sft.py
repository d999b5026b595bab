"""``avar sft -c CONFIG [key.path=value ...]``: stage 2, cold-start SFT with AGTO."""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("-c", "--config", required=True, help="run config (YAML)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.alpha=0 sft.resume=true")


def run(args) -> int:
    from avar_ray.config import load_config
    from avar_ray.plan import preflight
    from avar_ray.sft import run_sft

    cfg = load_config(args.config, args.overrides)
    preflight(cfg, "sft", config_path=args.config)  # before any Ray Train worker starts
    report = run_sft(cfg)
    print(report.summary())
    print(f"metrics: {report.out}/metrics.jsonl, TensorBoard: {report.out}/tensorboard, "
          f"checkpoints: {report.out}/checkpoints")
    return 0
