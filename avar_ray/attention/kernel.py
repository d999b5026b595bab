"""The ``avar`` attention implementation: SDPA, plus attention statistics and the intervention
key bias when a forward pass carries an ``AttentionContext`` (SPEC.md §1-2).

Registered with transformers' ``AttentionInterface`` (and the SDPA mask builder under the
same name, so padding masks are built exactly as for ``sdpa``). Called by the text decoder
layers (``module.layer_idx`` set) and by the vision blocks (``layer_idx`` None): the vision
calls, and every call without a context, go straight to transformers' own
``sdpa_attention_forward`` -- the same function ``attn_implementation="sdpa"`` runs.

Statistics: for the queries i in Q, the mass on a key set K is

    m_K(i) = sum_{j in K} softmax(z_i)_j = exp( LSE_{j in K} z_ij - LSE_j z_ij )

computed one of two ways, both exact and differentiable:

* ``fused`` (default): the masses are attention outputs whose values are the indicator
  columns of V and S, ``softmax(z) @ [1_V, 1_S]``. In float32 the layer makes ONE SDPA call
  with query/key zero-padded by two columns (logits unchanged) and the value extended by
  ``[1_V, 1_S]``: output and masses come from the same kernel (about +2/D of the attention
  cost). In bf16/fp16 the output call stays in the model dtype and a second, float32 SDPA call
  gives the masses (precision of the statistics). Same masks and kernels as SDPA, O(T) extra
  memory, differentiable through SDPA's own backward.
* ``chunked``: the logsumexp form above in float32, over chunks of ``chunk_size`` query rows
  of Q x the keys they can see (causal: up to the chunk's last row), peak extra memory
  chunk x T per head, never T x T. ``LSE_all`` over the row, then
  ``exp(z - LSE_all)`` over the V ∪ S columns only, times their indicator columns, gives both
  masses. Under autograd each chunk is checkpointed (recomputed in the backward), so training
  memory stays chunk x T too. It recomputes q·k for the rows of Q, so it costs more than
  ``fused`` (bench/attention_stats.py, T=4096, CPU: whole forward 2.9x plain SDPA, fused
  1.2x): a cross-check and a fallback, not the default.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ATTN_IMPLEMENTATION = "avar"


def register_attention() -> str:
    """Register ``attn_implementation="avar"`` with transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, avar_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def avar_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                           scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                           avar_context=None, **kwargs):
    """transformers attention function: query ``[B, H, Tq, D]``, key/value ``[B, Hkv, Tk, D]``."""
    layer_idx = getattr(module, "layer_idx", None)  # None: a vision block
    if avar_context is None or layer_idx is None:
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                     is_causal=is_causal, **kwargs)
    ctx = avar_context
    ctx.calls += 1
    batch, _, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    causal = is_causal if is_causal is not None else module.is_causal
    bias = ctx.key_bias(layer_idx, batch, kv_len, query.device)
    mask = attention_mask if bias is None else _with_bias(attention_mask, bias, q_len, kv_len, causal, query.dtype)
    if not ctx.wants_stats(layer_idx):
        return _sdpa(module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=causal, **kwargs)
    qmask = ctx.queries(batch, q_len, query.device)
    visual, system = ctx.key_masks(batch, kv_len, query.device)
    scale = scaling if scaling is not None else head_dim ** -0.5
    if ctx.method == "fused" and query.dtype == torch.float32 and dropout == 0.0:
        # one call: the output and the masses from the same kernel
        out, mass_v, mass_s = fused_call(module, query, key, value, mask, causal, visual, system, scale, **kwargs)
    else:
        out, _ = _sdpa(module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=causal, **kwargs)
        if bias is not None and query.dtype != torch.float32:
            mask = _with_bias(attention_mask, bias, q_len, kv_len, causal, torch.float32)
        if ctx.method == "fused":  # a float32 statistics call beside the low-precision output call
            _, mass_v, mass_s = fused_call(module, query.float(), key.float(), None, mask, causal, visual, system,
                                           scale)
        else:
            mass_v, mass_s = chunked_masses(query, key, mask, causal, visual, system, qmask, scale, ctx.chunk_size)
    keep = qmask[:, None, :]
    zero = mass_v.new_zeros(())
    # where, not a product: rows of left padding can be fully masked (NaN in some kernels)
    ctx.record(layer_idx, torch.where(keep, mass_v, zero), torch.where(keep, mass_s, zero))
    return out, None


