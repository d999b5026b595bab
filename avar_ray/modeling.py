"""Loading a VLM and turning conversations into padded model inputs plus exact spans.

One place for what the statistics pass, SFT, the RL scorer/learner and eval all need:
processor-expanded image placeholders, prompt + response token ids (the response as text
through the chat template, or as exact sampled token ids from vLLM), left or right padding,
and the S/U/V/R masks of every row; and the one HF export of a trained DeepSpeed engine.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from avar_ray.config import ModelConfig
from avar_ray.engines import pixel_kwargs
from avar_ray.spans import Spans, spans_for

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}") from None


def load_processor(path: str, model: ModelConfig | None = None):
    """The checkpoint's processor at ``model.min_pixels`` / ``model.max_pixels`` (the same
    resolution vLLM gets from ``avar_ray.engines``); without ``model``, the checkpoint's own."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path, **(pixel_kwargs(model) if model is not None else {}))


def image_resolution(processor) -> dict:
    """The pixel bounds a processor resizes images into (what results files record)."""
    size = getattr(getattr(processor, "image_processor", None), "size", None)
    return {"min_pixels": getattr(size, "shortest_edge", None), "max_pixels": getattr(size, "longest_edge", None)}


def load_model(path: str, dtype: str = "float32", attn_implementation: str = "avar"):
    """A HF image-text-to-text model; ``attn_implementation="avar"`` is our statistics-capable
    SDPA (it behaves exactly like SDPA outside a statistics/intervention context)."""
    from transformers import AutoModelForImageTextToText

    if attn_implementation == "avar":
        from avar_ray.attention import register_attention

        register_attention()
    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype(dtype), attn_implementation=attn_implementation)


