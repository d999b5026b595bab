"""A tiny Qwen2.5-VL checkpoint built locally (no hub download): the model of every test and
of ``make demo``.

It is a real ``Qwen2_5_VLForConditionalGeneration`` (few layers, small hidden size, random
weights from the seed) with a byte-level BPE tokenizer trained here that carries every
Qwen2.5-VL special token, the real Qwen2.5-VL chat template (default system prompt
included) and the Qwen2-VL image processor, saved with ``save_pretrained`` so that
transformers (``AutoProcessor``, ``AutoModelForImageTextToText``) and ``vllm.LLM`` load it.
Production uses real checkpoints from a local path through the same code.
"""
from __future__ import annotations

import json
from pathlib import Path

# Qwen2.5-VL's special tokens, in the real checkpoint's order.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Not special in Qwen (they are ordinary added tokens), but single tokens there too.
ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<think>", "</think>", "<answer>", "</answer>"]

# The chat template of Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct (identical in both).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Size of the tiny model. head_dim 64 (256/4) is one vLLM's CPU attention supports.
# initializer_range 0.1 (not 0.02): with the smaller init a random model repeats one token
# forever, which makes "greedy outputs agree" tests and attention statistics uninformative.
TEXT = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
            initializer_range=0.1)
MROPE_SECTION = [8, 12, 12]  # sums to head_dim / 2
VISION = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=112,
              fullatt_block_indexes=[1], tokens_per_second=2)
# Images between 56x56 and 224x224 pixels: 4 to 64 visual tokens after the 2x2 merge.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 224 * 224
BPE_VOCAB = 1024


def _training_corpus() -> list[str]:
    """Text the tokenizer is trained on: the vocabulary of our prompts, tasks and answers."""
    words = (
        "You are a helpful assistant. What is the colour color of the shape? How many are there "
        "in the image picture? Which is left right above below bigger smaller larger than the "
        "circle square triangle bar chart value angle degrees red green blue yellow purple "
        "orange black white gray Answer with the option letter A B C D from the given choices "
        "Think step by step inside think then give the final answer inside answer Let me look at "
        "again checking the image: Global scan Elements Relations Synthesis so the answer is "
        "first second third count total sum of angles of a triangle is 180 therefore system user "
        "assistant"
    )
    digits = " ".join(str(i) for i in range(0, 200))
    return [words, words.lower(), digits, "0 1 2 3 4 5 6 7 8 9 . , : ; ( ) [ ] { } + - * / = ° %"]


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(_training_corpus() * 4, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    vocab = state["vocab"]
    # tokenizers 0.23 wants merges as (left, right) tuples, not "left right" strings.
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.add_tokens(ADDED_TOKENS)
    tok.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    tok.model_max_length = TEXT["max_position_embeddings"]
    return tok


def build_processor(tokenizer):
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                                            patch_size=14, merge_size=2, temporal_patch_size=2)
    video_processor = Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                                            patch_size=14, merge_size=2, temporal_patch_size=2)
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               video_processor=video_processor, chat_template=QWEN2_5_VL_CHAT_TEMPLATE)


def build_config(tokenizer):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = len(tokenizer)
    vocab_size += -vocab_size % 64  # round up like real checkpoints (spare rows are never sampled)
    text = dict(TEXT, vocab_size=vocab_size, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                 "mrope_section": MROPE_SECTION})
    vision = dict(VISION, out_hidden_size=TEXT["hidden_size"])
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def build_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint to ``out_dir`` (tokenizer, processor, config, safetensors)."""
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    config = build_config(tokenizer)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=config.text_config.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    (out / "avar_tiny_model.json").write_text(json.dumps({"seed": seed, "parameters": n_params}, indent=1))
    return out
