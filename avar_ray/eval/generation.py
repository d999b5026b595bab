"""Generating the responses to evaluate: vLLM in the plain mode, transformers under the
intervention.

Why two engines: the training-free intervention (SPEC.md §2) is a key bias inside our ``avar``
attention; vLLM's attention kernels have no hook for it, so with ``--intervene`` the responses
come from transformers ``generate`` with the bias in every decoding step
(``avar_ray.attention.generate``). Without it vLLM generates (much faster), and the attention
pass then reads vLLM's exact token ids.
"""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from avar_ray.attention import Intervention, generate as attention_generate
from avar_ray.eval.benchmarks import EvalItem
from avar_ray.modeling import encode_batch
from avar_ray.spans import RESPONSE_BANNED_TOKENS, banned_token_ids

log = logging.getLogger("avar_ray.eval")


@dataclass
class Generation:
    ids: list[int]  # generated token ids (the end-of-turn token included when it stopped there)
    text: str  # decoded without special tokens
    finish_reason: str  # "stop" or "length"
    prompt_ids: Optional[list[int]] = None  # the engine's own prompt ids (vLLM), to check alignment


def start_vllm(model_dir: str, dtype: str, max_model_len: int, max_images: int, enforce_eager: bool, seed: int,
               gpu_memory_utilization: float):
    from vllm import LLM

    return LLM(str(model_dir), dtype=dtype, max_model_len=max_model_len, enforce_eager=enforce_eager, seed=seed,
               gpu_memory_utilization=gpu_memory_utilization,
               limit_mm_per_prompt={"image": max(1, max_images), "video": 0})


def stop_vllm(llm) -> None:
    """Shut an engine down now (its GPU memory is needed by the statistics pass)."""
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def vllm_generate(llm, items: Sequence[EvalItem], max_new_tokens: int, temperature: float, seed: int) -> list[Generation]:
    from vllm import SamplingParams

    vocab = llm.get_tokenizer().get_vocab()
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=seed,
                            bad_words=[t for t in RESPONSE_BANNED_TOKENS if t in vocab])
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
        gens.append(Generation(list(completion.token_ids), completion.text,
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
    suppress = banned_token_ids(processor)
    torch.manual_seed(seed)
    gens: list[Generation] = []
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    for batch in tqdm(batches, desc="generate (transformers)", disable=len(batches) < 2):
        enc = encode_batch(processor, [it.messages for it in batch], [it.images for it in batch],
                           padding_side="left").to(device)
        with torch.no_grad():
            out = attention_generate(model, enc, intervention, max_new_tokens=max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id, suppress_tokens=suppress, **sampling)
        width = enc.inputs["input_ids"].shape[1]
        for row in out[:, width:].tolist():
            ids, reason = trim_generated(row, stops)
            gens.append(Generation(ids, tokenizer.decode(ids, skip_special_tokens=True), reason))
    return gens
