"""The attention core against a direct computation from eager ``output_attentions`` on the tiny
model: statistics, VAS & friends, AGTO losses and their gradients, the intervention (as a
re-weighting of eager attention weights) and generation with it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from avar_ray.attention import (AttentionContext, Intervention, agto_losses, attention_statistics, compute_vas,
                                generate, register_attention, vas_from_stats)
from avar_ray.modeling import encode_batch, load_model, load_processor

RTOL = 1e-4
REF_IMPL = "avar_test_reweighted_eager"


# ----------------------------------------------------------------------------- reference
def reweighted_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, ref_reweight=None,
                     ref_layers=None, **kwargs):
    """Eager attention whose weights are multiplied per key by ``ref_reweight`` [B, T] and
    renormalised (text layers in ``ref_layers``, None = all); returns the weights."""
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = query.shape[1] // key.shape[1]
    k, v = repeat_kv(key, groups), repeat_kv(value, groups)
    logits = torch.matmul(query, k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        logits = logits + attention_mask
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32)
    layer = getattr(module, "layer_idx", None)
    if ref_reweight is not None and layer is not None and (ref_layers is None or layer in ref_layers):
        r = ref_reweight
        if r.shape[1] < k.shape[2]:
            r = torch.cat([r, r.new_ones(r.shape[0], k.shape[2] - r.shape[1])], dim=1)
        weights = weights * r[:, None, None, :]
        weights = weights / weights.sum(-1, keepdim=True)
    out = torch.matmul(weights.to(value.dtype), v)
    return out.transpose(1, 2).contiguous(), weights


def _register_reference() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(REF_IMPL, reweighted_eager)
    AttentionMaskInterface.register(REF_IMPL, eager_mask)


def eager_masses(attentions, spans, query):
    """Masses from full attention maps: ``[B, L, H, T]`` each, zero outside Q."""
    a = torch.stack(attentions, dim=1)  # [B, L, H, T, T]
    mv = (a * spans.visual[:, None, None, None, :]).sum(-1)
    ms = (a * spans.system[:, None, None, None, :]).sum(-1)
    q = spans.query(query)[:, None, None, :]
    return torch.where(q, mv, 0.0), torch.where(q, ms, 0.0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ----------------------------------------------------------------------------- fixtures
def load_with_reference(path: str):
    """The processor, the ``avar`` model and the re-weighted eager reference of a checkpoint."""
    register_attention()
    _register_reference()
    return load_processor(path), load_model(path).eval(), load_model(path, attn_implementation=REF_IMPL).eval()


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    proc, avar, ref = load_with_reference(str(tiny_model_dir))
    eager = load_model(str(tiny_model_dir), attn_implementation="eager").eval()
    return proc, avar, eager, ref


def _image(seed: int, size: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


# (images, system prompt, question, response)
ROWS = [
    ([56], None, "What is the colour of the shape?", "The answer is red"),
    ([84, 56], "You are a helpful assistant. Look at the image.", "How many are there?", "3"),
    ([112], "Answer with the option letter.", "Which is bigger, A or B?", "Let me look at the image again: B"),
    ([], None, "What is 2 + 3?", "5"),
]
CASES = {
    "1img_nosys_b1": ([0], "right"),
    "2img_sys_b1": ([1], "right"),
    "b3_left": ([0, 1, 2], "left"),
    "b3_right": ([2, 0, 1], "right"),
}


def _encode(proc, rows, padding_side="right", responses=True):
    messages, images, texts = [], [], []
    for k, (sizes, system, question, response) in enumerate(rows):
        turns = [] if system is None else [{"role": "system", "content": system}]
        turns.append({"role": "user", "content": [{"type": "image"} for _ in sizes] + [{"type": "text", "text": question}]})
        messages.append(turns)
        images.append([_image(10 * k + i, s) for i, s in enumerate(sizes)])
        texts.append(response)
    return encode_batch(proc, messages, images, response_texts=texts if responses else None, padding_side=padding_side)


@pytest.fixture(scope="module")
def cases(models):
    """Encoded batch and eager attention maps (no grad) per case."""
    proc, _, eager, _ = models
    out = {}
    for name, (idx, side) in CASES.items():
        enc = _encode(proc, [ROWS[i] for i in idx], side)
        with torch.no_grad():
            eo = eager(**enc.inputs, output_attentions=True)
        out[name] = (enc, eo)
    return out


# ----------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("method", ["lse", "fused", "chunked"])
@pytest.mark.parametrize("query", ["user", "response", "user_visual"])
@pytest.mark.parametrize("case", list(CASES))
def test_statistics_match_eager(models, cases, case, query, method):
    _, avar, _, _ = models
    enc, eo = cases[case]
    out, stats = attention_statistics(avar, enc, query=query, method=method, chunk_size=5)
    mv, ms = eager_masses(eo.attentions, enc.spans, query)
    assert stats.mass_v.shape == (enc.spans.visual.shape[0], 4, 4, enc.spans.visual.shape[1])
    assert stats.layers == [0, 1, 2, 3]
    assert rel_err(stats.mass_v, mv) < RTOL
    assert rel_err(stats.mass_s, ms) < RTOL
    q = enc.spans.query(query)[:, None, None, :]
    # elementwise too (small masses): relative error per query position
    for ours, ref in ((stats.mass_v, mv), (stats.mass_s, ms)):
        assert float(((ours - ref).abs() / ref.clamp_min(1e-30))[q.expand_as(ref)].max()) < RTOL
    assert torch.equal(stats.visual_count, enc.spans.visual.sum(-1))
    valid = enc.inputs["attention_mask"].bool()
    assert float((out.logits - eo.logits)[valid].abs().max()) < 1e-3  # the forward is the model's


@pytest.mark.parametrize("case", list(CASES))
def test_vas_metrics_match_eager(models, cases, case):
    proc, avar, _, _ = models
    enc, eo = cases[case]
    for query in ("user", "response"):
        result = compute_vas(avar, enc, query=query)
        a = torch.stack(eo.attentions, 1).double()  # [B, L, H, T, T]
        mv = (a * enc.spans.visual[:, None, None, None, :]).sum(-1)
        ms = (a * enc.spans.system[:, None, None, None, :]).sum(-1)
        image_pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        for b in range(a.shape[0]):
            q = enc.spans.query(query)[b]
            ratio = (mv[b][..., q] / ms[b][..., q])  # [L, H, |Q|]
            n_v = int((enc.inputs["input_ids"][b] == image_pad).sum())  # |V| from the ids, not the spans
            expected = {"vas": ratio.mean(), "alpha_img": mv[b][..., q].mean(), "alpha_sys": ms[b][..., q].mean(),
                        "eps_img": mv[b][..., q].mean() / n_v}
            for key, value in expected.items():
                got = getattr(result, key)[b]
                assert abs(float(got) - float(value)) <= RTOL * abs(float(value)), (key, b, float(got), float(value))
            assert torch.allclose(result.per_layer[b], ratio.mean((1, 2)), rtol=RTOL, atol=0)
        rows = result.rows(ids=[f"s{b}" for b in range(a.shape[0])])
        assert rows[0]["id"] == "s0" and len(rows[0]["per_layer"]) == 4 and rows[0]["band"] in ("narrow", "wide", "panoramic")


def test_layer_subset_and_chunk_sizes(models, cases):
    _, avar, _, _ = models
    enc, _ = cases["b3_left"]
    _, full = attention_statistics(avar, enc, query="response")
    _, sub = attention_statistics(avar, enc, query="response", layers=[3, -3])
    assert sub.layers == [1, 3]
    assert torch.allclose(sub.mass_v, full.mass_v[:, [1, 3]], rtol=1e-5, atol=1e-7)
    sel = full.select_layers([1, 3])
    assert torch.allclose(sel.mass_s, sub.mass_s, rtol=1e-5, atol=1e-7)
    for chunk in (1, 3, 10_000):
        _, ch = attention_statistics(avar, enc, query="response", method="chunked", chunk_size=chunk)
        assert rel_err(ch.mass_v, full.mass_v) < RTOL
    with pytest.raises(ValueError, match="out of range"):
        attention_statistics(avar, enc, query="response", layers=[4])
    mv, ms = full.sample(0)
    assert mv.shape == (4, 4, int(enc.spans.response[0].sum()))


def test_without_context_is_sdpa(models, tiny_model_dir, cases):
    _, avar, _, _ = models
    sdpa = load_model(str(tiny_model_dir), attn_implementation="sdpa").eval()
    enc, _ = cases["b3_left"]
    with torch.no_grad():
        a = avar(**enc.inputs).logits
        s = sdpa(**enc.inputs).logits
        ctx = AttentionContext.from_spans(enc.spans, query="user")  # statistics do not change outputs
        c = avar(**enc.inputs, avar_context=ctx).logits
    # the vision blocks (layer_idx None) run plain SDPA and are not counted: 4 text layers only
    assert avar.config.vision_config._attn_implementation == "avar"
    assert ctx.calls == 4 and ctx.stats().layers == [0, 1, 2, 3]
    assert torch.equal(a, s)  # no context: transformers' own SDPA path, bit for bit
    assert torch.allclose(c, s, rtol=1e-5, atol=1e-5)  # statistics: same kernel, two zero columns more
    register_attention()  # idempotent
    assert load_model(str(tiny_model_dir)).config._attn_implementation == "avar"


def test_requires_avar_attention(models, cases):
    _, _, eager, _ = models
    with pytest.raises(ValueError, match="avar"):
        attention_statistics(eager, cases["1img_nosys_b1"][0], query="user")


# ----------------------------------------------------------------------------- AGTO
def _reference_agto(attentions, spans, query, eps):
    a = torch.stack(attentions, 1)  # [B, L, H, T, T]
    enh, sup = [], []
    for b in range(a.shape[0]):
        q, v, s = spans.query(query)[b], spans.visual[b], spans.system[b]
        rows = a[b][:, :, q]  # [L, H, |Q|, T]
        if v.any():
            enh.append(-torch.log(rows[..., v].sum((-1, -2)) / (q.sum() * v.sum())).mean())
        sup.append(torch.log(rows[..., s].sum((-1, -2)) / (q.sum() * s.sum()) + eps).mean())
    return torch.stack(enh).mean(), torch.stack(sup).mean()


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method, query, side", [("fused", "response", "left"), ("chunked", "response", "right"),
                                                 ("fused", "user_visual", "right"), ("chunked", "user_visual", "left"),
                                                 ("lse", "response", "left"), ("lse", "user_visual", "right"),
                                                 ("lse", "user", "left")])
def test_agto_losses_and_gradients_match_eager(models, method, query, side):
    proc, avar, eager, _ = models
    enc = _encode(proc, [ROWS[i] for i in (0, 1, 3)], side)  # one text-only row: no L_enh term
    eps = 1e-6
    for model in (avar, eager):
        model.zero_grad(set_to_none=True)
    _, stats = attention_statistics(avar, enc, query=query, grad=True, method=method, chunk_size=4)
    losses = agto_losses(stats, eps=eps)
    (losses.enh + losses.sup).backward()
    eo = eager(**enc.inputs, output_attentions=True)
    ref_enh, ref_sup = _reference_agto(eo.attentions, enc.spans, query, eps)
    (ref_enh + ref_sup).backward()
    assert abs(losses.enh.item() - ref_enh.item()) <= RTOL * abs(ref_enh.item())
    assert abs(losses.sup.item() - ref_sup.item()) <= RTOL * abs(ref_sup.item())
    assert torch.isnan(losses.enh_per_sample[2])  # the text-only row
    ours, theirs = _grads(avar), _grads(eager)
    assert any("visual" in n for n in theirs)  # the losses reach the vision tower
    # a parameter outside one graph (e.g. the last layer's v_proj: the fused call shares it with
    # the output) has no grad there and must get a zero one in the other
    for name in set(ours) | set(theirs):
        g = theirs.get(name)
        o = ours.get(name)
        if g is None or o is None:
            assert float((g if o is None else o).abs().max()) == 0.0, name
            continue
        assert float((o - g).norm()) <= RTOL * max(float(g.norm()), 1e-12), name
    for model in (avar, eager):
        model.zero_grad(set_to_none=True)


def test_agto_layer_subset_and_empty(models, cases):
    _, avar, _, _ = models
    enc, eo = cases["2img_sys_b1"]
    _, stats = attention_statistics(avar, enc, query="response")
    sub = agto_losses(stats, layers=[0, 2])
    direct = agto_losses(stats.select_layers([0, 2]))
    assert torch.equal(sub.enh, direct.enh)
    a = torch.stack(eo.attentions, 1)[:, [0, 2]]
    q, v = enc.spans.response[0], enc.spans.visual[0]
    ref = -torch.log(a[0][:, :, q][..., v].sum((-1, -2)) / (q.sum() * v.sum())).mean()
    assert abs(float(sub.enh) - float(ref)) <= RTOL * abs(float(ref))
    # no defined sample (no response tokens): zero losses, still differentiable
    empty = _encode(models[0], [ROWS[0]], responses=False)
    _, st = attention_statistics(avar, empty, query="response", grad=True)
    losses = agto_losses(st)
    assert losses.enh.item() == 0.0 and losses.sup.item() == 0.0
    (losses.enh + losses.sup).backward()
    avar.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- intervention
def test_a_sys_one_rejected():
    with pytest.raises(ValueError, match="a_sys"):
        Intervention(a_img=0.15, a_sys=1.0)
    with pytest.raises(ValueError, match="a_img"):
        Intervention(a_img=-1.0, a_sys=0.4)
    from avar_ray.config import InterventionConfig

    schema = InterventionConfig()
    assert Intervention.from_config(schema) is None
    iv = Intervention.from_config(InterventionConfig(enabled=True, a_img=0.3, layers=[1]))
    assert (iv.a_img, iv.a_sys, iv.layers) == (0.3, schema.a_sys, (1,))
    assert Intervention.configured() == Intervention(a_img=schema.a_img, a_sys=schema.a_sys)


@pytest.mark.parametrize("layers", [None, (1, 3)])
@pytest.mark.parametrize("case", ["2img_sys_b1", "b3_left", "b3_right"])
def test_intervention_equals_reweighted_eager(models, cases, case, layers):
    _, avar, _, ref = models
    enc, _ = cases[case]
    iv = Intervention(a_img=0.15, a_sys=0.4, layers=layers)
    reweight = iv.reweight(enc.spans.visual, enc.spans.system)
    with torch.no_grad():
        ro = ref(**enc.inputs, output_attentions=True, ref_reweight=reweight, ref_layers=layers)
    valid = enc.inputs["attention_mask"].bool()
    for method in ("lse", "fused", "chunked"):
        out, stats = attention_statistics(avar, enc, query="response", intervention=iv, method=method)
        assert float((out.logits - ro.logits)[valid].abs().max()) < 1e-3
        assert rel_err(out.logits[valid], ro.logits[valid]) < RTOL
        mv, ms = eager_masses(ro.attentions, enc.spans, "response")
        assert rel_err(stats.mass_v, mv) < RTOL
        assert rel_err(stats.mass_s, ms) < RTOL


def test_intervention_raises_alpha_img(models, cases):
    _, avar, _, _ = models
    enc, _ = cases["b3_left"]
    base = compute_vas(avar, enc, query="user")
    with_iv = compute_vas(avar, enc, query="user", intervention=Intervention(a_img=0.15, a_sys=0.4))
    assert bool((with_iv.alpha_img > base.alpha_img).all())
    assert bool((with_iv.alpha_sys < base.alpha_sys).all())
    assert bool((with_iv.vas > base.vas).all())


def test_generate_with_intervention(models):
    proc, avar, _, ref = models
    enc = _encode(proc, [ROWS[i] for i in (0, 1)], "left", responses=False)
    iv = Intervention(a_img=0.5, a_sys=0.4)
    kw = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    cached = generate(avar, enc, iv, **kw)
    uncached = generate(avar, enc, iv, use_cache=False, **kw)
    plain = generate(avar, enc, None, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(cached.scores[0], plain.scores[0], atol=1e-3)  # the bias changes the model
    # every step equals the re-weighted eager reference on the full sequence so far
    reweight = iv.reweight(enc.spans.visual, enc.spans.system)
    seq = cached.sequences
    prompt = enc.inputs["input_ids"].shape[1]
    inputs = dict(enc.inputs)
    inputs["input_ids"] = seq[:, :-1]
    grow = seq.shape[1] - 1 - prompt
    inputs["attention_mask"] = torch.cat([enc.inputs["attention_mask"], torch.ones(2, grow, dtype=torch.long)], 1)
    inputs["mm_token_type_ids"] = torch.cat([enc.inputs["mm_token_type_ids"],
                                             torch.zeros(2, grow, dtype=enc.inputs["mm_token_type_ids"].dtype)], 1)
    with torch.no_grad():
        logits = ref(**inputs, ref_reweight=reweight).logits
    for step, score in enumerate(cached.scores):
        assert torch.allclose(score, logits[:, prompt - 1 + step], rtol=1e-3, atol=1e-3)


def test_context_validation(models, cases):
    _, avar, _, _ = models
    enc, _ = cases["1img_nosys_b1"]
    with pytest.raises(ValueError, match="query"):
        AttentionContext.from_spans(enc.spans, query="assistant")
    with pytest.raises(ValueError, match="method"):
        AttentionContext.from_spans(enc.spans, query="user", method="eager")
    with pytest.raises(ValueError, match="response"):
        generate(avar, enc, Intervention.configured())  # the batch holds a response already


def test_agto_with_gradient_checkpointing(models, tiny_model_dir):
    """SFT runs with gradient checkpointing: the recomputed layers must give the same gradients."""
    proc, avar, _, _ = models
    enc = _encode(proc, [ROWS[i] for i in (1, 2)], "right")
    ckpt = load_model(str(tiny_model_dir))
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt.train()
    grads = []
    for model in (avar, ckpt):
        model.zero_grad(set_to_none=True)
        out, stats = attention_statistics(model, enc, query="response", grad=True, labels=enc.inputs["input_ids"])
        losses = agto_losses(stats)
        (out.loss + 0.15 * losses.enh + 0.15 * losses.sup).backward()
        grads.append(_grads(model))
    avar.zero_grad(set_to_none=True)
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, rtol=1e-4, atol=1e-6), name


def test_bfloat16_model_statistics_in_float32(models, cases, tiny_model_dir):
    """bf16 training/eval: the output call stays bf16 and the statistics are float32. The two
    methods see the same bf16 hidden states (the output call is the same), so they must agree to
    float32 tolerance; against the float32 model only to bf16's drift (weights rounded)."""
    _, avar, _, _ = models
    enc, _ = cases["b3_left"]
    bf16 = load_model(str(tiny_model_dir), dtype="bfloat16").eval()
    iv = Intervention(a_img=0.15, a_sys=0.4, layers=(0, 2))
    _, ref = attention_statistics(avar, enc, query="response", intervention=iv)
    out, fused = attention_statistics(bf16, enc, query="response", intervention=iv, method="fused", grad=True)
    _, chunked = attention_statistics(bf16, enc, query="response", intervention=iv, method="chunked")
    assert out.logits.dtype == torch.bfloat16 and fused.mass_v.dtype == chunked.mass_v.dtype == torch.float32
    assert rel_err(fused.mass_v.detach(), chunked.mass_v) < RTOL and rel_err(fused.mass_s.detach(), chunked.mass_s) < RTOL
    assert rel_err(fused.mass_v.detach(), ref.mass_v) < 0.1 and rel_err(fused.mass_s.detach(), ref.mass_s) < 0.1
    agto_losses(fused).enh.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in bf16.parameters())
    # lse: the row LSE comes from the bf16 kernel (float32 accumulation), the masses' q·k in float32
    _, lse = attention_statistics(bf16, enc, query="response", intervention=iv, method="lse")
    assert lse.mass_v.dtype == torch.float32
    assert rel_err(lse.mass_v, chunked.mass_v) < 1e-3 and rel_err(lse.mass_s, chunked.mass_s) < 1e-3
    for ours, fp32 in ((lse.mass_v, ref.mass_v), (lse.mass_s, ref.mass_s)):  # no further from float32 than fused
        assert rel_err(ours, fp32) <= 1.05 * max(rel_err(fused.mass_v.detach(), ref.mass_v),
                                                 rel_err(fused.mass_s.detach(), ref.mass_s))


def test_chunk_size_selects_the_method():
    """``attention.chunk_size``: null = automatic (per device/dtype/grad), N = chunked with N query rows."""
    from avar_ray.config import ConfigError, load_config

    v = torch.zeros(1, 6, dtype=torch.bool)
    s = torch.zeros(1, 6, dtype=torch.bool)
    assert load_config(None).attention.chunk_size is None
    assert AttentionContext(v, s, chunk_size=load_config(None).attention.chunk_size).method == "auto"
    ctx = AttentionContext(v, s, chunk_size=load_config(None, ["attention.chunk_size=8"]).attention.chunk_size)
    assert (ctx.method, ctx.chunk_size) == ("chunked", 8)
    assert AttentionContext(v, s, method="chunked").chunk_size > 0
    assert AttentionContext(v, s, method="fused", chunk_size=8).method == "fused"  # an explicit method wins
    with pytest.raises(ConfigError, match="attention.chunk_size"):
        load_config(None, ["attention.chunk_size=0"])
