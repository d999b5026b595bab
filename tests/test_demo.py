"""The demo's RL prompt pool and its reward-trend summary (avar_ray/commands/demo.py)."""
from __future__ import annotations

import json

import pytest

from avar_ray.commands.demo import rl_prompt_pool, rl_trend, trend_section
from avar_ray.data.schema import read_parquet


def test_rl_prompt_pool_keeps_the_first_rows_and_zero_means_all(procedural_parquet, tmp_path):
    rows = read_parquet(procedural_parquet)
    path = rl_prompt_pool(str(procedural_parquet), tmp_path / "pool.parquet", 5)
    assert [s.id for s in read_parquet(path)] == [s.id for s in rows[:5]]
    assert rl_prompt_pool(str(procedural_parquet), tmp_path / "all.parquet", 0) == str(procedural_parquet)
    with pytest.raises(ValueError, match="--rl-prompts 999"):
        rl_prompt_pool(str(procedural_parquet), tmp_path / "big.parquet", 999)


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
