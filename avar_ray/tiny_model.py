"""Tiny VLM checkpoints built locally (no hub download): the models of every test and of
``make demo``. Two families (``family=``):

* ``qwen2_5_vl`` (default): a real ``Qwen2_5_VLForConditionalGeneration`` with the real
  Qwen2.5-VL chat template (default system prompt included) and the Qwen2-VL image processor.
* ``qwen3_vl``: a real ``Qwen3VLForConditionalGeneration`` (DeepStack visual features into the
  first text layers, interleaved MRoPE, 16-pixel patches) with the real Qwen3-VL-Instruct chat
  template, which adds NO default system prompt (S is empty unless the caller gives one), the
  Qwen2-VL image processor at Qwen3-VL's settings and the Qwen3-VL video processor.

Both have few layers, a small hidden size, random weights from the seed and a byte-level BPE
tokenizer trained here that carries every Qwen special token, saved with ``save_pretrained``
so that transformers (``AutoProcessor``, ``AutoModelForImageTextToText``) and ``vllm.LLM`` load
them. Production uses real checkpoints from a local path through the same code.
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

# The chat template of Qwen3-VL-*-Instruct (chat_template.json of the real checkpoints), verbatim.
# Unlike Qwen2.5-VL it emits a system turn only when the conversation has one (or tools).
QWEN3_VL_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Size of the tiny models. head_dim 64 (256/4) is one vLLM's CPU attention supports.
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

# Qwen3-VL: explicit head_dim, interleaved MRoPE (the real [24, 20, 20] halved: sums to
# head_dim / 2), 16-pixel patches, a learned position grid (a square number of entries) and
# DeepStack: the features after vision blocks 0 and 1 are added to the visual tokens' hidden
# states after text layers 0 and 1 (the real 8B: blocks 8/16/24 into text layers 0-2).
QWEN3_TEXT = dict(TEXT, head_dim=64)
QWEN3_MROPE_SECTION = [12, 10, 10]
QWEN3_VISION = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=256,
                    deepstack_visual_indexes=[0, 1], hidden_act="gelu_pytorch_tanh", initializer_range=0.1)
# Images between 64x64 and 256x256 pixels: 4 to 64 visual tokens after the 2x2 merge (32 px each).
QWEN3_MIN_PIXELS = 64 * 64
QWEN3_MAX_PIXELS = 256 * 256
# Added tokens of the real Qwen3 tokenizer that the Qwen3-VL template emits (tool turns).
QWEN3_ADDED_TOKENS = ["<tool_response>", "</tool_response>"]

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
FAMILY_NAMES = {"qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL"}


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


def build_tokenizer(family: str = "qwen2_5_vl"):
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
    qwen3 = _check_family(family) == "qwen3_vl"
    tok.add_tokens(ADDED_TOKENS + (QWEN3_ADDED_TOKENS if qwen3 else []))
    tok.chat_template = QWEN3_VL_CHAT_TEMPLATE if qwen3 else QWEN2_5_VL_CHAT_TEMPLATE
    tok.model_max_length = TEXT["max_position_embeddings"]
    return tok


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"tiny model family must be one of {FAMILIES}, got {family!r}")
    return family


def build_processor(tokenizer, family: str = "qwen2_5_vl"):
    if _check_family(family) == "qwen3_vl":
        return _build_qwen3_processor(tokenizer)
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                                            patch_size=14, merge_size=2, temporal_patch_size=2)
    video_processor = Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                                            patch_size=14, merge_size=2, temporal_patch_size=2)
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               video_processor=video_processor, chat_template=QWEN2_5_VL_CHAT_TEMPLATE)


def _build_qwen3_processor(tokenizer):
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    # Qwen3-VL's preprocessor_config.json: the Qwen2-VL image processor at patch 16, mean/std 0.5
    size = {"shortest_edge": QWEN3_MIN_PIXELS, "longest_edge": QWEN3_MAX_PIXELS}
    common = dict(size=size, patch_size=16, merge_size=2, temporal_patch_size=2,
                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**common), tokenizer=tokenizer,
                            video_processor=Qwen3VLVideoProcessor(**common), chat_template=QWEN3_VL_CHAT_TEMPLATE)


def build_config(tokenizer, family: str = "qwen2_5_vl"):
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = len(tokenizer)
    vocab_size += -vocab_size % 64  # round up like real checkpoints (spare rows are never sampled)
    common = dict(vocab_size=vocab_size, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                  pad_token_id=ids["<|endoftext|>"])
    if _check_family(family) == "qwen3_vl":
        cls, text, vision = Qwen3VLConfig, dict(QWEN3_TEXT, **common), dict(QWEN3_VISION)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000000.0,
                                   "mrope_section": QWEN3_MROPE_SECTION, "mrope_interleaved": True}
    else:
        cls, text, vision = Qwen2_5_VLConfig, dict(TEXT, **common), dict(VISION)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": MROPE_SECTION}
    vision["out_hidden_size"] = text["hidden_size"]
    return cls(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def build_tiny_model(out_dir: str | Path, seed: int = 0, family: str = "qwen2_5_vl") -> Path:
    """Write the tiny checkpoint of ``family`` ("qwen2_5_vl" or "qwen3_vl") to ``out_dir``
    (tokenizer, processor, config, safetensors)."""
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(family)
    processor = build_processor(tokenizer, family)
    config = build_config(tokenizer, family)
    torch.manual_seed(seed)
    cls = Qwen3VLForConditionalGeneration if family == "qwen3_vl" else Qwen2_5_VLForConditionalGeneration
    model = cls(config).to(torch.float32).eval()
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
    (out / "avar_tiny_model.json").write_text(json.dumps({"seed": seed, "family": family, "parameters": n_params}, indent=1))
    return out