def _allowed(attention_mask: Optional[torch.Tensor], q_len: int, kv_len: int, causal: bool, device) -> Optional[torch.Tensor]:
    """Boolean ``[B|1, 1, Tq, Tk]`` of the keys each query may see, exactly as the SDPA call sees
    them (None: all). A None mask with causal queries means SDPA's ``is_causal`` (top-left
    aligned; transformers crops the keys to Tq in that case)."""
    if attention_mask is not None:
        return attention_mask
    if q_len > 1 and causal:
        rows = torch.arange(q_len, device=device)[:, None]
        cols = torch.arange(kv_len, device=device)[None, :]
        return (cols <= rows)[None, None]
    return None


def _with_bias(attention_mask: Optional[torch.Tensor], bias: torch.Tensor, q_len: int, kv_len: int, causal: bool,
               dtype: torch.dtype) -> torch.Tensor:
    """The additive float mask ``[B, 1, Tq, Tk]``: the key bias where attention is allowed,
    the dtype's minimum elsewhere (as transformers' eager masks)."""
    row_bias = bias[:, None, None, :].to(dtype)
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        return attention_mask.to(dtype) + row_bias
    allowed = _allowed(attention_mask, q_len, kv_len, causal, bias.device)
    if allowed is None:
        return row_bias.expand(bias.shape[0], 1, q_len, kv_len)
    return torch.where(allowed, row_bias, torch.finfo(dtype).min)


# ----------------------------------------------------------------------------- fused
def fused_call(module, query: torch.Tensor, key: torch.Tensor, value: Optional[torch.Tensor],
               mask: Optional[torch.Tensor], causal: bool, visual: torch.Tensor, system: torch.Tensor, scale: float,
               **kwargs) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """One SDPA call over ``[q, 0]``, ``[k, 0]``, ``[v, 1_V, 1_S, 0]``: the zero columns leave
    every logit q·k unchanged (``scale`` is passed explicitly), so the first D output columns
    are the attention output and the next two the masses ``softmax(z) @ 1_V`` and
    ``softmax(z) @ 1_S``. ``value`` None: statistics only. Returns (output ``[B, Tq, H, D]``
    or None, mass_v ``[B, H, Tq]``, mass_s)."""
    batch, _, _, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    v_dim = 0 if value is None else value.shape[-1]
    width = max(head_dim, v_dim + 2)
    if query.device.type == "cuda":
        width += -width % 8  # flash / memory-efficient kernels want head dims in multiples of 8
    ind = torch.stack([visual, system], dim=-1).to(query.dtype)[:, None].expand(batch, kv_heads, kv_len, 2)
    parts = ([] if value is None else [value]) + [ind]
    if width > v_dim + 2:
        parts.append(ind.new_zeros(batch, kv_heads, kv_len, width - v_dim - 2))
    values = torch.cat(parts, dim=-1)
    q = F.pad(query, (0, width - head_dim)) if width > head_dim else query
    k = F.pad(key, (0, width - head_dim)) if width > head_dim else key
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(query.dtype)
    out, _ = _sdpa(module, q, k, values, mask, dropout=0.0, scaling=scale, is_causal=causal, **kwargs)
    # out: [B, Tq, H, width]
    output = None if value is None else out[..., :v_dim].contiguous()
    return output, out[..., v_dim].transpose(1, 2), out[..., v_dim + 1].transpose(1, 2)


