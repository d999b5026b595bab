"""``avar tiny-model --out DIR [--seed N] [--family qwen2_5_vl|qwen3_vl]``."""
from __future__ import annotations


def add_arguments(parser) -> None:
    from avar_ray.tiny_model import FAMILIES

    parser.add_argument("--out", required=True, help="directory to write the checkpoint to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--family", choices=FAMILIES, default=FAMILIES[0],
                        help="model family (qwen3_vl: no default system prompt; see docs/models.md)")


def run(args) -> int:
    import json

    from avar_ray.tiny_model import FAMILY_NAMES, build_tiny_model

    out = build_tiny_model(args.out, seed=args.seed, family=args.family)
    info = json.loads((out / "avar_tiny_model.json").read_text())
    print(f"tiny {FAMILY_NAMES[args.family]} written to {out} ({info['parameters'] / 1e6:.2f}M parameters, seed {args.seed})")
    return 0
