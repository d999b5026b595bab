"""The policy's side of GRPO on an HF model: rollouts back into model inputs, and the
log-probability (and entropy) of every sampled response token.

Memory: the log-probs come from the decoder's hidden states at the response positions only,
through the LM head in chunks of ``LOGPROB_CHUNK`` tokens; no ``[B, T, V]`` logits are ever
built (at V = 151,936 those are the learner's largest tensors). The backward recomputes each
chunk's ``[chunk, V]`` logits instead of keeping them, and under ZeRO-3 the head's weight is
gathered once for all the chunks of a forward and once for the backward
(``_ChunkedHeadLogprobs``). The entropy is a metric: computed without grad. Compute: a batch's rollouts of one prompt
carry its images once per row; the vision tower encodes each distinct image once
(``each_image_once``).

The sampler and the learner must define the same distribution: both divide the logits by the
sampling temperature and both forbid the chat-template and vision tokens (see
``avar_ray.spans.RESPONSE_BANNED_TOKENS``).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional, Sequence

import torch

from actors.records import conversation
from avar_ray.data.schema import Sample
from avar_ray.decoding import ban_logits
from avar_ray.modeling import Encoded, encode_batch
from avar_ray.spans import banned_token_ids  # noqa: F401  (re-exported: the rollout worker and learner use it)
LOGPROB_CHUNK = 128  # response tokens per LM-head chunk (a [128, V] float32 tensor: 78 MB at V = 151,936)


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


class FullWeight:
    """The head's whole weight from construction to ``release()``: under ZeRO-3 (a partitioned
    parameter) ONE all-gather, none where DeepSpeed holds it whole already; released then only
    if gathered here and no module is using it (a tied embedding inside its backward: DeepSpeed
    releases it with that module). Without ZeRO-3 nothing to do."""

    def __init__(self, weight: torch.nn.Parameter):
        self.weight = weight
        self.gathered = hasattr(weight, "ds_id") and weight.ds_status.name == "NOT_AVAILABLE"
        if self.gathered:
            weight.all_gather()

    def release(self) -> None:
        if self.gathered and not self.weight.ds_active_sub_modules:
            self.weight.partition()
        self.gathered = False

    def __enter__(self) -> "FullWeight":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _chunk_logits(hs: torch.Tensor, weight: torch.Tensor, temperature: float,
                  banned: Optional[torch.Tensor]) -> torch.Tensor:
    logits = torch.nn.functional.linear(hs, weight).float()  # [chunk, V]: the only vocabulary-wide tensor
    logits.div_(temperature)
    return ban_logits(logits, banned) if banned is not None else logits


class _ChunkedHeadLogprobs(torch.autograd.Function):
    """``log softmax(h W^T / T)[target]`` per row of ``h`` in chunks, never more than one
    chunk's ``[chunk, V]`` logits alive; the backward recomputes each chunk's logits (as
    activation checkpointing did) and sums the head's gradient over the chunks itself. So the
    weight is gathered once for the forward and once for the backward (``FullWeight``), where
    calling the head module per chunk gathered it per chunk, per recompute and per backward.
    The gradient is returned whole, as a ZeRO-3 module's backward gives it (DeepSpeed's hook on
    the parameter's gradient accumulation then reduce-scatters it once)."""

    @staticmethod
    def forward(ctx, h, weight, targets, temperature, banned, chunks, with_entropy):
        pieces, ents = [], []
        for hs, ts in zip(torch.tensor_split(h, chunks), torch.tensor_split(targets, chunks)):
            logits = _chunk_logits(hs, weight, temperature, banned)
            lse = torch.logsumexp(logits, dim=-1)
            pieces.append(logits.gather(-1, ts.unsqueeze(-1)).squeeze(-1) - lse)
            if with_entropy:  # a metric: from the same logits, no graph
                p = torch.softmax(logits, dim=-1)
                ents.append(lse - (p * logits.masked_fill(p == 0, 0.0)).sum(-1))
        ctx.save_for_backward(h, targets)
        ctx.weight, ctx.temperature, ctx.banned, ctx.chunks = weight, temperature, banned, chunks
        entropy = torch.cat(ents) if with_entropy else h.new_zeros(0, dtype=torch.float32)
        ctx.mark_non_differentiable(entropy)
        return torch.cat(pieces), entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        h, targets = ctx.saved_tensors
        weight = ctx.weight
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        full = FullWeight(weight)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        start = 0
        for hs, ts, g in zip(torch.tensor_split(h, ctx.chunks), torch.tensor_split(targets, ctx.chunks),
                             torch.tensor_split(grad_logp, ctx.chunks)):
            # d logp[t] / d logits = onehot(t) - softmax(logits); logits = h W^T / T
            d = torch.softmax(_chunk_logits(hs, weight, ctx.temperature, ctx.banned), dim=-1).neg_()
            d.scatter_add_(-1, ts.unsqueeze(-1), torch.ones_like(g).unsqueeze(-1))
            d.mul_((g / ctx.temperature).unsqueeze(-1))
            if need_h:
                grad_h[start:start + hs.shape[0]] = d.to(weight.dtype) @ weight
            if need_w:  # in place: no second [V, H] tensor
                grad_w.addmm_(d.t(), hs.float())
            start += hs.shape[0]
        if need_w and full.gathered:
            # autograd accumulates a gradient into a parameter of the gradient's shape: the weight
            # stays whole until then (a one-shot hook, after DeepSpeed's, which reduce-scatters it)
            def release(_param):
                handle.remove()
                full.release()

            handle = weight.register_post_accumulate_grad_hook(release)
        else:
            full.release()
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None, None, None


