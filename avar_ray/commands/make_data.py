"""``avar make-data --out DIR --n N --seed S``: procedural visual reasoning tasks as Parquet."""
from __future__ import annotations


def add_arguments(parser) -> None:
    from avar_ray.config import DataConfig

    data = DataConfig()  # the defaults of the `data` section, not a copy of them
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n", type=int, default=data.n_train, help="number of samples (default: data.n_train)")
    parser.add_argument("--seed", type=int, default=data.seed, help="seed (same seed, same rows)")
    parser.add_argument("--image-size", type=int, default=data.image_size, help="image side in pixels (>= 56)")
    parser.add_argument("--split", default="train", help="file name: OUT/SPLIT.parquet")
    parser.add_argument("--tasks", nargs="*", default=data.tasks,
                        help="procedural task names drawn in turn (default: data.tasks; empty: the default mix)")


def run(args) -> int:
    from avar_ray.data.procedural import write_procedural

    if args.n <= 0:
        raise SystemExit("--n must be positive")
    write_procedural(args.out, n=args.n, seed=args.seed, image_size=args.image_size, split_name=args.split,
                     tasks=args.tasks)
    return 0
