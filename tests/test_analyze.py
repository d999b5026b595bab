"""`avar analyze`: Pearson r / p over evaluated runs equal scipy's on the same points, the stage
table and figures are written, bad run directories fail with a message naming the file. Pure
(results.json files written by the test): no model, no Ray."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from avar_ray.cli import main
from avar_ray.eval.analyze import bootstrap, pearson, run_analyze, wilson

# (label, overall VAS with Q = U, overall accuracy): a made-up base → cold start → RL → extra run
POINTS = [("base", 7.5, 0.491), ("cold start", 10.1, 0.510), ("agto", 13.8, 0.526), ("rl", 18.9, 0.561)]


def write_run(root: Path, name: str, vas, accuracy, label=None) -> Path:
    """An `avar eval` output directory with the results.json fields analyze reads."""
    run = root / name
    run.mkdir(parents=True)
    overall = {"n": 20, "accuracy": accuracy, "vas": vas, "vas_response": None if vas is None else vas / 2,
               "alpha_img": 0.01 * (vas or 0)}
    results = {"label": label, "model": f"/models/{name}", "overall": overall,
               "benchmarks": {"mathvista": {**overall, "n": 12}, "mmstar": {**overall, "n": 8, "accuracy": 0.25}}}
    (run / "results.json").write_text(json.dumps(results))
    return run


def test_analyze_r_and_p_equal_scipy(tmp_path):
    runs = [write_run(tmp_path, f"run{i}", vas, acc, label) for i, (label, vas, acc) in enumerate(POINTS)]
    out = tmp_path / "analysis"
    assert main(["analyze", *map(str, runs), "--out", str(out)]) == 0

    x, y = [p[1] for p in POINTS], [p[2] for p in POINTS]
    expected = stats.pearsonr(x, y)
    summary = json.loads((out / "analysis.json").read_text())
    corr = summary["correlation"]
    assert corr["n"] == 4
    assert corr["r"] == pytest.approx(float(expected.statistic), abs=1e-12)
    assert corr["p"] == pytest.approx(float(expected.pvalue), abs=1e-12)
    # and the textbook formula, independently of scipy
    xc, yc = np.array(x) - np.mean(x), np.array(y) - np.mean(y)
    assert corr["r"] == pytest.approx(float((xc @ yc) / math.sqrt((xc @ xc) * (yc @ yc))), abs=1e-12)
    assert [r["label"] for r in summary["runs"]] == [p[0] for p in POINTS]

    report = (out / "analysis.md").read_text()
    assert f"r = {corr['r']:.4f}" in report
    # stage table: deltas against the first run, in the given order
    lo, hi = wilson(0.491, 20)
    assert f"| base | 49.1 [{lo * 100:.1f}, {hi * 100:.1f}] | +0.0 | 7.50 |" in report
    assert "| rl | 56.1 [" in report and "| +7.0 | 18.90 |" in report
    # accuracy per benchmark (columns sorted by name: mathvista, mmstar)
    assert "| stage | mathvista | mmstar |" in report and "| cold start | 51.0 | 25.0 |" in report
    for png in ("vas_vs_accuracy.png", "stage_chart.png"):
        assert f"({png})" in report
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 200


def test_analyze_labels_and_undefined_correlation(tmp_path):
    a = write_run(tmp_path, "a", 5.0, 0.3)
    b = write_run(tmp_path, "b", None, 0.4)  # no VAS (e.g. no samples): kept in the table, not in r
    summary = run_analyze([a, b], tmp_path / "out", labels=["first", "second"])
    assert [r["label"] for r in summary["runs"]] == ["first", "second"]
    assert summary["correlation"] == {"r": None, "p": None, "n": 1}
    assert "not defined" in (tmp_path / "out" / "analysis.md").read_text()
    # directory name when neither --labels nor the eval's label is given
    assert run_analyze([a], tmp_path / "out2")["runs"][0]["label"] == "a"


def test_pearson_edge_cases():
    assert pearson([1.0], [2.0]) == (None, None)
    assert pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == (None, None)  # constant x: r undefined
    r, p = pearson([1.0, 2.0], [3.0, 5.0])
    assert r == pytest.approx(1.0) and p == pytest.approx(1.0)  # two points: perfect, no evidence
    with pytest.raises(ValueError, match="3 x values but 2 y values"):
        pearson([1.0, 2.0, 3.0], [1.0, 2.0])


def test_analyze_bad_run_directories(tmp_path):
    good = write_run(tmp_path, "good", 5.0, 0.3)
    with pytest.raises(SystemExit, match="nowhere/results.json"):
        main(["analyze", str(good), str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.json").write_text("{not json")
    with pytest.raises(SystemExit, match="broken/results.json: not valid JSON"):
        main(["analyze", str(broken), "--out", str(tmp_path / "o")])
    (broken / "results.json").write_text(json.dumps({"overall": {"accuracy": 0.1}}))
    with pytest.raises(SystemExit, match="overall.vas is missing"):
        main(["analyze", str(broken), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="1 labels for 2 run directories"):
        main(["analyze", str(good), str(good), "--labels", "x", "--out", str(tmp_path / "o")])


def test_intervals_wilson_equals_scipy_and_bootstrap_covers_the_mean(tmp_path):
    for k, n in ((0, 10), (3, 10), (57, 200), (200, 200)):
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson(k / n, n) == pytest.approx((ci.low, ci.high), abs=1e-9)
    assert wilson(None, 10) is None and wilson(0.5, 0) is None
    values = list(np.random.default_rng(1).normal(5.0, 2.0, 400)) + [None, math.nan]  # non-finite skipped
    mean, low, high = bootstrap(values)
    half = 1.96 * 2.0 / math.sqrt(400)
    assert mean == pytest.approx(np.mean(values[:400])) and low < mean < high
    assert high - low == pytest.approx(2 * half, rel=0.25)  # the normal interval, within sampling noise
    # per-sample records: the table carries the bootstrap intervals and the heads blind to S
    run = write_run(tmp_path, "r", 7.5, 0.5)
    rows = [{"attention": {"user": {"vas": v, "vas_robust": v / 10, "alpha_img": 0.1, "low_sys_heads": 2,
                                    "low_sys_layers": 1, "heads": 16, "low_sys_queries": 0.25},
                           "response": {"vas": 3 * v, "alpha_img": 0.2}}} for v in (5.0, 10.0)]
    (run / "samples.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    summary = run_analyze([run], tmp_path / "out")
    ci = summary["runs"][0]["intervals"]
    # two values: the resampled means are the lower (p 1/4), the mean (1/2) or the upper (1/4), so the
    # 95% percentile interval is exactly the two values; each figure from its own field
    assert ci["vas"] == pytest.approx((7.5, 5.0, 10.0)) and ci["vas_robust"] == pytest.approx((0.75, 0.5, 1.0))
    assert ci["vas_response"] == pytest.approx((22.5, 15.0, 30.0)) and ci["alpha_img_response"] == pytest.approx((0.2,) * 3)
    assert ci["low_sys_heads"] == pytest.approx(2 / 16)
    assert "| 12% (1 layers); queries 25% |" in (tmp_path / "out" / "analysis.md").read_text()


def test_vas_companions_count_what_explodes_the_mean_of_ratios():
    """One query of one head with a near-zero system mass: the paper's VAS explodes, the ratio
    of means stays near V/S of the rest, and the per-head / per-query counts say where."""
    import torch

    from avar_ray.attention.context import AttentionStats
    from avar_ray.attention.vas import SYS_FLOOR, vas_from_stats

    b, layers, heads, t = 1, 2, 4, 6
    mass_v, mass_s = torch.full((b, layers, heads, t), 0.2), torch.full((b, layers, heads, t), 0.4)
    q = torch.tensor([[False, False, True, True, True, True]])
    mass_s[0, 1, 3, 2] = 1e-9  # one query of layer 1, head 3
    mass_s[0, 0, 2, 2:] = SYS_FLOOR / 10  # every query of layer 0, head 2: a head blind to S
    stats = AttentionStats(mass_v, mass_s, q, torch.tensor([16]), [0, 1], torch.tensor([5]))
    row = vas_from_stats(stats).rows()[0]
    assert row["vas"] > 1e6  # the mean of ratios explodes
    kept = 2 * 4 * 4 - 1 - 4  # entries with a normal system mass
    expected = (0.2 * 32) / (0.4 * kept + 1e-9 + 4 * SYS_FLOOR / 10)
    assert row["vas_robust"] == pytest.approx(expected, rel=1e-9) and row["vas_robust"] < 1.0
    assert (row["low_sys_heads"], row["low_sys_layers"], row["heads"]) == (1, 1, 8)
    assert row["low_sys_queries"] == pytest.approx(5 / 32)


def test_figures_use_log_axes_where_values_span_decades(tmp_path):
    """VAS of a tiny model spans 1e2-1e12: the profile, per-sample and scatter axes are then
    logarithmic; values within two decades stay on a linear axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from avar_ray.eval.plots import log_scale_if_wide

    wide, narrow = plt.subplots()[1], plt.subplots()[1]
    assert log_scale_if_wide(wide, [1e2, 3e5, None, 1e12]) and wide.get_yscale() == "log"
    assert not log_scale_if_wide(narrow, [7.5, 18.9, 40.0]) and narrow.get_yscale() == "linear"
    zero = plt.subplots()[1]
    assert not log_scale_if_wide(zero, [0.0, 1e9], axis="x") and zero.get_xscale() == "linear"
    plt.close("all")


