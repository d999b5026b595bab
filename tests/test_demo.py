"""The demo's RL prompt pool and its reward-trend summary (avar_ray/commands/demo.py)."""
from __future__ import annotations

import json

import pytest

from avar_ray.commands.demo import heldout_section, rl_prompt_pool, rl_trend, trend_section
from avar_ray.data.schema import read_parquet


def test_rl_prompt_pool_keeps_the_first_rows_and_zero_means_the_fresh_split(procedural_parquet, tmp_path):
    rows = read_parquet(procedural_parquet)
    path = rl_prompt_pool(str(procedural_parquet), tmp_path / "pool.parquet", 5, "fresh.parquet")
    assert [s.id for s in read_parquet(path)] == [s.id for s in rows[:5]]
    assert rl_prompt_pool(str(procedural_parquet), tmp_path / "all.parquet", 0, "fresh.parquet") == "fresh.parquet"
    with pytest.raises(ValueError, match="--rl-prompts 999"):
        rl_prompt_pool(str(procedural_parquet), tmp_path / "big.parquet", 999, "fresh.parquet")


def test_rl_trend_means_of_the_first_and_last_steps(tmp_path):
    acc = [0.25, 0.5, 0.75, 0.5, 0.5, 1.0, 0.75, 1.0]
    lines = [json.dumps({"step": i + 1, "reward/accuracy": a, "reward/format": 0.5 + a / 4,
                         "reward/total": a, "rollout/count": 64}) for i, a in enumerate(acc)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines + [json.dumps({"summary": True})]) + "\n")  # a summary line is skipped
    trend = rl_trend(path, k=3)
    assert trend["steps"] == 8
    assert trend["reward/accuracy"]["first"] == pytest.approx(0.5)
    assert trend["reward/accuracy"]["last"] == pytest.approx(2.75 / 3)
    assert trend["reward/format"]["last"] == pytest.approx(0.5 + 2.75 / 12)
    assert trend["sd_of_k_step_mean"] == pytest.approx((0.25 / 192) ** 0.5)  # p 0.5 over 3 x 64 rollouts
    text = trend_section(trend, pool=16)
    assert "0.500 -> 0.917 (+0.417" in text and "fixed pool of 16" in text
    path.write_text("\n".join(lines[:2]) + "\n")
    assert "Too few RL steps (2)" in trend_section(rl_trend(path, k=3), pool=16)


def test_heldout_section_tables_and_plots_the_curve(tmp_path):
    """The demo's held-out curve: one table row per evaluation, in step order, with the greedy,
    sampled and pass@k figures the run wrote; no curve file, no section."""
    from PIL import Image

    metrics, curve = tmp_path / "metrics.jsonl", tmp_path / "heldout.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "reward/accuracy": s / 10}) + "\n" for s in range(1, 6)))
    points = [(0, 0.61, 0.52, 0.83), (5, 0.655, 0.6, 0.86)]
    curve.write_text("".join(json.dumps({"step": s, "eval/n": 200, "eval/accuracy": g, "eval/accuracy_sampled": m,
                                         "eval/pass_at_k": k}) + "\n" for s, g, m, k in points))
    text = heldout_section(metrics, curve, tmp_path / "rl_curve.png")
    assert "| step | greedy | sampled | pass@k |" in text and "200 evaluation rows" in text
    assert text.index("| 0 | 0.610 | 0.520 | 0.830 |") < text.index("| 5 | 0.655 | 0.600 | 0.860 |")
    with Image.open(tmp_path / "rl_curve.png") as im:
        assert im.format == "PNG"
    assert heldout_section(metrics, "", tmp_path / "none.png") == "" and not (tmp_path / "none.png").exists()


def test_heldout_evaluations_fall_on_the_start_every_n_steps_and_the_last():
    from avar_ray.rl.heldout import due

    assert [s for s in range(0, 21) if due(s, 5, 20)] == [0, 5, 10, 15, 20]
    assert [s for s in range(0, 8) if due(s, 3, 7)] == [0, 3, 6, 7]
    assert not any(due(s, 0, 7) for s in range(8))


def test_per_task_pass_at_1_sampled_interval_and_pass_at_k(tmp_path):
    """The held-out answers' per-task figures: pass@1 from the greedy answers, the sampled accuracy's
    interval over prompts (not over the n x k samples), pass@k; the demo tables step 0 -> the last."""
    from avar_ray.commands.demo import per_task_section
    from avar_ray.rl.heldout import per_task

    rows = [{"id": "a", "task": "count", "correct": 0.0, "sampled": [1.0, 0.0, 0.0, 0.0]},
            {"id": "b", "task": "count", "correct": 1.0, "sampled": [1.0, 1.0, 0.0, 0.0]},
            {"id": "c", "task": "colour", "correct": 1.0, "sampled": [1.0, 1.0, 1.0, 1.0]}]
    (tmp_path / "heldout").mkdir()
    (tmp_path / "heldout" / "step_0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = per_task(tmp_path / "heldout" / "step_0.jsonl")
    assert list(table) == ["colour", "count", "all"]
    count = table["count"]
    assert count["n"] == 2 and count["pass@1"] == 0.5 and count["pass@k"] == 1.0
    assert abs(count["sampled"] - 0.375) < 1e-12
    half = 1.96 * 0.125 * 2 ** 0.5 / 2 ** 0.5  # sd over the two prompts' means (0.25, 0.5), ddof 1
    assert abs(count["sampled_ci"][0] - (0.375 - half)) < 1e-9 and abs(count["sampled_ci"][1] - (0.375 + half)) < 1e-9
    assert abs(table["all"]["pass@1"] - 2 / 3) < 1e-12 and table["colour"]["sampled_ci"] == (1.0, 1.0)
    after = [dict(r, correct=1.0, sampled=[1.0] * 4) for r in rows]
    (tmp_path / "heldout" / "step_20.jsonl").write_text("".join(json.dumps(r) + "\n" for r in after))
    text = per_task_section(tmp_path, 0, 20)
    assert "| count | 2 | 0.500 -> 1.000 |" in text and "| all | 3 | 0.667 -> 1.000 |" in text
    assert per_task_section(tmp_path, 0, 0) == "" and per_task_section(tmp_path, 0, 5) == ""
