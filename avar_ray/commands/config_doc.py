"""``avar config-doc``: print the config reference generated from ``avar_ray/config.py``."""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--out", default=None, help="write to this file instead of stdout")


def run(args) -> int:
    from pathlib import Path

    from avar_ray.config import reference_markdown

    text = reference_markdown() + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text, end="")
    return 0
