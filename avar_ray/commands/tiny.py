"""``avar tiny-model --out DIR [--seed N]``."""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="directory to write the checkpoint to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")


def run(args) -> int:
    import json

    from avar_ray.tiny_model import build_tiny_model

    out = build_tiny_model(args.out, seed=args.seed)
    info = json.loads((out / "avar_tiny_model.json").read_text())
    print(f"tiny Qwen2.5-VL written to {out} ({info['parameters'] / 1e6:.2f}M parameters, seed {args.seed})")
    return 0
