"""Exact token spans of a tokenized conversation: S (system), U (user text), V (visual), R
(response), found from the token ids and the chat template's markers (SPEC.md, notation).

Never estimated from character offsets or a fixed fraction of the prompt. Works for the
Qwen2-VL / Qwen2.5-VL / Qwen3-VL templates (``<|im_start|>role\\n ... <|im_end|>\\n`` turns,
images as ``<|vision_start|><|image_pad|>...<|vision_end|>``), with or without an explicit
system prompt (Qwen2/2.5-VL's default one counts as S; Qwen3-VL's template adds none, so S is
empty there unless the caller gives one), several images, and padded batches (left or right).
A tokenizer without these markers gets ``UnsupportedTemplateError``.

    S  the whole system turn: <|im_start|>system\\n ... <|im_end|>\\n
    U  the user turn(s) minus V and minus the vision start/end markers
    V  the image placeholder tokens (<|image_pad|>; <|video_pad|> too), all images
    R  the assistant turn's content: the tokens after <|im_start|>assistant\\n, up to and
       including its <|im_end|> (the generated or label tokens)
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

ROLES = ("system", "user", "assistant")
QUERY_SPANS = ("user", "response", "user_visual")

# Template tokens a response must never contain, in RL sampling, eval and serving alike. A
# generated image placeholder would be read as one by the next forward (the model counts
# <|image_pad|> tokens to place image features), and a generated <|im_start|> opens a new turn
# that the span finder cannot segment. <|im_end|> stays allowed: it ends the response.
RESPONSE_BANNED_TOKENS = ("<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                          "<|image_pad|>", "<|video_pad|>")


def banned_token_ids(tokenizer) -> list[int]:
    """Ids of ``RESPONSE_BANNED_TOKENS`` in this tokenizer (or processor)."""
    vocab = getattr(tokenizer, "tokenizer", tokenizer).get_vocab()
    return sorted(vocab[t] for t in RESPONSE_BANNED_TOKENS if t in vocab)


class UnsupportedTemplateError(ValueError):
    """The tokenizer's chat template has no markers this module can segment."""


@dataclass(frozen=True)
class TemplateIds:
    """Token ids of the chat template's markers."""

    im_start: int
    im_end: int
    newline: int
    vision_start: int
    vision_end: int
    visual: tuple[int, ...]  # placeholder ids: image pad (and video pad)
    role_headers: dict  # role -> tuple of token ids of "role\n"

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "TemplateIds":
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # accept a processor
        vocab = tokenizer.get_vocab()
        needed = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
        missing = [t for t in needed if t not in vocab]
        if missing:
            name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
            raise UnsupportedTemplateError(
                f"cannot segment conversations of {name!r}: its tokenizer lacks {', '.join(missing)} "
                "(supported: Qwen2-VL / Qwen2.5-VL / Qwen3-VL chat templates)"
            )
        newline = tokenizer.encode("\n", add_special_tokens=False)
        if len(newline) != 1:
            raise UnsupportedTemplateError("the newline after a role name is not one token")
        visual = tuple(vocab[t] for t in ("<|image_pad|>", "<|video_pad|>") if t in vocab)
        headers = {r: tuple(tokenizer.encode(r, add_special_tokens=False)) + (newline[0],) for r in ROLES}
        return cls(vocab["<|im_start|>"], vocab["<|im_end|>"], newline[0], vocab["<|vision_start|>"],
                   vocab["<|vision_end|>"], visual, headers)


@dataclass
class Spans:
    """Boolean masks ``[B, T]`` over token positions; padding belongs to none of them."""

    system: torch.Tensor
    user: torch.Tensor
    visual: torch.Tensor
    response: torch.Tensor

    def query(self, name: str) -> torch.Tensor:
        """The query set Q: "user" (U), "response" (R) or "user_visual" (U+V, the reference code's)."""
        if name == "user":
            return self.user
        if name == "response":
            return self.response
        if name == "user_visual":
            return self.user | self.visual
        raise ValueError(f"query span must be one of {QUERY_SPANS}, got {name!r}")

    def to(self, device) -> "Spans":
        return Spans(*(m.to(device) for m in (self.system, self.user, self.visual, self.response)))

    def counts(self) -> dict:
        return {k: getattr(self, k).sum(-1).tolist() for k in ("system", "user", "visual", "response")}