def hidden_logprobs(lm_head, hidden: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor,
                    mask: torch.Tensor, temperature: float = 1.0, banned_ids: Sequence[int] = (),
                    with_entropy: bool = False):
    """Log-prob ``[B, R]`` of the token at each ``positions[b, r]`` given the hidden state one
    position earlier (zero where ``mask`` is False), and the entropy ``[B, R]`` (no grad) or None.
    The LM head (no bias) runs on ``LOGPROB_CHUNK`` tokens at a time inside one gather of its
    weight (``_ChunkedHeadLogprobs``)."""
    device = hidden.device
    mask = mask.to(device)
    rows = torch.arange(hidden.shape[0], device=device).unsqueeze(1).expand_as(mask)[mask]
    cols = positions.to(device)[mask]
    h = hidden[rows, (cols - 1).clamp(min=0)]  # [N, H]: response positions only
    targets = input_ids.to(device)[rows, cols]
    banned = torch.tensor(list(banned_ids), device=device, dtype=torch.long) if banned_ids else None
    if lm_head.bias is not None:
        raise ValueError("hidden_logprobs: an LM head with a bias is not supported")
    chunks = max(1, -(-h.shape[0] // LOGPROB_CHUNK))
    with FullWeight(lm_head.weight):  # the forward's one gather (autograd records the whole shape)
        lp, ent = _ChunkedHeadLogprobs.apply(h, lm_head.weight, targets, float(temperature), banned, chunks,
                                             with_entropy)
    out = torch.zeros(mask.shape, dtype=torch.float32, device=device).masked_scatter(mask, lp)
    entropy = torch.zeros(mask.shape, device=device).masked_scatter(mask, ent) if with_entropy else None
    return out, entropy


@contextmanager
def hidden_only(module):
    """Inside the block the model's LM head is the identity: a forward returns the decoder's
    last hidden states where the logits were (through a DeepSpeed engine too, whose forward
    sets up its backward hooks), and ``hidden_logprobs`` applies the real head in chunks."""
    head = module.lm_head
    module.lm_head = torch.nn.Identity()
    try:
        yield head
    finally:
        module.lm_head = head


def distinct_images(inputs: dict) -> Optional[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """A batch's rollouts of one prompt carry its images once per row: the distinct images'
    ``pixel_values`` and ``image_grid_thw`` and, per image of the batch, its distinct image's
    index; None when every image is distinct."""
    grid = inputs.get("image_grid_thw")
    if grid is None or grid.shape[0] < 2:
        return None
    grids = grid.tolist()
    pieces = torch.split(inputs["pixel_values"], [t * h * w for t, h, w in grids])
    keep, index = [], []
    for i, piece in enumerate(pieces):
        same = (j for j, k in enumerate(keep) if grids[k] == grids[i] and torch.equal(pieces[k], piece))
        index.append(next(same, len(keep)))
        if index[-1] == len(keep):
            keep.append(i)
    if len(keep) == len(pieces):
        return None
    return torch.cat([pieces[k] for k in keep]), grid[keep], index


@contextmanager
def each_image_once(module, inputs: dict, device):
    """Inside the block a forward of ``module`` on the yielded inputs (``inputs`` on ``device``,
    with the distinct images' ``pixel_values`` only) runs the vision tower once per distinct
    image and gives every image placeholder its image's features (the gradient sums over the
    uses, as when each row's copy was encoded; Qwen3-VL's DeepStack features alike). The
    duplicates are found before the copy to ``device`` (no GPU sync)."""
    found = distinct_images(inputs)
    if found is None:
        yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        return
    pixel_values, grid, index = found[0].to(device), found[1].to(device), found[2]
    moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items() if k != "pixel_values"}
    model = module.model
    encode = model.get_image_features

    def get_image_features(_pixel_values, _grid, **kwargs):  # called once per forward, on the distinct images
        out = encode(pixel_values, grid, **kwargs)
        out.pooler_output = tuple(out.pooler_output[j] for j in index)
        if getattr(out, "deepstack_features", None) is not None:
            out.deepstack_features = [tuple(layer[j] for j in index) for layer in out.deepstack_features]
        return out

    model.get_image_features = get_image_features
    try:
        yield {**moved, "pixel_values": pixel_values}
    finally:
        del model.get_image_features


def forward_logprobs(model, encoded: Encoded, response_lengths: Sequence[int], temperature: float = 1.0,
                     banned_ids: Sequence[int] = (), with_entropy: bool = False, **kwargs):
    """One forward of ``model`` (an HF ...ForConditionalGeneration, or a DeepSpeed engine around
    one) on ``encoded``; the response tokens' log-probs and entropy (see above) plus the
    ``[B, R]`` mask. ``kwargs`` reach the attention (e.g. ``avar_context``)."""
    module = getattr(model, "module", model)
    device = next(module.parameters()).device
    with hidden_only(module) as head, each_image_once(module, encoded.inputs, device) as inputs:
        hidden = model(**inputs, use_cache=False, **kwargs).logits
    positions, mask = response_index(encoded.prompt_lengths, response_lengths)
    logprobs, entropy = hidden_logprobs(head, hidden, inputs["input_ids"], positions, mask,
                                        temperature, banned_ids, with_entropy)
    return logprobs, entropy, mask.to(device)


def pad_rows(rows: Sequence[Sequence[float]], width: int | None = None) -> torch.Tensor:
    """Ragged float rows to a zero-padded ``[B, width]`` tensor."""
    width = width if width is not None else max((len(r) for r in rows), default=0)
    out = torch.zeros(len(rows), max(width, 1))
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(list(r), dtype=torch.float32)
    return out