def float32_rope(model: torch.nn.Module) -> int:
    """Recompute every rotary embedding's inverse frequencies in float32, in place; returns how
    many modules it fixed. ZeRO-3's ``zero.Init`` builds every floating tensor of a module in the
    training dtype, these non-persistent buffers too (``actors.learner_load.load_partitioned``
    calls this; ``deepspeed.initialize`` on a built model casts only the parameters, a plain
    ``.to(bfloat16)`` casts them as well). RoPE's angle is ``position * inv_freq``: in bf16 (8
    mantissa bits) the angle of position 4096 is off by up to ~16 rad, so the learner's log-probs
    and attention statistics drift from vLLM's (whose RoPE angles are float32) the further a token
    is from the start. A cast back to float32 (DeepSpeed's ``keep_in_fp32_modules``) restores the
    dtype, not the lost bits: the values are recomputed with transformers' own rule
    (``PreTrainedModel._init_weights``)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    fixed = 0
    for name, module in model.named_modules():
        inv_freq = getattr(module, "inv_freq", None)
        if not torch.is_tensor(inv_freq) or "RotaryEmbedding" not in type(module).__name__:
            continue
        rope_type = getattr(module, "rope_type", "default")
        init = {"axial": getattr(module, "compute_axial_rope_parameters", None),
                "default": getattr(module, "compute_default_rope_parameters", None), **ROPE_INIT_FUNCTIONS}.get(rope_type)
        if init is None or not hasattr(module, "config"):
            raise ValueError(f"{name}: cannot recompute the RoPE frequencies of {type(module).__name__} "
                             f"(rope_type {rope_type!r})")
        value = init(module.config)[0].to(device=inv_freq.device, dtype=torch.float32)
        module.inv_freq = value  # replaces the buffer (nn.Module.__setattr__), non-persistent as before
        if torch.is_tensor(getattr(module, "original_inv_freq", None)):
            module.original_inv_freq = value.clone()
        fixed += 1
    return fixed


@dataclass
class Encoded:
    """A padded batch: model inputs, the spans of each row and where each response starts."""

    inputs: dict  # input_ids, attention_mask, (pixel_values, image_grid_thw, mm_token_type_ids)
    spans: Spans
    prompt_lengths: list[int]  # unpadded prompt length per row
    padding_side: str

    def to(self, device) -> "Encoded":
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.inputs.items()}
        return Encoded(inputs, self.spans.to(device), self.prompt_lengths, self.padding_side)


SEQ_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")  # per-token tensors [1, T]
VISION_KEYS = ("pixel_values", "image_grid_thw")  # per-image rows, concatenated over a batch


def append_response(features: dict, response_ids: Sequence[int]) -> dict:
    """A prompt's features (``[1, P]`` token tensors, vision tensors) with exact response ids
    appended; ``features`` itself is left as it was (the learners' prompt cache reuses it)."""
    out = dict(features)
    extra = torch.tensor([list(response_ids)], dtype=features["input_ids"].dtype)
    tail = {"input_ids": extra, "attention_mask": torch.ones_like(extra), "mm_token_type_ids": torch.zeros_like(extra)}
    for key in SEQ_KEYS:
        if key in features:
            out[key] = torch.cat([features[key], tail[key].to(features[key].dtype)], dim=1)
    return out


def _encode_one(processor, messages: list[dict], images: Sequence, response_text: str | None,
                response_ids: Sequence[int] | None) -> tuple[dict, int]:
    """Token ids (and vision tensors) of one conversation; returns (features, prompt length)."""
    prompt_text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    kwargs = {"images": list(images)} if images else {}
    prompt = processor(text=[prompt_text], return_tensors="pt", **kwargs)
    prompt_len = prompt["input_ids"].shape[1]
    if response_text is not None:
        # The template closes the assistant turn ("<|im_end|>\n"): encode the whole
        # conversation so the label tokens are exactly what training sees.
        full_text = processor.apply_chat_template(
            list(messages) + [{"role": "assistant", "content": response_text}], tokenize=False)
        full = processor(text=[full_text], return_tensors="pt", **kwargs)
        if not torch.equal(full["input_ids"][0, :prompt_len], prompt["input_ids"][0]):
            raise ValueError("the prompt does not tokenize as a prefix of the conversation")
        return dict(full), prompt_len
    if response_ids is not None:
        return append_response(dict(prompt), response_ids), prompt_len
    return dict(prompt), prompt_len


def collate(processor, rows: Sequence[dict], prompt_lengths: list[int], padding_side: str = "right") -> Encoded:
    """Single-row features (``_encode_one``, ``append_response``) into one padded batch with the
    spans of every row: the one padding rule of SFT, the learners, the statistics pass and eval."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tokenizer = getattr(processor, "tokenizer", processor)
    width = max(r["input_ids"].shape[1] for r in rows)
    keys = [k for k in SEQ_KEYS if k in rows[0]]
    batch = {k: [] for k in keys}
    for features in rows:
        gap = width - features["input_ids"].shape[1]
        for key in keys:
            fill = tokenizer.pad_token_id if key == "input_ids" else 0
            pad = torch.full((1, gap), fill, dtype=features[key].dtype)
            parts = [pad, features[key]] if padding_side == "left" else [features[key], pad]
            batch[key].append(torch.cat(parts, dim=1))
    inputs = {k: torch.cat(v, dim=0) for k, v in batch.items()}
    for key in VISION_KEYS:
        tensors = [r[key] for r in rows if key in r]
        if tensors:
            inputs[key] = torch.cat(tensors, dim=0)
    spans = spans_for(tokenizer, inputs["input_ids"], inputs["attention_mask"])
    return Encoded(inputs, spans, list(prompt_lengths), padding_side)


def encode_batch(processor, messages: Sequence[list[dict]], images: Sequence[Sequence] | None = None,
                 response_texts: Sequence[str] | None = None, response_ids: Sequence[Sequence[int]] | None = None,
                 padding_side: str = "right") -> Encoded:
    """Tokenize conversations (chat template, images expanded) into one padded batch.

    ``messages[i]`` holds the system/user turns of row i (HF chat format, images as
    ``{"type": "image"}`` parts matching ``images[i]``); the assistant turn comes from
    ``response_texts`` (through the template) or ``response_ids`` (exact ids), or is absent
    (a generation prompt).
    """
    n = len(messages)
    images = images if images is not None else [[] for _ in range(n)]
    rows = [_encode_one(processor, messages[i], images[i],
                        response_texts[i] if response_texts is not None else None,
                        response_ids[i] if response_ids is not None else None) for i in range(n)]
    return collate(processor, [r[0] for r in rows], [r[1] for r in rows], padding_side)


def export_hf(engine, processor, out: str | Path, zero_stage: int, rank: int,
              notes: dict[str, dict] | None = None) -> Path | None:
    """The trained model as an HF directory transformers and vLLM load (safetensors, config,
    generation config, processor and tokenizer files: vLLM reads the chat template there), from
    a DeepSpeed engine (SFT and the RL learners). ``notes``: JSON files written beside it.

    Call on every rank: under ZeRO-3 the gather is a collective; rank 0 writes ``out``.
    """
    state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None  # full weights on rank 0
    if rank != 0:
        return None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    engine.module.save_pretrained(out, state_dict=state, safe_serialization=True)
    processor.save_pretrained(out)
    for name, data in (notes or {}).items():
        (out / name).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return out


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested (eval.device or serve.device) but torch sees no CUDA device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def require_system_turn(processor, sample, system_prompt: str | None, setting: str, off: str = "") -> None:
    """The start-up guard of every stage whose numbers need S (RL's r_visual = V / (S + eps), SFT's
    L_sup, eval's VAS): ``sample``'s conversation, built as the stages build it, must get a system
    turn from ``system_prompt`` or the chat template's default one (Qwen3-VL's has none: S would be
    empty and the numbers x / eps or 0, silently). One sample decides for the run, since every
    conversation gets the same system turn. ``setting``: what needs S; ``off``: how to do without."""
    from avar_ray.attention.context import NO_SYSTEM_PROMPT, NoSystemPromptError
    from avar_ray.data.schema import build_messages, pil_images

    encoded = encode_batch(processor, [build_messages(sample, system_prompt)], [pil_images(sample)])
    if not bool(encoded.spans.system.any()):
        raise NoSystemPromptError(f"{setting}: {NO_SYSTEM_PROMPT}" + (f", or {off}" if off else ""))
