"""Responses in and out of a model: the one banned-token rule and the one response decoder.

Banned tokens: a response must never contain the chat template's turn and vision markers
(``avar_ray.spans.RESPONSE_BANNED_TOKENS``). Every sampler applies the same rule, a logit of
-inf on those ids: vLLM through ``logit_bias`` (RL rollouts, eval), transformers ``generate``
through a logits processor (eval under the intervention, ``avar vas``, serve), and the learner
on its own logits (``ban_logits``), so that the sampled and the trained distributions agree.

Decoding: the reasoning tags ``<think>``/``</think>``/``<answer>``/``</answer>`` must survive,
since the format reward and the answer extraction read them, even when the tokenizer marks
them special (the reference setup adds them as special tokens, and ``skip_special_tokens=True``
would then strip them). ``decode_response`` drops only the other special tokens (``<|im_end|>``,
``<|endoftext|>``...).
"""
from __future__ import annotations

from typing import Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from avar_ray.spans import RESPONSE_BANNED_TOKENS, banned_token_ids

REASONING_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
BANNED_LOGIT = float("-inf")

__all__ = ["BANNED_LOGIT", "REASONING_TAGS", "RESPONSE_BANNED_TOKENS", "ResponseCodec", "ban_logits",
           "banned_token_ids", "decode_response"]


def _tokenizer(tok):
    return getattr(tok, "tokenizer", tok)  # accept a processor


def ban_logits(logits: torch.Tensor, banned_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """The rule itself: ``logits`` with -inf on the banned ids of the last dimension (a new
    tensor: safe inside autograd and activation checkpointing)."""
    if len(banned_ids) == 0:
        return logits
    index = torch.as_tensor(banned_ids, dtype=torch.long, device=logits.device)
    return logits.index_fill(-1, index, BANNED_LOGIT)


def template_token_ids(tokenizer) -> frozenset[int]:
    """Special tokens a response's text leaves out: every special token but the reasoning tags."""
    tok = _tokenizer(tokenizer)
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special} | set(tok.all_special_ids)
    keep = {tok.convert_tokens_to_ids(t) for t in REASONING_TAGS if t in tok.get_vocab()}
    return frozenset(special - keep)


def decode_response(tokenizer, ids: Sequence[int], template_ids: frozenset[int] | None = None) -> str:
    """A response's text with the reasoning tags kept and the template tokens removed."""
    tok = _tokenizer(tokenizer)
    drop = template_token_ids(tok) if template_ids is None else template_ids
    return tok.decode([i for i in ids if i not in drop], skip_special_tokens=False)


class _BanProcessor(LogitsProcessor):
    """transformers ``LogitsProcessor`` applying ``ban_logits``."""

    def __init__(self, banned_ids: Sequence[int]):
        self.banned_ids = list(banned_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return ban_logits(scores, self.banned_ids)


class ResponseCodec:
    """The banned-token rule and the response decoder of one tokenizer (or processor)."""

    def __init__(self, tokenizer):
        self.tokenizer = _tokenizer(tokenizer)
        self.banned_ids = banned_token_ids(self.tokenizer)
        self.template_ids = template_token_ids(self.tokenizer)

    def decode(self, ids: Sequence[int]) -> str:
        return decode_response(self.tokenizer, ids, self.template_ids)

    def sampling_params(self, **kwargs):
        """vLLM ``SamplingParams`` with the banned ids at -inf and the special tokens kept in
        ``completion.text`` (callers decode from the ids with ``decode``)."""
        from vllm import SamplingParams

        # The constructor, not SamplingParams.from_optional, which clamps biases to +-100.
        return SamplingParams(**kwargs, logit_bias={i: BANNED_LOGIT for i in self.banned_ids},
                              skip_special_tokens=False)

    def generate_kwargs(self) -> dict:
        """transformers ``generate`` kwargs applying the rule."""
        return {"logits_processor": LogitsProcessorList([_BanProcessor(self.banned_ids)])}
