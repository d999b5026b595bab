"""The policy's side of GRPO on an HF model: rollouts back into model inputs, and the
log-probability (and entropy) of every sampled response token.

Shared by the learners (old/new log-probs) and the tests that hold the learner against vLLM.
The sampler and the learner must define the same distribution: both divide the logits by the
sampling temperature and both forbid the chat-template and vision tokens (see
``avar_ray.spans.RESPONSE_BANNED_TOKENS``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from actors.records import conversation
from avar_ray.data.schema import Sample
from avar_ray.decoding import ban_logits
from avar_ray.modeling import Encoded, encode_batch
from avar_ray.spans import banned_token_ids  # noqa: F401  (re-exported: the rollout worker and learner use it)


def encode_rollouts(processor, samples: Sequence[Sample], response_ids: Sequence[Sequence[int]],
                    system_prompt: str | None = None) -> Encoded:
    """Prompt + sampled response ids, right-padded, exactly as vLLM saw the prompt."""
    messages, images = zip(*(conversation(s, system_prompt) for s in samples))
    return encode_batch(processor, list(messages), list(images), response_ids=list(response_ids),
                        padding_side="right")


def response_index(prompt_lengths: Sequence[int], response_lengths: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """For a right-padded batch: the position of every response token ``[B, R]`` (R = longest
    response; padding clamped to the prompt's last token) and its validity mask."""
    width = max(max(response_lengths), 1)
    steps = torch.arange(width)
    starts = torch.tensor(list(prompt_lengths)).unsqueeze(1)
    lengths = torch.tensor(list(response_lengths)).unsqueeze(1)
    mask = steps.unsqueeze(0) < lengths
    positions = torch.where(mask, starts + steps, starts)
    return positions, mask


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                   temperature: float = 1.0, banned_ids: Sequence[int] = (),
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of the token at each ``positions[b, r]`` under the logits one step earlier.

    Returns ``(logprobs [B, R], entropy [B, R] or None)``, zero where ``mask`` is False.
    """
    rows = torch.arange(logits.shape[0], device=logits.device).unsqueeze(1)
    prev = (positions - 1).clamp(min=0).to(logits.device)
    picked = logits[rows, prev].float() / temperature  # [B, R, V]
    picked = ban_logits(picked, banned_ids)
    logp = torch.log_softmax(picked, dim=-1)
    targets = input_ids.to(logits.device)[rows, positions.to(logits.device)]
    out = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = mask.to(logits.device)
    out = torch.where(mask, out, torch.zeros_like(out))
    entropy = None
    if with_entropy:
        p = logp.exp()
        ent = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
        entropy = torch.where(mask, ent, torch.zeros_like(ent))
    return out, entropy


def forward_logprobs(model, encoded: Encoded, response_lengths: Sequence[int], temperature: float = 1.0,
                     banned_ids: Sequence[int] = (), with_entropy: bool = False):
    """One forward of ``model`` on ``encoded``; the response tokens' log-probs (see above)
    plus the ``[B, R]`` mask."""
    device = next(model.parameters()).device
    encoded = encoded.to(device)
    outputs = model(**encoded.inputs, use_cache=False)
    positions, mask = response_index(encoded.prompt_lengths, response_lengths)
    logprobs, entropy = token_logprobs(outputs.logits, encoded.inputs["input_ids"], positions, mask,
                                       temperature, banned_ids, with_entropy)
    return logprobs, entropy, mask.to(device)


def pad_rows(rows: Sequence[Sequence[float]], width: int | None = None) -> torch.Tensor:
    """Ragged float rows to a zero-padded ``[B, width]`` tensor."""
    width = width if width is not None else max((len(r) for r in rows), default=0)
    out = torch.zeros(len(rows), max(width, 1))
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(list(r), dtype=torch.float32)
    return out
