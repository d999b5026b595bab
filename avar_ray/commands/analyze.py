"""``avar analyze RUN_DIR... [--labels L...] --out DIR``

Several ``avar eval`` output directories side by side (e.g. base → cold start → RL): the
VAS-vs-accuracy scatter with Pearson's r and its p-value, and the stage table, as PNG and
Markdown (OUT/analysis.md, OUT/analysis.json, OUT/vas_vs_accuracy.png, OUT/stage_chart.png).
Reads only results.json files: no model, no Ray, no GPU.
"""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="`avar eval` output directories, in stage order")
    parser.add_argument("--labels", nargs="+", metavar="LABEL",
                        help="one name per run (default: the eval's --label, else the directory name)")
    parser.add_argument("--out", required=True, help="output directory")


def run(args) -> int:
    from avar_ray.eval.analyze import REPORT, run_analyze

    try:
        summary = run_analyze(args.runs, args.out, labels=args.labels)
    except (FileNotFoundError, ValueError) as exc:  # a missing or malformed run: say which, no traceback
        raise SystemExit(f"avar analyze: {exc}") from None
    for run in summary["runs"]:
        acc = "n/a" if run["accuracy"] is None else f"{run['accuracy'] * 100:.1f}%"
        vas = "n/a" if run["vas"] is None else f"{run['vas']:.3f}"
        print(f"{run['label']}: n={run['n']} accuracy={acc} VAS(U)={vas}")
    corr = summary["correlation"]
    if corr["r"] is None:
        print(f"Pearson r: not defined over {corr['n']} run(s)")
    else:
        print(f"Pearson r = {corr['r']:.4f}" + ("" if corr["p"] is None else f" (p = {corr['p']:.3g})")
              + f" over {corr['n']} runs")
    print(f"report: {args.out}/{REPORT}")
    return 0
