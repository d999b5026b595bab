"""Markdown of the eval report and of the cross-checkpoint analysis (the figures are made by
``plots``; these functions only lay out numbers and links)."""
from __future__ import annotations

from typing import Any, Optional, Sequence


def fmt(value: Optional[float], digits: int = 2, percent: bool = False) -> str:
    if value is None or value != value:
        return "n/a"
    if percent:
        return f"{value * 100:.1f}"
    # A ratio over a near-zero system mass can reach 1e18 (tiny models): keep the cell readable.
    return f"{value:.3g}" if abs(value) >= 1e5 else f"{value:.{digits}f}"


def signed(value: Optional[float], digits: int = 2, percent: bool = False) -> str:
    """A difference with its sign ("+1.5", "-0.3"); "n/a" for None."""
    text = fmt(value, digits, percent)
    return text if value is None or value != value or value < 0 else "+" + text


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


EVAL_HEADER = ("benchmark", "n", "accuracy %", "format %", "VAS (Q=U)", "VAS (Q=R)", "alpha_img (U)",
               "eps_img (U)", "alpha_sys (U)", "bad rows")


def eval_row(name: str, s: dict[str, Any]) -> list[str]:
    return [name, str(s["n"]), fmt(s["accuracy"], percent=True), fmt(s["format"], percent=True), fmt(s["vas"]),
            fmt(s["vas_response"]), fmt(s["alpha_img"], 4), fmt(s["eps_img"], 5), fmt(s["alpha_sys"], 4),
            str(s["bad_rows"]["count"])]


def eval_report(results: dict[str, Any], figures: dict[str, str], heatmaps: Sequence[dict],
                examples: Sequence[dict]) -> str:
    """The eval report. ``figures``: name -> relative PNG path; ``heatmaps``: dicts with path,
    id, benchmark, prediction, answer, vas; ``examples``: a few per-sample records."""
    iv = results["intervention"]
    mode = "off" if iv is None else f"on (a_img = {iv['a_img']}, a_sys = {iv['a_sys']}, layers = {iv['layers'] or 'all'})"
    lines = ["# Evaluation report", "",
             f"- model: `{results['model']}`",
             f"- generation: {results['generation']} (max {results['max_new_tokens']} new tokens, "
             f"temperature {results['temperature']})",
             f"- training-free intervention: {mode}",
             f"- samples evaluated: {results['overall']['n']}; bad rows skipped: {results['overall']['bad_rows']['count']}",
             "",
             "VAS (SPEC.md §1) is the mean over layers, heads and queries of visual / system attention mass; "
             "Q = U uses the user-text queries (the paper's analysis), Q = R the response tokens. alpha_img is the "
             "absolute visual mass and eps_img = alpha_img / |V| the per-visual-token share: a ratio can rise by "
             "suppressing system attention alone, the absolute figures show whether the image really gained.",
             "", "## Results", ""]
    rows = [eval_row(name, s) for name, s in results["benchmarks"].items()]
    overall = results["overall"]
    rows.append(eval_row("**overall**", overall))
    lines += md_table(EVAL_HEADER, rows)
    lines += ["", f"Macro-average accuracy over benchmarks: {fmt(overall['macro_accuracy'], percent=True)} %.", ""]
    bad = [(name, b) for name, s in results["benchmarks"].items() for b in s["bad_rows"]["rows"]]
    if bad:
        lines += ["## Skipped rows", ""]
        lines += md_table(("benchmark", "file", "row", "reason"),
                          [(name, f"`{b['file']}`", b["row"], b["reason"].replace("|", "\\|")) for name, b in bad])
        lines.append("")
    lines += ["## Figures", ""]
    for title, key in (("VAS distribution per benchmark", "vas_distribution"),
                       ("Per-layer attention profile", "layer_profile")):
        if key in figures:
            lines += [f"### {title}", "", f"![{title}]({figures[key]})", ""]
    if heatmaps:
        lines += ["### Where the response looks", "",
                  "Mean attention of the response tokens (over layers and heads) on each merged image patch.", ""]
        for h in heatmaps:
            lines += [f"**{h['benchmark']} / {h['id']}**: prediction `{h['prediction']}`, answer `{h['answer']}`, "
                      f"VAS (Q=R) {fmt(h['vas'])}", "", f"![heatmap {h['id']}]({h['path']})", ""]
    if examples:
        lines += ["## Examples", ""]
        lines += md_table(("benchmark", "id", "answer", "prediction", "correct", "VAS (Q=U)", "VAS (Q=R)"),
                          [(e["benchmark"], e["id"], e["answer"], f"`{e['prediction']}`", "yes" if e["correct"] else "no",
                            fmt(e["vas"]), fmt(e["attention"]["response"]["vas"])) for e in examples])
        lines.append("")
    return "\n".join(lines)