def _segment_row(ids: list[int], valid: list[bool], t: TemplateIds, row: int):
    """Masks of one sequence as Python lists (S, U, V, R)."""
    n = len(ids)
    system, user, visual, response = ([False] * n for _ in range(4))
    starts = [i for i in range(n) if valid[i] and ids[i] == t.im_start]
    if not starts:
        raise UnsupportedTemplateError(f"row {row}: no <|im_start|> turn marker in the sequence")
    for k, start in enumerate(starts):
        role = next((r for r, h in t.role_headers.items() if tuple(ids[start + 1:start + 1 + len(h)]) == h), None)
        if role is None:
            raise UnsupportedTemplateError(f"row {row}: turn at position {start} has an unknown role header")
        stop = starts[k + 1] if k + 1 < len(starts) else n  # the turn owns everything up to the next one
        end = next((i for i in range(start, stop) if ids[i] == t.im_end), None)
        if role == "assistant":
            first = start + 1 + len(t.role_headers[role])
            last = end if end is not None else stop - 1  # generation may stop before <|im_end|>
            for i in range(first, last + 1):
                response[i] = valid[i]
            continue
        # system / user turns run through <|im_end|> and the "\n" after it
        last = (end + 1 if end + 1 < stop and ids[end + 1] == t.newline else end) if end is not None else stop - 1
        for i in range(start, last + 1):
            if not valid[i]:
                continue
            if role == "system":
                system[i] = True
            elif ids[i] in t.visual:
                visual[i] = True
            elif ids[i] not in (t.vision_start, t.vision_end):
                user[i] = True
    return system, user, visual, response


def find_spans(input_ids: torch.Tensor, template: TemplateIds, attention_mask: torch.Tensor | None = None) -> Spans:
    """S/U/V/R masks for a batch ``[B, T]`` (or one sequence ``[T]``) of token ids."""
    squeeze = input_ids.dim() == 1
    ids2d = input_ids.unsqueeze(0) if squeeze else input_ids
    if attention_mask is None:
        valid2d = torch.ones_like(ids2d, dtype=torch.bool)
    else:
        valid2d = (attention_mask.unsqueeze(0) if squeeze else attention_mask).bool()
    rows = [_segment_row(ids2d[b].tolist(), valid2d[b].tolist(), template, b) for b in range(ids2d.shape[0])]
    masks = [torch.tensor([r[k] for r in rows], dtype=torch.bool, device=ids2d.device) for k in range(4)]
    if squeeze:
        masks = [m[0] for m in masks]
    return Spans(*masks)


# tokenizer -> (its size, its TemplateIds): every padded batch needs the markers, and reading
# them builds a dict of the whole vocabulary (get_vocab: 74-155 ms at Qwen's 151k tokens,
# bench/learner_step.py), once per prompt and micro-batch in the learner, per batch in SFT and eval.
_TEMPLATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def template_ids(tokenizer) -> TemplateIds:
    """``TemplateIds.from_tokenizer`` read once per tokenizer (or processor), again only if
    tokens were added since."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    size = len(tokenizer)
    hit = _TEMPLATES.get(tokenizer)
    if hit is None or hit[0] != size:
        hit = _TEMPLATES[tokenizer] = (size, TemplateIds.from_tokenizer(tokenizer))
    return hit[1]


def spans_for(tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Spans:
    """Convenience: ``find_spans`` with the markers of a tokenizer or processor."""
    return find_spans(input_ids, template_ids(tokenizer), attention_mask)
