"""The learners' per-step prompt cache (``actors.learner_batches``; no Ray): each prompt goes
through the HF processor once however many rollouts and passes use it, and the micro-batches
assembled from the cache are the tensors the per-rollout encoding gave, so the log-probs are
bit-identical."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch


@pytest.fixture(scope="module")
def setup(tiny_model_dir, procedural_parquet):
    from actors.policy import banned_token_ids
    from actors.records import TrainItem
    from avar_ray.data.readers import read_samples
    from avar_ray.modeling import load_processor

    from transformers import AutoConfig

    processor = load_processor(str(tiny_model_dir))
    rows = read_samples(procedural_parquet)[0]
    two = dataclasses.replace(rows[3], id="two_images", images=rows[3].images + rows[4].images)
    samples = rows[:3] + [two]
    size = AutoConfig.from_pretrained(tiny_model_dir).get_text_config().vocab_size
    vocab = [t for t in range(size) if t not in set(banned_token_ids(processor))]
    gen = torch.Generator().manual_seed(0)
    items = []
    for s, n in zip(samples, (3, 2, 1, 2)):  # n rollouts of each prompt, responses of unequal length
        for _ in range(n):
            length = int(torch.randint(3, 12, (1,), generator=gen))
            ids = [vocab[int(i)] for i in torch.randint(0, len(vocab), (length,), generator=gen)]
            items.append(TrainItem(s, ids, 0.0, [0.0] * length))
    return processor, samples, items


def _per_rollout(processor, items, system_prompt=None):
    """The learner's encoding before the cache: every rollout's conversation through the processor."""
    from actors.records import conversation
    from avar_ray.modeling import encode_batch

    messages, images = zip(*(conversation(it.sample, system_prompt) for it in items))
    return encode_batch(processor, list(messages), list(images), response_ids=[it.response_ids for it in items],
                        padding_side="right")


@pytest.mark.parametrize("system_prompt", [None, "Look at the image first."])
def test_cached_batches_equal_the_per_rollout_encoding(setup, system_prompt):
    from actors.learner_batches import CountingProcessor, PromptCache

    processor, samples, items = setup
    counting = CountingProcessor(processor)
    cache = PromptCache(counting, system_prompt)
    order = [6, 4, 0, 7, 5, 2, 1, 3]  # a micro-batch mixing the prompts, as the length-balanced plan does
    for batch in ([items[i] for i in order], items[:2], items[3:]):
        ours, prompts = cache.encode(batch)
        ref = _per_rollout(processor, batch, system_prompt)
        assert sorted(ours.inputs) == sorted(ref.inputs)
        assert ref.inputs["image_grid_thw"].shape[0] == sum(len(it.sample.images) for it in batch)
        for key, tensor in ref.inputs.items():
            assert ours.inputs[key].dtype == tensor.dtype and torch.equal(ours.inputs[key], tensor), key
        assert ours.prompt_lengths == ref.prompt_lengths
        for name in ("system", "user", "visual", "response"):
            assert torch.equal(getattr(ours.spans, name), getattr(ref.spans, name)), name
        assert [p.sample_id for p in prompts] == [it.sample.id for it in batch]
        assert all(p.ids == ref.inputs["input_ids"][b, :n].tolist()
                   for b, (p, n) in enumerate(zip(prompts, ref.prompt_lengths)))
    # 4 prompts (one with two images), 8 rollouts, 3 batches: one processor call per prompt
    seconds = cache.seconds
    assert counting.calls == cache.encodes == len(samples) and seconds > 0
    assert cache.clear() == {"encodes": 4, "seconds": seconds, "prompts": 4} and not cache.entries
    cache.encode(items[:2])  # a new step: encoded again
    assert counting.calls == len(samples) + 1 and cache.encodes == 1


def test_logprobs_are_bit_identical(setup, tiny_model_dir):
    from actors.learner_batches import PromptCache
    from actors.policy import banned_token_ids, forward_logprobs
    from avar_ray.modeling import load_model

    processor, _, items = setup
    model = load_model(str(tiny_model_dir), attn_implementation="avar").eval()
    lengths = [len(it.response_ids) for it in items]
    banned = banned_token_ids(processor)
    with torch.no_grad():
        before = forward_logprobs(model, _per_rollout(processor, items), lengths, 0.7, banned)[0]
        after = forward_logprobs(model, PromptCache(processor).encode(items)[0], lengths, 0.7, banned)[0]
    assert torch.equal(before, after) and before.abs().sum() > 0


def test_the_vocabulary_is_read_once_per_tokenizer(setup, monkeypatch):
    """``collate`` needs the template's markers for every batch it pads, and reading them reads
    the whole vocabulary (~0.1 s at Qwen's 151k tokens): ``spans.template_ids`` reads it once per
    tokenizer, across the cache's prompts, micro-batches and steps, and again only after tokens
    were added; the batches still carry the same spans (see the test above)."""
    from actors.learner_batches import PromptCache
    from avar_ray import spans

    processor, _, items = setup
    calls = []
    get_vocab = type(processor.tokenizer).get_vocab
    monkeypatch.setattr(type(processor.tokenizer), "get_vocab", lambda self: calls.append(1) or get_vocab(self))
    monkeypatch.setattr(spans, "_TEMPLATES", spans.weakref.WeakKeyDictionary())
    cache = PromptCache(processor)
    cache.encode(items[:3])
    cache.encode(items[3:])
    cache.clear()
    encoded = cache.encode(items[:2])[0]  # the next step
    _per_rollout(processor, items[:3])
    assert len(calls) == 1 and encoded.spans.response.any()
    tokenizer = copy.deepcopy(processor.tokenizer)
    spans.template_ids(tokenizer)
    tokenizer.add_tokens(["<avar_new_token>"])
    spans.template_ids(tokenizer)
    assert len(calls) == 3  # a new tokenizer; the same one after it grew


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_each_image_is_encoded_once_with_the_same_logprobs_and_gradients(setup, family, request, monkeypatch):
    """A batch's rollouts of one prompt share its images: the vision tower runs on each distinct
    image once (``policy.each_image_once``) and the log-probs and every gradient (Qwen3-VL: the
    DeepStack features' too) equal those of encoding each row's copy."""
    import actors.policy as policy
    from actors.learner_batches import PromptCache
    from actors.records import TrainItem
    from avar_ray.modeling import load_model, load_processor

    _, samples, items = setup
    model_dir = str(request.getfixturevalue("tiny_model_dir" if family == "qwen2_5_vl" else "tiny_qwen3_vl_dir"))
    processor = load_processor(model_dir)
    banned = policy.banned_token_ids(processor)
    allowed = [t for t in range(3, 300) if t not in banned]  # ids every tiny tokenizer has
    items = [TrainItem(it.sample, [allowed[i % len(allowed)] for i in it.response_ids], 0.0, []) for it in items]
    model = load_model(model_dir, attn_implementation="avar").train()
    encoded = PromptCache(processor).encode(items)[0]
    lengths = [len(it.response_ids) for it in items]
    images = []
    model.model.visual.register_forward_hook(
        lambda module, args, kwargs, out: images.append(kwargs["grid_thw"].shape[0]), with_kwargs=True)

    def run():
        model.zero_grad(set_to_none=True)
        logprobs = policy.forward_logprobs(model, encoded, lengths, 0.7, banned)[0]
        (logprobs * torch.linspace(-1, 1, logprobs.numel()).view_as(logprobs)).sum().backward()
        return logprobs.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    once, grads_once = run()
    monkeypatch.setattr(policy, "distinct_images", lambda inputs: None)  # every row's copy encoded
    every, grads_every = run()
    assert images == [len(samples) + 1, len(items) + 2]  # 5 distinct images (one prompt has two) vs 10
    assert torch.allclose(once, every, atol=1e-5) and once.abs().sum() > 0
    assert grads_once.keys() == grads_every.keys() and any("visual" in n for n in grads_once)
    for name, grad in grads_once.items():  # float32 sums in another order: ~1e-6 of the norm
        assert (grad - grads_every[name]).norm() <= 1e-4 * grads_every[name].norm() + 1e-8, name