STAGE_HEADER = ("stage", "accuracy % [95% CI]", "Δ acc", "VAS (Q=U) [95% CI]", "robust VAS (Q=U) [95% CI]",
                "heads S<floor", "VAS (Q=R)", "alpha_img (U) [95% CI]", "alpha_img (R) [95% CI]", "n")


def with_ci(value: Optional[float], ci: Optional[Sequence[float]], digits: int = 2, percent: bool = False) -> str:
    """"12.5 [9.1, 16.3]": a figure and its interval (``ci``: (low, high) or (mean, low, high))."""
    if not ci:
        return fmt(value, digits, percent)
    low, high = ci[-2], ci[-1]
    return f"{fmt(value, digits, percent)} [{fmt(low, digits, percent)}, {fmt(high, digits, percent)}]"


def stage_rows(runs: Sequence[dict]) -> list[list[str]]:
    """One row per run (in the given order, e.g. base → cold start → RL), deltas to the first;
    ``run["intervals"]`` (``analyze.intervals``) adds the 95% intervals where present."""
    rows = []
    first = runs[0]["overall"] if runs else {}
    for run in runs:
        o, ci = run["overall"], run.get("intervals", {})
        d_acc = None if o["accuracy"] is None or first["accuracy"] is None else o["accuracy"] - first["accuracy"]
        robust = ci.get("vas_robust")
        low, low_q = ci.get("low_sys_heads"), ci.get("low_sys_queries")
        rows.append([run["label"], with_ci(o["accuracy"], ci.get("accuracy"), percent=True), signed(d_acc, percent=True),
                     with_ci(o["vas"], ci.get("vas")), with_ci(robust[0] if robust else None, robust),
                     ("n/a" if low is None else f"{low * 100:.0f}% ({ci['low_sys_layers']} layers)")
                     + ("" if not low_q else f"; queries {low_q[0] * 100:.2g}%"),
                     fmt(o["vas_response"]), with_ci(o["alpha_img"], ci.get("alpha_img"), 4),
                     with_ci(o.get("alpha_img_response"), ci.get("alpha_img_response"), 4), str(o["n"])])
    return rows


def analysis_report(runs: Sequence[dict], correlation: dict[str, Any], figures: dict[str, str],
                    sys_floor: float = 1e-3) -> str:
    r, p, n = correlation["r"], correlation["p"], correlation["n"]
    stat = "not defined (fewer than 2 runs, or constant VAS or accuracy)" if r is None else \
        f"**r = {r:.4f}**, p = {'n/a' if p is None else f'{p:.3g}'} (n = {n} runs)"
    lines = ["# Analysis across checkpoints", "",
             "Each run is one `avar eval` output (results.json). VAS is the user-text query span (Q = U), "
             "the paper's VAS-vs-accuracy analysis (reference: r = 0.9616 over ~10 open 7B reasoning models).", "",
             "## Stage table", ""]
    lines += md_table(STAGE_HEADER, stage_rows(runs))
    lines += ["", "Intervals: Wilson (accuracy), 95% percentile bootstrap over samples (attention means). "
              "VAS is the paper's mean of per-query V/S ratios (the headline); a head that puts almost no mass on "
              f"S makes it explode, so \"heads S<floor\" gives the share of (layer, head) pairs whose mean system "
              f"mass is below {sys_floor:g} (and the most layers holding one, in a sample; then the share of single "
              "(layer, head, query) entries below it) and \"robust VAS\" the "
              "ratio of means, sum V / sum S, beside it.",
              "", "## VAS vs accuracy", "", f"Pearson correlation: {stat}.", ""]
    if "scatter" in figures:
        lines += [f"![VAS vs accuracy]({figures['scatter']})", ""]
    names = sorted({b for run in runs for b in run["benchmarks"]})
    if names:
        lines += ["## Accuracy per benchmark (%)", ""]
        lines += md_table(("stage", *names),
                          [[run["label"], *[fmt(run["benchmarks"][b]["accuracy"], percent=True)
                                            if b in run["benchmarks"] else "–" for b in names]] for run in runs])
        lines.append("")
    if "stage_chart" in figures:
        lines += [f"![accuracy and alpha_img per stage, 95% intervals]({figures['stage_chart']})", ""]
    lines += ["Runs:", ""] + [f"- {run['label']}: `{run['dir']}` (model `{run['model']}`)" for run in runs] + [""]
    return "\n".join(lines)
