"""The ``lse`` statistics method (``avar_ray.attention.lse``): masses and output against a direct
float64 softmax, its gradient by gradcheck in float64, bf16 against the same rounded inputs, and
the tiny Qwen3-VL's masses against eager attention maps (with and without the intervention)."""
from __future__ import annotations

import math

import pytest
import torch
from test_attention import _image, eager_masses, load_with_reference, rel_err

from avar_ray.attention import Intervention, attention_statistics
from avar_ray.attention.lse import lse_attention, lse_masses
from avar_ray.modeling import encode_batch

B, H, HKV, T, D = 2, 4, 2, 9, 6
SCALE = D ** -0.5


def _problem(dtype, padded: bool, with_bias: bool, seed: int = 0):
    """Random q/k/v, per-row spans (row 1 left-padded by 2 when ``padded``), causal."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=g, dtype=torch.float64).to(dtype) for h in (H, HKV, HKV))
    visual = torch.zeros(B, T, dtype=torch.bool)
    system = torch.zeros(B, T, dtype=torch.bool)
    qmask = torch.zeros(B, T, dtype=torch.bool)
    system[0, :2], visual[0, 2:5], qmask[0, 5:] = True, True, True  # Q = R after V
    system[1, 2:3], visual[1, 4:6], qmask[1, 4:8] = True, True, True  # Q overlaps V (the user_visual case)
    mask = None
    if padded:
        valid = torch.ones(B, T, dtype=torch.bool)
        valid[1, :2] = False
        mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    bias = None
    if with_bias:
        bias = Intervention(a_img=0.3, a_sys=0.4).key_bias(visual, system)
    return q, k, v, mask, visual, system, qmask, bias


def _reference(q, k, v, mask, visual, system, qmask, bias):
    """Explicit softmax in float64: output [B, T, H, D] and masses [B, H, T] (zero outside Q)."""
    groups = H // HKV
    k, v = (x.double().repeat_interleave(groups, dim=1) for x in (k, v))
    z = q.double() @ k.transpose(-1, -2) * SCALE
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None] if mask is None else mask
    if bias is not None:
        z = z + bias.double()[:, None, None, :]
    p = torch.softmax(z.masked_fill(~allowed, -math.inf), dim=-1)
    keep = qmask[:, None, :]
    mv = torch.where(keep, (p * visual[:, None, None, :]).sum(-1), 0.0)
    ms = torch.where(keep, (p * system[:, None, None, :]).sum(-1), 0.0)
    return (p @ v).transpose(1, 2), mv, ms


def _ours(q, k, v, mask, visual, system, qmask, bias, chunk=2):
    out, lse, kbias = lse_attention(q, k, v, mask, True, SCALE, bias)
    mv, ms = lse_masses(q, k, lse, mask, True, visual, system, qmask, SCALE, chunk, kbias)
    return out, mv, ms


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64_softmax(padded, with_bias):
    problem = _problem(torch.float32, padded, with_bias)
    out, mv, ms = _ours(*problem)
    ref_out, ref_v, ref_s = _reference(*problem)
    valid = torch.ones(B, T, dtype=torch.bool) if problem[3] is None else problem[3][:, 0].any(-2)
    assert float((out - ref_out)[valid].abs().max()) < 1e-5
    assert mv.dtype == torch.float32 and float(ref_v.max()) > 0.1 and float(ref_s.max()) > 0.1
    for ours, ref in ((mv, ref_v), (ms, ref_s)):
        assert float((ours - ref).abs().max()) < 1e-6
        assert bool(((ours == 0) == (ref == 0)).all())  # zero exactly outside Q


@pytest.mark.parametrize("padded, with_bias", [(False, False), (True, True)])
def test_gradcheck_float64(padded, with_bias):
    q, k, v, mask, visual, system, qmask, bias = _problem(torch.float64, padded, with_bias)
    # padded rows would feed the kernel's own -inf rows into gradcheck: only the valid rows count
    valid = torch.ones(B, T, dtype=torch.bool) if mask is None else mask[:, 0].any(-2)

    def f(q, k, v):
        out, mv, ms = _ours(q, k, v, mask, visual, system, qmask, bias)
        return out[valid], mv, ms

    inputs = tuple(x.clone().requires_grad_() for x in (q, k, v))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    # and the masses' gradient alone against the float64 reference's autograd
    gv, gs = torch.randn(B, H, T, dtype=torch.float64), torch.randn(B, H, T, dtype=torch.float64)
    grads = []
    for fn in (_ours, _reference):
        qi, ki = (x.clone().requires_grad_() for x in (q, k))
        _, mv, ms = fn(qi, ki, v, mask, visual, system, qmask, bias)
        ((mv * gv).sum() + (ms * gs).sum()).backward()
        grads.append((qi.grad, ki.grad))
    for ours, ref in zip(*grads):
        assert float((ours - ref).abs().max()) < 1e-9 * max(1.0, float(ref.abs().max()))


def test_bfloat16_inputs_float32_masses():
    """bf16 q/k/v: one bf16 call, float32 masses equal to the exact masses of the same rounded
    inputs to well within bf16's own rounding (2^-8)."""
    problem = _problem(torch.bfloat16, True, True)
    out, mv, ms = _ours(*problem)
    ref_out, ref_v, ref_s = _reference(*problem)
    assert out.dtype == torch.bfloat16 and mv.dtype == torch.float32
    assert rel_err(mv, ref_v.float()) < 1e-3 and rel_err(ms, ref_s.float()) < 1e-3


