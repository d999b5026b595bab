"""PAPO and VPPO (``rl.perception``; issue 23) against references written here from the two
papers' released code (``avar_ray/perception.py`` cites both): the masked image against an
image masked by hand and run through the processor, PAPO's loss and gradient and VPPO's
per-token dependency against full-vocabulary forwards of the plain HF model (no chunked head,
no ``each_image_once``), VPPO's shaping and token mask against loops over the rollouts, and
the mask a function of the seed and step (a resumed run masks identically).

The tiny model is loaded in this process (no Ray); the RL runs with each method are at the end,
marked slow.
"""
from __future__ import annotations

import io
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

slow = pytest.mark.slow  # every test that starts Ray, vLLM or DeepSpeed
TOL = 1e-5


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny(tiny_model_dir, procedural_parquet):
    from actors.learner_batches import PromptCache
    from actors.policy import banned_token_ids
    from avar_ray.config import ModelConfig
    from avar_ray.data.readers import read_samples
    from avar_ray.modeling import load_model, load_processor

    torch.manual_seed(0)
    processor = load_processor(str(tiny_model_dir), ModelConfig(path=str(tiny_model_dir)))
    model = load_model(str(tiny_model_dir), dtype="float32")
    samples = read_samples(procedural_parquet)[0][:2]
    banned = banned_token_ids(processor)
    allowed = [i for i in range(model.config.get_text_config().vocab_size) if i not in set(banned)]
    gen = torch.Generator().manual_seed(1)
    # two rollouts per prompt, of unequal lengths (padding inside the micro-batch)
    responses = [[allowed[int(j)] for j in torch.randint(0, len(allowed), (n,), generator=gen)] for n in (5, 7, 6, 3)]
    return SimpleNamespace(processor=processor, model=model, samples=samples, banned=banned, responses=responses,
                           cache=PromptCache(processor))


