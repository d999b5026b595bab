"""``avar synth -c CONFIG [key.path=value ...]``: stage 1, VARD data synthesis on Ray Data."""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("-c", "--config", required=True, help="run config (YAML)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. synth.out=runs/synth2")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from avar_ray.config import load_config
    from avar_ray.plan import preflight
    from avar_ray.synth import run_synthesis

    cfg = load_config(args.config, args.overrides)
    preflight(cfg, "synth", config_path=args.config)  # before any actor starts
    report = run_synthesis(cfg, progress=not args.no_progress)
    print(report.summary())
    if not (report.processed or report.deferred) and report.already_done:  # a rerun (re-applied pipeline)
        print(f"synth: {cfg.synth.out} is complete: it holds every input row ({report.already_done}); nothing to do")
    print(f"shards and report in {cfg.synth.out} (quarantine: {cfg.synth.out}/quarantine.jsonl)")
    return 0