def test_chunk_size_does_not_change_the_masses():
    problem = _problem(torch.float32, True, True)
    _, mv1, ms1 = _ours(*problem, chunk=1)
    _, mv9, ms9 = _ours(*problem, chunk=1000)
    assert torch.allclose(mv1, mv9, rtol=1e-6, atol=1e-7) and torch.allclose(ms1, ms9, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- tiny Qwen3-VL
@pytest.fixture(scope="module")
def qwen3(tiny_qwen3_vl_dir):
    proc, avar, ref = load_with_reference(str(tiny_qwen3_vl_dir))
    convs, images = [], []
    for k, (system, sizes, question) in enumerate([("You are a helpful assistant. Look at the image.", [84, 64], "How many?"),
                                                   ("Answer with the option letter.", [112], "Which is bigger, A or B?")]):
        content = [{"type": "image"}] * len(sizes) + [{"type": "text", "text": question}]
        convs.append([{"role": "system", "content": system}, {"role": "user", "content": content}])
        images.append([_image(10 * k + i, s) for i, s in enumerate(sizes)])
    enc = encode_batch(proc, convs, images, response_texts=["3", "Let me look again: B"], padding_side="left")
    return avar, ref, enc


@pytest.mark.parametrize("intervened", [False, True])
def test_qwen3_vl_masses_match_eager(qwen3, intervened):
    """``lse`` on Qwen3-VL (DeepStack, interleaved MRoPE), a left-padded batch, every query
    span, the intervention on a layer subset or off."""
    avar, ref, enc = qwen3
    iv = Intervention(a_img=0.15, a_sys=0.4, layers=(0, 2)) if intervened else None
    reweight = None if iv is None else iv.reweight(enc.spans.visual, enc.spans.system)
    with torch.no_grad():
        ro = ref(**enc.inputs, output_attentions=True, ref_reweight=reweight, ref_layers=None if iv is None else iv.layers)
    for query in ("user", "response", "user_visual"):
        _, stats = attention_statistics(avar, enc, query=query, intervention=iv, method="lse")
        mv, ms = eager_masses(ro.attentions, enc.spans, query)
        assert float(mv.max()) > 0.1 and float(ms.max()) > 0.1
        assert rel_err(stats.mass_v, mv) < 1e-5 and rel_err(stats.mass_s, ms) < 1e-5, query