def make_items(tiny, advantages=(1.0, -1.0, 0.5, -0.5)):
    from actors.records import TrainItem

    return [TrainItem(tiny.samples[i // 2], r, a, [0.0] * len(r)) for i, (r, a) in
            enumerate(zip(tiny.responses, advantages))]


def perception_pass(tiny, seed=0, **settings):
    from actors.perception import PerceptionPass
    from avar_ray.config import PerceptionConfig, RLConfig

    return PerceptionPass(tiny.processor, RLConfig(seed=seed, perception=PerceptionConfig(**settings)))


def learner(tiny):
    """What ``PerceptionPass`` uses of a Learner: its engine and its log-prob forward."""
    from actors.policy import forward_logprobs

    def logprobs(model, encoded, items, **kwargs):
        return forward_logprobs(model, encoded, [len(it.response_ids) for it in items], 1.0, tiny.banned, **kwargs)

    return SimpleNamespace(engine=tiny.model, _logprobs=logprobs)


def reference_logprobs(tiny, samples, responses) -> list[torch.Tensor]:
    """log softmax over the whole vocabulary of a plain HF forward (every row its own image
    copy), the banned ids at -inf, at each response token: one tensor per row."""
    from actors.policy import encode_rollouts
    from avar_ray.decoding import ban_logits

    encoded = encode_rollouts(tiny.processor, samples, responses)
    logits = tiny.model(**encoded.inputs, use_cache=False).logits.float()  # [B, T, V]
    logp = torch.log_softmax(ban_logits(logits, tiny.banned), dim=-1)
    out = []
    for b, (start, r) in enumerate(zip(encoded.prompt_lengths, responses)):
        pos = torch.arange(start, start + len(r))
        out.append(logp[b, pos - 1, torch.tensor(r)])
    return out


def patch_rows_to_pixels(grid_thw, merge: int):
    """Row k of a Qwen2-VL image's pixel_values -> its (patch row, patch column) on the image:
    rows run over merge windows (row-major), then inside a window (row-major)."""
    _, gh, gw = grid_thw
    for bh in range(gh // merge):
        for bw in range(gw // merge):
            for mh in range(merge):
                for mw in range(merge):
                    yield bh * merge + mh, bw * merge + mw


def masked_by_hand(tiny, pp, step: int):
    """Each sample with its image blackened by hand where the masked copy has black rows, as
    a PNG through the processor: (hand-masked samples, the masked copies' pixel_values)."""
    ip = tiny.processor.image_processor
    prompts = tiny.cache.prompts(tiny.samples)
    black = -torch.tensor(ip.image_mean) / torch.tensor(ip.image_std)
    out, ours = [], []
    for sample, prompt in zip(tiny.samples, prompts):
        masked = pp.masked_prompt(prompt, step).inputs["pixel_values"]
        rows = masked.view(masked.shape[0], 3, -1)
        hit = torch.isclose(rows, black.view(1, 3, 1), atol=1e-6).all(-1).all(-1)
        image = Image.open(io.BytesIO(sample.images[0])).convert("RGB")
        (t, gh, gw), p = prompt.inputs["image_grid_thw"][0].tolist(), ip.patch_size
        assert image.size == (gw * p, gh * p), "the test wants an image the processor does not resize"
        pixels = image.load()
        for k, (y, x) in enumerate(patch_rows_to_pixels((t, gh, gw), ip.merge_size)):
            if hit[k]:
                for dy in range(p):
                    for dx in range(p):
                        pixels[x * p + dx, y * p + dy] = (0, 0, 0)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append(replace(sample, images=[buf.getvalue()]))
        ours.append(masked)
        assert 0 < hit.float().mean() < 1
    return out, ours


# ----------------------------------------------------------------------------- the masked image
@pytest.mark.parametrize("override, key", [
    ("rl.perception.mask_ratio=0", "rl.perception.mask_ratio"),
    ("rl.perception.vppo_top_k=0", "rl.perception.vppo_top_k"),
    ("rl.perception.vppo_advantage_min=1.5", "rl.perception.vppo_advantage_min"),
    ("rl.perception.papo_coef=-0.1", "rl.perception.papo_coef"),
    ("rl.perception.papo_masked_grad=true", "rl.perception.papo_masked_grad"),  # PAPO off
    ("rl.perception.mask=noise", "rl.perception.mask_ratio"),  # with mask_ratio=0.5 below
    ("rl.perception.mask=blur", "rl.perception.mask"),
])
def test_settings_that_cannot_work_are_refused_naming_the_key(override, key):
    from avar_ray.config import ConfigError, load_config

    extra = ["rl.perception.mask_ratio=0.5"] if override.endswith("noise") else []
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override, *extra])
    assert load_config(None, ["rl.perception.papo_coef=0.02", "rl.perception.papo_masked_grad=true",
                              "rl.perception.vppo=true"]).rl.perception.vppo


def test_mask_is_a_function_of_seed_step_sample_and_image(tiny):
    from avar_ray.perception import mask_pixels, mask_seed

    prompt = tiny.cache.prompts(tiny.samples[:1])[0]
    pv = prompt.inputs["pixel_values"].clone()
    a = perception_pass(tiny, seed=3).masked_prompt(prompt, 5).inputs["pixel_values"]
    resumed = perception_pass(tiny, seed=3).masked_prompt(prompt, 5).inputs["pixel_values"]  # a new learner
    assert torch.equal(a, resumed)
    assert not torch.equal(a, perception_pass(tiny, seed=3).masked_prompt(prompt, 6).inputs["pixel_values"])
    assert not torch.equal(a, perception_pass(tiny, seed=4).masked_prompt(prompt, 5).inputs["pixel_values"])
    assert torch.equal(pv, prompt.inputs["pixel_values"])  # the cached prompt is left as it was
    assert mask_seed(0, 1, "a", 0) != mask_seed(0, 1, "a", 1) != mask_seed(0, 1, "b", 0)
    # the share of blackened patches follows mask_ratio (Bernoulli per patch, PAPO's / VPPO's rule)
    big = torch.randn(4000, 3, 1, 4).expand(4000, 3, 2, 4).reshape(4000, 24)  # 2 equal frames, 2x2 patches
    ip = tiny.processor.image_processor
    for ratio in (0.5, 0.6):
        out = mask_pixels(big, "patches", ratio, 7, ip.image_mean, ip.image_std, 2)
        changed = (out != big).any(1).float().mean().item()
        assert abs(changed - ratio) < 0.03
    noisy = mask_pixels(big, "noise", 0.6, 7, ip.image_mean, ip.image_std, 2).view(4000, 3, 2, 4)
    assert torch.equal(noisy[:, :, 0], noisy[:, :, 1])  # the two temporal copies of a frame stay equal
    lo = (0 - torch.tensor(ip.image_mean)) / torch.tensor(ip.image_std)
    hi = (1 - torch.tensor(ip.image_mean)) / torch.tensor(ip.image_std)
    assert ((noisy >= lo.view(1, 3, 1, 1) - 1e-5) & (noisy <= hi.view(1, 3, 1, 1) + 1e-5)).all()


def test_masked_pass_equals_a_forward_on_the_image_masked_by_hand(tiny):
    items = make_items(tiny)
    pp = perception_pass(tiny, vppo=True)
    hand_samples, ours = masked_by_hand(tiny, pp, step=2)
    hand_prompts = tiny.cache.prompts(hand_samples)
    for prompt, masked in zip(hand_prompts, ours):
        assert torch.allclose(prompt.inputs["pixel_values"], masked, atol=TOL)
    with torch.no_grad():
        got = pp.score_logprobs(learner(tiny), tiny.cache.prompts([it.sample for it in items]), items, 2)
        want = reference_logprobs(tiny, [hand_samples[i // 2] for i in range(4)], tiny.responses)
    for g, w in zip(got, want):
        assert torch.allclose(torch.tensor(g), w, atol=1e-4)


# ----------------------------------------------------------------------------- PAPO
@pytest.mark.parametrize("masked_grad", [False, True])
def test_papo_loss_and_gradient_match_the_papers_formula(tiny, masked_grad):
    from avar_ray.grpo import batch_info

    coef, ent = 0.02, 0.05
    items = make_items(tiny)
    pp = perception_pass(tiny, papo_coef=coef, papo_entropy_coef=ent, papo_masked_grad=masked_grad)
    prompts = tiny.cache.prompts([it.sample for it in items])
    lrn = learner(tiny)
    if not masked_grad:  # PAPO's code: the masked side from the no-grad pass before the update
        with torch.no_grad():
            masked = pp.score_logprobs(lrn, prompts, items, 4)
        items = [replace(it, masked_logprobs=m) for it, m in zip(items, masked)]
    hand_samples, _ = masked_by_hand(tiny, pp, step=4)
    n_tok = sum(len(r) for r in tiny.responses)
    info = batch_info(1, n_tok, len(items))
    params = [tiny.model.lm_head.weight, tiny.model.model.visual.blocks[0].mlp.down_proj.weight]

    def grads(loss):
        tiny.model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in params]

    encoded = tiny.cache.encode(items)[0]
    logprob, _, mask = lrn._logprobs(tiny.model, encoded, items)
    loss = pp.update_terms(lrn, logprob, mask, items, prompts, 4, info, record=True)
    got = grads(loss)
    parts = pp.end_step()

    # the reference: per sampled token l (real image, grad) and m (hand-masked image; grad only
    # with masked_grad), k3 = exp(m - l) - (m - l) - 1 in [-10, 10], token means over the batch
    real = torch.cat(reference_logprobs(tiny, [it.sample for it in items], tiny.responses))
    hand = torch.cat(reference_logprobs(tiny, [hand_samples[i // 2] for i in range(4)], tiny.responses))
    hand = hand if masked_grad else hand.detach()
    d = hand - real
    kl = (d.exp() - d - 1).clamp(-10, 10).mean()
    ref_loss = -coef * kl + ent * ((-real).mean() + (-hand).mean())
    want = grads(ref_loss)
    assert math.isclose(loss.detach().item(), ref_loss.detach().item(), rel_tol=1e-4, abs_tol=1e-6)
    assert math.isclose(parts["papo_kl"], kl.item(), rel_tol=1e-4, abs_tol=1e-7) and parts["papo_kl"] > 0
    assert math.isclose(parts["papo_entropy_masked"], (-hand).mean().item(), rel_tol=1e-4)
    for g, w in zip(got, want):
        assert w.abs().max() > 0
        assert torch.allclose(g, w, rtol=1e-3, atol=1e-4 * float(w.abs().max()))
    tiny.model.zero_grad()


# ----------------------------------------------------------------------------- VPPO
def reference_vppo(old, masked, minis, top_k, a_min):
    """VPPO-RL's dp_actor.update_policy, per rollout in plain Python: the token dependency,
    the mini-batch's min-max normalised trajectory scores mapped to [a_min, a_min + (1 - a_min) /
    mean], and the top ceil(n * top_k) tokens."""
    scales, keeps, deps = {}, {}, {}
    for rows in minis:
        for i in rows:
            deps[i] = [min(max(math.exp(m - o) - (m - o) - 1, 0.0), 10.0) for o, m in zip(old[i], masked[i])]
        scores = {i: sum(deps[i]) / len(deps[i]) for i in rows}
        lo, hi = min(scores.values()), max(scores.values())
        if hi - lo > 1e-6:  # else (one rollout, equal scores) the advantages stay as they are
            norm = {i: (s - lo) / (hi - lo) for i, s in scores.items()}
            mu = sum(norm.values()) / len(norm)
            a_max = a_min + (1 - a_min) / (mu + 1e-8)
        for i in rows:
            scales[i] = a_min + norm[i] * (a_max - a_min) if hi - lo > 1e-6 else 1.0
            k = math.ceil(len(deps[i]) * top_k)
            top = sorted(range(len(deps[i])), key=lambda t: -deps[i][t])[:k]
            keeps[i] = [1.0 if t in top else 0.0 for t in range(len(deps[i]))]
    return scales, keeps, deps


def test_vppo_dependency_shaping_and_token_mask_match_the_papers_code(tiny):
    from actors.perception import shape_items

    items = make_items(tiny)
    pp = perception_pass(tiny, vppo=True, vppo_top_k=0.4, vppo_advantage_min=0.9)
    prompts = tiny.cache.prompts([it.sample for it in items])
    lrn = learner(tiny)
    with torch.no_grad():
        old = lrn._logprobs(tiny.model, tiny.cache.encode(items)[0], items)[0]
        old = [old[b, :len(it.response_ids)].tolist() for b, it in enumerate(items)]
        masked = pp.score_logprobs(lrn, prompts, items, 1)
        hand_samples, _ = masked_by_hand(tiny, pp, step=1)
        ref_old = reference_logprobs(tiny, [it.sample for it in items], tiny.responses)
        ref_masked = reference_logprobs(tiny, [hand_samples[i // 2] for i in range(4)], tiny.responses)
    for a, b in zip(old + masked, ref_old + ref_masked):
        assert torch.allclose(torch.tensor(a), b, atol=1e-4)
    items = [replace(it, old_logprobs=o, masked_logprobs=m) for it, o, m in zip(items, old, masked)]
    minis = [[0, 1, 3], [2]]  # two mini-batches: each normalises its own scores (one alone: no shaping)
    shaped, metrics = shape_items(pp.p, items, minis)
    scales, keeps, deps = reference_vppo(old, masked, minis, 0.4, 0.9)
    ref_dep = [[min(max(math.exp(float(m - o)) - float(m - o) - 1, 0.0), 10.0) for o, m in zip(ro, rm)]
               for ro, rm in zip(ref_old, ref_masked)]
    for i, it in enumerate(shaped):
        assert math.isclose(it.advantage, items[i].advantage * scales[i], rel_tol=1e-5)
        assert it.keep == keeps[i]
        assert all(math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-5) for a, b in zip(deps[i], ref_dep[i]))
    s = [scales[i] for i in minis[0]]  # the scales average 1 over a mini-batch, from a_min up
    assert math.isclose(sum(s) / len(s), 1.0, rel_tol=1e-6) and math.isclose(min(s), 0.9) and scales[2] == 1.0
    n_tok = sum(len(k) for k in keeps.values())
    assert math.isclose(metrics["perception/vppo_kept"], sum(map(sum, keeps.values())) / n_tok)
    assert math.isclose(metrics["perception/vppo_dependency"], sum(map(sum, deps.values())) / n_tok, rel_tol=1e-5)
    assert metrics["perception/vppo_scale_max"] > 1.0
    assert math.isclose(metrics["perception/vppo_scale_min"], 0.9, rel_tol=1e-6)


def test_vppo_token_mask_weighs_the_policy_loss_as_their_loss_token_mask():
    """verl's policy loss with the keep-mask as per-token weights: the tokens off the mask add
    nothing, and the token mean still divides by every response token (VPPO's average_loss)."""
    from avar_ray.grpo import batch_info, policy_loss

    gen = torch.Generator().manual_seed(0)
    old, new = torch.randn(3, 5, generator=gen) - 2, torch.randn(3, 5, generator=gen) - 2
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]).bool()
    keep = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [1, 1, 0, 0, 0]]).float()
    adv = torch.tensor([1.0, -0.5, 2.0])
    loss, _ = policy_loss(old, new, adv, mask, 0.2, 3, batch_info(1, int(mask.sum()), 3), "token-mean", keep)
    ratio = (new - old).exp()
    a = adv[:, None].expand_as(ratio)
    surrogate = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2))
    surrogate = torch.where(a < 0, torch.minimum(surrogate, -a * 3.0), surrogate)  # verl's dual clip
    assert torch.allclose(loss, (surrogate * keep * mask).sum() / mask.sum(), atol=1e-6)


# ----------------------------------------------------------------------------- RL runs
RUNS = {  # issue 23's three runs: PAPO (here with its masked forward with grad), VPPO, both with VARS
    "papo": ["rl.perception.papo_coef=0.02", "rl.perception.papo_masked_grad=true", "rl.reward.lambda_v=0"],
    "vppo": ["rl.perception.vppo=true", "rl.reward.lambda_v=0"],
    # composed: VPPO's scales per mini-batch over 2 PPO epochs, the asynchronous pipeline, dynamic sampling
    "papo_vppo_vars": ["rl.perception.papo_coef=0.02", "rl.perception.vppo=true", "rl.mini_batches=2",
                       "rl.ppo_epochs=2", "rl.max_staleness=1", "rl.dynamic_sampling=true"],
}


@slow
@pytest.mark.parametrize("name", list(RUNS))
def test_rl_run_with_perception_objectives(ray_local, tiny_model_dir, procedural_parquet, tmp_path, name):
    from test_rl_run import CONFIG, N_SAMPLES, PROMPTS_PER_STEP, _overrides

    from avar_ray.config import load_config
    from avar_ray.rl import run_rl
    from avar_ray.tracking import read_metrics

    steps = 3
    cfg = load_config(CONFIG, _overrides(tiny_model_dir, procedural_parquet, tmp_path / "rl", steps)
                      + ["rl.export_hf=false", "rl.save_every=0"] + RUNS[name])
    report = run_rl(cfg)
    records = read_metrics(tmp_path / "rl" / "metrics.jsonl")
    assert report.steps == steps and [r["step"] for r in records] == [1, 2, 3]
    papo, vppo = cfg.rl.perception.papo_coef > 0, cfg.rl.perception.vppo
    for r in records:
        assert r["actor/update_skipped"] == 0 and r["actor/grad_norm"] > 0
        # the score pass forwards every rollout's masked image, none with PAPO's masked forward in the update
        assert r["learner/score_rollouts"] == (0 if name == "papo" else PROMPTS_PER_STEP * N_SAMPLES)
        assert (r.get("perception/papo_kl") is not None) == papo and (r.get("perception/vppo_kept") is not None) == vppo
        if papo:
            assert r["perception/papo_kl"] > 0 and r["perception/papo_entropy_real"] > 0
            assert r["perception/papo_entropy_masked"] > 0 and math.isfinite(r["perception/papo_loss"])
        if vppo:
            assert 0.4 <= r["perception/vppo_kept"] < 1 and r["perception/vppo_dependency"] > 0
            assert r["perception/vppo_scale_min"] >= 0.9 - 1e-6 and r["perception/vppo_scale_max"] > 1
        if name == "papo_vppo_vars":
            assert r["reward/visual"] > 0 and r["actor/updates"] == 4 and r["dynamic/dropped_groups"] == 0
        else:
            assert r["learner/visual_stats_rollouts"] == 0


@slow
def test_two_zero3_learners_agree_with_one(ray_local, tiny, tiny_model_dir):
    """PAPO (masked forward with grad: two forwards before each backward under ZeRO-3) and VPPO
    on 1 and on 2 ZeRO-3 learner ranks: the same masked log-probs, metrics and update."""
    from test_rl_actors import make_learners

    from actors.records import TrainItem

    gen = torch.Generator().manual_seed(2)
    allowed = sorted({t for r in tiny.responses for t in r})
    items = [TrainItem(tiny.samples[i // 4], [allowed[int(j)] for j in torch.randint(0, len(allowed), (3 + i,),
                                                                                        generator=gen)],
                       float(i % 4) - 1.5, [0.0] * (3 + i)) for i in range(8)]
    perception = {"papo_coef": 0.02, "papo_masked_grad": True, "vppo": True}
    runs = []
    for learners in (1, 2):
        from avar_ray.config import PerceptionConfig

        group = make_learners(tiny_model_dir, zero_stage=3, lr=1e-4, placement={"learners": learners},
                              perception=PerceptionConfig(**perception))
        try:
            before = group.logprobs(items)
            passes, _ = group.score(items, [False] * len(items), step=7)
            scored = [replace(it, old_logprobs=p.old_logprobs, masked_logprobs=p.masked_logprobs)
                      for it, p in zip(items, passes)]
            runs.append((passes, group.train_step(scored, step=7), before, group.logprobs(items)))
        finally:
            group.shutdown()
    (p1, m1, before, after1), (p2, m2, _, after2) = runs
    for a, b in zip(p1, p2):
        assert a.masked_logprobs is not None
        assert max(abs(x - y) for x, y in zip(a.masked_logprobs, b.masked_logprobs)) < 1e-5
    for key in ("perception/papo_kl", "perception/papo_entropy_masked", "perception/papo_loss",
                "perception/vppo_dependency", "perception/vppo_kept", "perception/vppo_scale_max", "actor/pg_loss",
                "actor/grad_norm"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-7), key
    moved = max(abs(x - y) for a, b in zip(after1, before) for x, y in zip(a, b))
    apart = max(abs(x - y) for a, b in zip(after1, after2) for x, y in zip(a, b))
    assert moved > 1e-3 and apart < 0.05 * moved, (moved, apart)
