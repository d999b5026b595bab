"""Reasoning tags as special tokens: the reference setup adds <think>, </think>, <answer>,
</answer> as special tokens, and a decoder that skips special tokens would strip them, so the
format reward and the tag-based answer extraction would score every response 0. Decoding goes
through ``avar_ray.decoding`` everywhere (eval, RL rollouts, `avar vas`, serve), which keeps
them; tested with a tokenizer that marks them special (``tagged_model_dir``; the real vLLM
engine's side is in tests/test_resolution.py, which shares one engine start with it)."""
from __future__ import annotations

import pytest

from avar_ray.decoding import REASONING_TAGS, ResponseCodec, ban_logits, decode_response
from rewards import accuracy_reward, extract_answer, format_reward

TARGET = "<think>Three shapes are red.</think><answer>3</answer>"


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