def test_stage_chart_panels_carry_the_intervals_of_the_table(tmp_path):
    """The stage chart's bars and error bars are the table's figures: accuracy in % with its
    Wilson interval, alpha_img with its bootstrap interval (from samples.jsonl)."""
    from avar_ray.eval.analyze import intervals, load_run, stage_figures

    run_dir = write_run(tmp_path, "rl", 18.9, 0.561, "rl")
    rng = np.random.default_rng(0)
    alphas = rng.uniform(0.1, 0.3, 20)
    (run_dir / "samples.jsonl").write_text("\n".join(json.dumps(
        {"attention": {"user": {"vas": 1.0, "vas_robust": 1.0, "alpha_img": float(a)}, "response": {}}})
        for a in alphas))
    run = load_run(run_dir)
    run["overall"]["alpha_img"] = float(alphas.mean())
    run["intervals"] = intervals(run)
    panels = dict(stage_figures([run]))
    acc = panels["accuracy (%)"][0]
    lo, hi = wilson(0.561, 20)
    assert acc == pytest.approx((56.1, lo * 100, hi * 100))
    value, low, high = panels["alpha_img (Q=U)"][0]
    assert value == pytest.approx(alphas.mean()) and low < value < high
    assert panels["alpha_img (Q=R)"] == [None]  # no response figure in this run: no bar, no invented interval
