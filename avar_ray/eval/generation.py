"""Generating the responses to evaluate: vLLM in the plain mode, transformers under the
intervention.

Why two engines: the training-free intervention (SPEC.md §2) is a key bias inside our ``avar``
attention; vLLM's attention kernels have no hook for it, so with ``--intervene`` the responses
come from transformers ``generate`` with the bias in every decoding step
(``avar_ray.attention.generate``). Without it vLLM generates (much faster), and the attention
pass then reads vLLM's exact token ids.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from avar_ray.attention import Intervention, generate as attention_generate
from avar_ray.decoding import ResponseCodec
from avar_ray.eval.benchmarks import EvalItem
from avar_ray.modeling import encode_batch

log = logging.getLogger("avar_ray.eval")


@dataclass
class Generation:
    ids: list[int]  # generated token ids (the end-of-turn token included when it stopped there)
    text: str  # avar_ray.decoding.decode_response: template tokens dropped, reasoning tags kept
    finish_reason: str  # "stop" or "length"
    prompt_ids: Optional[list[int]] = None  # the engine's own prompt ids (vLLM), to check alignment


def vllm_generate(llm, items: Sequence[EvalItem], max_new_tokens: int, temperature: float, seed: int) -> list[Generation]:
    codec = ResponseCodec(llm.get_tokenizer())
    params = codec.sampling_params(max_tokens=max_new_tokens, temperature=temperature, seed=seed)
    inputs = []
    for item in items:
        request = {"prompt": item.prompt_text}
        if item.images:
            request["multi_modal_data"] = {"image": item.images if len(item.images) > 1 else item.images[0]}
        inputs.append(request)
    outputs = llm.generate(inputs, params, use_tqdm=len(inputs) > 1)
    gens = []
    for out in outputs:
        completion = out.outputs[0]
        ids = list(completion.token_ids)
        gens.append(Generation(ids, codec.decode(ids),
                               "length" if completion.finish_reason == "length" else "stop",
                               list(out.prompt_token_ids)))
    return gens


def stop_ids(model, processor) -> set[int]:
    """Token ids that end a response (the generation config's eos ids, else the tokenizer's)."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = getattr(processor, "tokenizer", processor).eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos])


def trim_generated(row: list[int], stops: set[int]) -> tuple[list[int], str]:
    """Cut a padded ``generate`` row after its first stop token (kept, as vLLM keeps it)."""
    for i, tok in enumerate(row):
        if tok in stops:
            return row[:i + 1], "stop"
    return row, "length"


def hf_generate(model, processor, items: Sequence[EvalItem], intervention: Optional[Intervention],
                max_new_tokens: int, temperature: float, seed: int, batch_size: int) -> list[Generation]:
    """transformers ``generate`` (left-padded batches) with the intervention's key bias."""
    tokenizer = getattr(processor, "tokenizer", processor)
    stops = stop_ids(model, processor)
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    codec = ResponseCodec(processor)
    torch.manual_seed(seed)
    gens: list[Generation] = []
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    for batch in tqdm(batches, desc="generate (transformers)", disable=len(batches) < 2):
        enc = encode_batch(processor, [it.messages for it in batch], [it.images for it in batch],
                           padding_side="left").to(device)
        with torch.no_grad():
            out = attention_generate(model, enc, intervention, max_new_tokens=max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id, **codec.generate_kwargs(), **sampling)
        width = enc.inputs["input_ids"].shape[1]
        for row in out[:, width:].tolist():
            ids, reason = trim_generated(row, stops)
            gens.append(Generation(ids, codec.decode(ids), reason))
    return gens
