"""The ``avar`` command. Each subcommand lives in its own module with ``add_arguments(parser)``
and ``run(args) -> int``; modules are imported only when their command runs, so ``avar
--help`` stays fast and a stage's heavy imports (vLLM, DeepSpeed) happen only where needed.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("avar_ray.commands.demo", "the whole pipeline on a tiny model and procedural data, on a local Ray"),
    "tiny-model": ("avar_ray.commands.tiny", "write a tiny random Qwen2.5-VL (or Qwen3-VL) checkpoint (tests, demo)"),
    "make-data": ("avar_ray.commands.make_data", "render procedural visual reasoning tasks to Parquet"),
    "vas": ("avar_ray.commands.vas", "Visual Attention Score of a model on a data file"),
    "synth": ("avar_ray.commands.synth", "stage 1: VARD cold-start data synthesis (Ray Data)"),
    "sft": ("avar_ray.commands.sft", "stage 2: cold-start SFT with AGTO (Ray Train + DeepSpeed)"),
    "rl": ("avar_ray.commands.rl", "stage 3: GRPO with the visual-attention reward (Ray actors)"),
    "eval": ("avar_ray.commands.eval", "accuracy and VAS on benchmark files"),
    "analyze": ("avar_ray.commands.analyze", "VAS-vs-accuracy across evaluated checkpoints"),
    "serve": ("avar_ray.commands.serve", "Ray Serve app answering with VAS telemetry"),
    "plan": ("avar_ray.commands.plan", "GPUs and per-GPU memory of every stage and role; the problems, by key"),
    "config-doc": ("avar_ray.commands.config_doc", "print the config reference (Markdown)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avar", description="AVAR on Ray: attention-guided multimodal reasoning")
    parser.add_argument("--version", action="version", version=f"avar-ray {__import__('avar_ray').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv or ["--help"])  # prints help / errors and exits
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    sub = argparse.ArgumentParser(prog=f"avar {argv[0]}", description=COMMANDS[argv[0]][1])
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
