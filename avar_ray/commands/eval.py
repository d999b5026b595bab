"""``avar eval --model DIR --bench FILE... --out DIR [--intervene A_IMG,A_SYS] [-c CONFIG] [key=value...]``

Accuracy and VAS (both query spans) of one model on benchmark files (MathVista JSON/JSONL,
VLMEvalKit TSV, JSONL, Parquet). Defaults come from the config: ``model.path``, ``data.eval``,
``eval.out``. Plain mode generates with vLLM; with ``--intervene`` (or
``intervention.enabled=true``) generation runs in transformers, which can apply the
intervention's key bias (vLLM cannot). With ``eval.num_engines: 0`` (the default) it runs in
this process, no Ray needed; with ``eval.num_engines: N`` it runs on Ray Data over N vLLM engine
actors and ``eval.stats_workers`` statistics actors. Finished samples are appended to
``OUT/progress.jsonl``, so a killed eval resumes where it stopped.
"""
from __future__ import annotations

import logging
from dataclasses import replace

from avar_ray.attention import Intervention


def add_arguments(parser) -> None:
    parser.add_argument("-c", "--config", help="YAML run config (default: built-in defaults)")
    parser.add_argument("--model", help="HF model directory (default: model.path)")
    parser.add_argument("--bench", nargs="+", metavar="FILE", help="benchmark files (default: data.eval)")
    parser.add_argument("--out", help="output directory (default: eval.out)")
    parser.add_argument("--intervene", metavar="A_IMG,A_SYS",
                        help="training-free intervention, e.g. 0.15,0.4 (layers: intervention.layers)")
    parser.add_argument("--label", help="stage name shown by `avar analyze` (default: the output directory name)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.max_new_tokens=32")


def parse_intervention(text: str, base) -> Intervention:
    """``"A_IMG,A_SYS"`` over the ``InterventionConfig`` ``base`` (its layers) -> Intervention;
    a clear error naming the option otherwise."""
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) != 2:
            raise ValueError("expected two numbers")
        return Intervention.configured(replace(base, a_img=float(parts[0]), a_sys=float(parts[1])))
    except ValueError as exc:
        raise SystemExit(f"--intervene {text!r}: {exc} (format: A_IMG,A_SYS, e.g. 0.15,0.4; "
                         "a_img > -1, 0 <= a_sys < 1)") from None


def run(args) -> int:
    from avar_ray.config import load_config
    from avar_ray.plan import preflight
    from avar_ray.eval.runner import run_eval

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    if args.intervene:
        intervention = parse_intervention(args.intervene, cfg.intervention)
    else:
        intervention = Intervention.from_config(cfg.intervention)
    bench = args.bench or cfg.data.eval
    preflight(cfg, "eval", model=args.model, bench=args.bench, config_path=args.config)
    if not bench:
        raise SystemExit("no benchmark files: pass --bench FILE... or set data.eval in the config")
    out = args.out or cfg.eval.out
    results = run_eval(args.model or cfg.model.path, bench, out, cfg, intervention=intervention, label=args.label)
    overall = results["overall"]

    def show(x, scale=1.0):
        return "n/a" if x is None else f"{x * scale:.2f}"

    for name, s in results["benchmarks"].items():
        print(f"{name}: n={s['n']} accuracy={show(s['accuracy'], 100)}% VAS(U)={show(s['vas'])} "
              f"VAS(R)={show(s['vas_response'])} alpha_img={show(s['alpha_img'])} bad rows={s['bad_rows']['count']}")
    print(f"overall: n={overall['n']} accuracy={show(overall['accuracy'], 100)}% VAS(U)={show(overall['vas'])} "
          f"bad rows={overall['bad_rows']['count']}")
    print(f"report: {out}/report.md")
    return 0