# ----------------------------------------------------------------------------- chunked
def _chunk_masses(q: torch.Tensor, k: torch.Tensor, rows_mask: Optional[torch.Tensor], cols: torch.Tensor,
                  ind: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Masses of one chunk of query rows. q ``[B, H, c, D]``, k ``[B, Hkv, Tk, D]`` (float32);
    ``rows_mask``: bool (allowed) or float (additive) ``[B|1, 1, c, Tk]`` or None; ``cols``
    the V ∪ S key positions (< Tk) and ``ind`` their indicator columns ``[B, 1, |cols|, 2]``.

    ``m_K = exp(LSE_K - LSE_all) = sum_{j in K} exp(z_j - LSE_all)``: one exp over the V ∪ S
    columns and a product with the indicators give both masses (instead of a masked LSE per set)."""
    batch, heads, c, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    groups = heads // kv_heads  # GQA: head h reads kv head h // groups (transformers' repeat_kv)
    # the scale goes on q (c x D), not on the logits (c x Tk); masks are applied in place
    z = torch.matmul(q.reshape(batch, kv_heads, groups * c, dim) * scale, k.transpose(-1, -2))
    z = z.view(batch, heads, c, kv_len)
    if rows_mask is not None:
        z = z.add_(rows_mask) if rows_mask.dtype != torch.bool else z.masked_fill_(~rows_mask, torch.finfo(z.dtype).min)
    lse_all = torch.logsumexp(z, dim=-1, keepdim=True)
    probs = torch.exp(z.index_select(-1, cols) - lse_all)  # [B, H, c, |V ∪ S|]
    masses = torch.matmul(probs, ind)  # [B, H, c, 2]
    return masses[..., 0], masses[..., 1]


def chunked_masses(query: torch.Tensor, key: torch.Tensor, mask: Optional[torch.Tensor], causal: bool,
                   visual: torch.Tensor, system: torch.Tensor, qmask: torch.Tensor, scale: float,
                   chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``exp(LSE_K - LSE_all)`` for the query rows in Q, ``chunk_size`` rows at a time; returns
    two ``[B, H, Tq]`` float32 tensors (zero outside Q).

    Causal layers (a full pass: query i is key i): a chunk whose last row is r sees no key
    after r, so only the first r + 1 keys are read."""
    batch, heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    rows = qmask.any(0).nonzero().flatten()
    mass_v = query.new_zeros((batch, heads, q_len), dtype=torch.float32)
    mass_s = torch.zeros_like(mass_v)
    if rows.numel() == 0:
        return mass_v, mass_s
    crop = causal and q_len == kv_len
    cols = (visual | system).any(0).nonzero().flatten()
    ind = torch.stack([visual, system], dim=-1).index_select(1, cols).float()[:, None]  # [B, 1, |cols|, 2]
    k32 = key.float()
    parts_v, parts_s = [], []
    for idx in rows.split(chunk_size):
        width = int(idx[-1]) + 1 if crop else kv_len
        q_chunk = query.index_select(2, idx).float()
        if mask is not None:
            rows_mask = mask.index_select(2, idx)[..., :width]
            rows_mask = rows_mask if rows_mask.dtype == torch.bool else rows_mask.float()
        elif q_len > 1 and causal:  # SDPA's is_causal, built for these rows only
            rows_mask = (torch.arange(width, device=query.device)[None, :] <= idx[:, None])[None, None]
        else:
            rows_mask = None
        n_cols = int(torch.searchsorted(cols, width))  # cols ascending: those below the crop
        fn = partial(_chunk_masses, rows_mask=rows_mask, cols=cols[:n_cols], ind=ind[:, :, :n_cols], scale=scale)
        k_chunk = k32[:, :, :width]
        if torch.is_grad_enabled() and (q_chunk.requires_grad or k32.requires_grad):
            mv, ms = checkpoint(fn, q_chunk, k_chunk, use_reentrant=False)
        else:
            mv, ms = fn(q_chunk, k_chunk)
        parts_v.append(mv)
        parts_s.append(ms)
    mass_v = mass_v.index_copy(2, rows, torch.cat(parts_v, dim=2))
    mass_s = mass_s.index_copy(2, rows, torch.cat(parts_s, dim=2))
    return mass_v, mass_s
