"""The ``avar`` attention implementation: SDPA, plus attention statistics and the intervention
key bias when a forward pass carries an ``AttentionContext`` (SPEC.md §1-2).

Registered with transformers' ``AttentionInterface`` (and the SDPA mask builder under the
same name, so padding masks are built exactly as for ``sdpa``). Called by the text decoder
layers (``module.layer_idx`` set) and by the vision blocks (``layer_idx`` None): the vision
calls, and every call without a context, go straight to transformers' own
``sdpa_attention_forward`` -- the same function ``attn_implementation="sdpa"`` runs.

Intervention (SPEC.md §2): the key bias b_j (log(1 + a_img) on V, log(1 - a_sys) on S) enters
as one more q/k column, q' = [q, 1] and k' = [k, b / scale], so scale·q'·k' = scale·q·k + b_j.
The attention mask is passed on untouched: SDPA keeps ``is_causal`` and its fused kernels, and
no [T, T] float mask is built (``augmented_call``).

Statistics: for the queries i in Q, the mass on a key set K is

    m_K(i) = sum_{j in K} softmax(z_i)_j = exp( LSE_{j in K} z_ij - LSE_j z_ij )

computed one of three ways, all exact and differentiable, only in the statistics layers
(``attention.layers``; every other layer takes the plain path above):

* ``lse`` (``avar_ray.attention.lse``): one attention call in the model's dtype that also
  returns each row's float32 log-sum-exp (the CPU flash kernel; on CUDA flash /
  memory-efficient), then ``exp(z_ij - LSE_i)`` from float32 q·k for the rows of Q and the
  V ∪ S columns only, in chunks of rows (extra memory about ``chunk_size`` x T per head).
  Its backward is its own (LSE is not differentiable through the kernel): exact, chunked over
  the rows of Q x the keys they see, in float32.
* ``fused``: the masses are attention outputs whose values are the indicator
  columns of V and S, ``softmax(z) @ [1_V, 1_S]``. In float32 the layer makes ONE SDPA call
  with query/key zero-padded by two columns (logits unchanged; the intervention's column goes
  there) and the value extended by ``[1_V, 1_S]``: output and masses come from the same kernel
  (about +2/D of the attention cost). In bf16/fp16 the output call stays in the model dtype and
  a second, float32 SDPA call over all T rows gives the masses (the old default's whole cost
  there). Differentiable through SDPA's own backward.
* ``chunked``: the logsumexp form above in float32, over chunks of ``chunk_size`` query rows
  of Q x the keys they can see (causal: up to the chunk's last row), peak extra memory
  chunk x T per head, never T x T; each chunk checkpointed under autograd. It recomputes q·k
  for the rows of Q against all keys: a cross-check and a fallback, not a default.

``auto`` (no method named, ``attention.chunk_size`` null) picks per call from ``AUTO`` by
device, dtype and grad, from bench/results/attention_stats.md (2 text layers at Qwen2.5-VL-3B
widths, T = 4096, Q = R, |V| = 1024, |S| = 24; ratios over a plain SDPA forward, min of
interleaved runs on a loaded 2-core CPU):

    one statistics layer's attention call (--level layer), time / extra peak memory over SDPA:
    | dtype | grad | fused (old)   | lse (new)     | auto picks |
    | fp32  | no   | 1.13x / 1.52x | 1.53x / 1.00x | fused      |
    | fp32  | yes  | 1.12x / 2.02x | 1.75x / 3.18x | fused      |
    | bf16  | no   | 2.09x / 6.04x | 1.33x / 9.22x | lse        |
    | bf16  | yes  | 2.32x / 3.00x | 2.89x / 7.71x | fused      |

The whole 2-layer forward without grad, rerun when the load had dropped: bf16 fused 1.12x,
lse 1.02x; fp32 1.03x and 1.00x, within noise; memory 0.98-1.00x for both.
So ``lse`` is the default only for a bf16/fp16 forward without grad on CPU (the RL score
pass, eval, serve): there it replaces fused's second float32 call over all T rows. With grad
(AGTO) its own backward, three float32 |Q| x T x D products per head, costs more than SDPA's
backward of the fused call, so grad keeps ``fused``. In float32 the fused call is one kernel
already and stays.

CUDA is not in ``AUTO`` yet (no GPU measurement of ``lse``; bench/gpu_check.sh prints it), so
it keeps ``fused`` until one says otherwise.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from avar_ray.attention.lse import lse_attention, lse_masses

ATTN_IMPLEMENTATION = "avar"
# method "auto": (device, dtype, grad) -> method, from bench/results/attention_stats.md; "half" is
# bf16/fp16. Missing (CUDA: the lse kernels are not yet measured there) -> "fused".
AUTO = {("cpu", "half", False): "lse"}


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
    scale = scaling if scaling is not None else head_dim ** -0.5
    bias = ctx.key_bias(layer_idx, batch, kv_len, query.device)  # [B, Tk] float32 or None
    if not ctx.wants_stats(layer_idx):
        if bias is None:
            return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                         is_causal=causal, **kwargs)
        out, _ = augmented_call(module, query, key, value, attention_mask, causal, scale, bias, dropout=dropout,
                                **kwargs)
        return out, None
    qmask = ctx.queries(batch, q_len, query.device)
    visual, system = ctx.key_masks(batch, kv_len, query.device)
    method = resolve_method(ctx.method, query, key)
    if method == "lse":  # one call in the model's dtype; masses from its log-sum-exp
        out, lse, kernel_bias = lse_attention(query, key, value, attention_mask, causal, scale, bias, dropout)
        masses = lse_masses(query, key, lse, attention_mask, causal, visual, system, qmask, scale, ctx.chunk_size,
                            kernel_bias)
    elif method == "fused" and query.dtype == torch.float32 and dropout == 0.0:
        # one call: the output and the masses from the same kernel
        out, masses = augmented_call(module, query, key, value, attention_mask, causal, scale, bias,
                                     (visual, system), **kwargs)
    else:
        if bias is None:
            out, _ = _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                           is_causal=causal, **kwargs)
        else:
            out, _ = augmented_call(module, query, key, value, attention_mask, causal, scale, bias, dropout=dropout,
                                    **kwargs)
        if method == "fused":  # a float32 statistics call beside the low-precision output call
            _, masses = augmented_call(module, query.float(), key.float(), None, attention_mask, causal, scale, bias,
                                       (visual, system))
        else:
            masses = chunked_masses(query, key, attention_mask, causal, visual, system, qmask, scale,
                                    ctx.chunk_size, bias)
    mass_v, mass_s = masses
    keep = qmask[:, None, :]
    zero = mass_v.new_zeros(())
    # where, not a product: rows of left padding can be fully masked (NaN in some kernels)
    ctx.record(layer_idx, torch.where(keep, mass_v, zero), torch.where(keep, mass_s, zero))
    return out, None


def resolve_method(method: str, query: torch.Tensor, key: torch.Tensor) -> str:
    """The method a call runs: ``method`` unless "auto", which picks by device, dtype and grad
    from ``AUTO`` (measured, see the module docstring)."""
    if method != "auto":
        return method
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
    dtype = "float32" if query.dtype in (torch.float32, torch.float64) else "half"
    return AUTO.get((query.device.type, dtype, grad), "fused")


# ----------------------------------------------------------------------------- fused
def augmented_call(module, query: torch.Tensor, key: torch.Tensor, value: Optional[torch.Tensor],
                   mask: Optional[torch.Tensor], causal: bool, scale: float, bias: Optional[torch.Tensor] = None,
                   indicators: Optional[tuple[torch.Tensor, torch.Tensor]] = None, dropout: float = 0.0,
                   **kwargs) -> tuple[Optional[torch.Tensor], Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """One SDPA call with extra columns, the attention mask left as it is (``is_causal`` and the
    fast kernels stay on; no [T, T] float mask is built):

    * key bias ``b`` ``[B, Tk]``: q gets a column of ones and k a column ``b / scale``, so every
      logit becomes ``scale·q·k + b_j`` (``scale`` is passed explicitly; the intervention);
    * indicators ``(1_V, 1_S)`` ``[B, Tk]``: two value columns, so the matching output columns
      are the masses ``softmax(z) @ 1_V`` and ``softmax(z) @ 1_S`` (the statistics).

    q, k and v are zero-padded to one head width (the fused CPU/GPU kernels want equal widths).
    Returns (output ``[B, Tq, H, Dv]`` or None when ``value`` is None, (mass_v, mass_s)
    ``[B, H, Tq]`` or None)."""
    batch, _, _, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    v_dim = 0 if value is None else value.shape[-1]
    n_ind = 0 if indicators is None else 2
    width = max(head_dim + (bias is not None), v_dim + n_ind)
    if query.device.type == "cuda":
        width += -width % 8  # flash / memory-efficient kernels want head dims in multiples of 8
    q_parts, k_parts, v_parts = [query], [key], [] if value is None else [value]
    if bias is not None:
        q_parts.append(query.new_ones(query.shape[:-1] + (1,)))
        k_parts.append((bias / scale).to(key.dtype)[:, None, :, None].expand(batch, kv_heads, kv_len, 1))
    if indicators is not None:
        v_parts.append(torch.stack(indicators, dim=-1).to(key.dtype)[:, None].expand(batch, kv_heads, kv_len, 2))
    q, k, v = (_padded(parts, width) for parts in (q_parts, k_parts, v_parts))
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(query.dtype)
    out, _ = _sdpa(module, q, k, v, mask, dropout=dropout, scaling=scale, is_causal=causal, **kwargs)
    # out: [B, Tq, H, width]
    output = None if value is None else out[..., :v_dim].contiguous()
    masses = None if indicators is None else (out[..., v_dim].transpose(1, 2), out[..., v_dim + 1].transpose(1, 2))
    return output, masses


def _padded(parts: list[torch.Tensor], width: int) -> torch.Tensor:
    """``parts`` concatenated on the last dim and zero-padded to ``width`` columns."""
    have = sum(p.shape[-1] for p in parts)
    if have < width:
        parts = parts + [parts[0].new_zeros(parts[0].shape[:-1] + (width - have,))]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


# ----------------------------------------------------------------------------- chunked
def _chunk_masses(q: torch.Tensor, k: torch.Tensor, rows_mask: Optional[torch.Tensor], cols: torch.Tensor,
                  ind: torch.Tensor, scale: float, bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Masses of one chunk of query rows. q ``[B, H, c, D]``, k ``[B, Hkv, Tk, D]`` (float32);
    ``rows_mask``: bool (allowed) or float (additive) ``[B|1, 1, c, Tk]`` or None; ``cols``
    the V ∪ S key positions (< Tk) and ``ind`` their indicator columns ``[B, 1, |cols|, 2]``;
    ``bias`` the intervention's key bias ``[B, 1, 1, Tk]`` or None.

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
    if bias is not None:
        z = z.add_(bias)
    lse_all = torch.logsumexp(z, dim=-1, keepdim=True)
    probs = torch.exp(z.index_select(-1, cols) - lse_all)  # [B, H, c, |V ∪ S|]
    masses = torch.matmul(probs, ind)  # [B, H, c, 2]
    return masses[..., 0], masses[..., 1]


def chunked_masses(query: torch.Tensor, key: torch.Tensor, mask: Optional[torch.Tensor], causal: bool,
                   visual: torch.Tensor, system: torch.Tensor, qmask: torch.Tensor, scale: float,
                   chunk_size: int, bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
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
        fn = partial(_chunk_masses, rows_mask=rows_mask, cols=cols[:n_cols], ind=ind[:, :, :n_cols], scale=scale,
                     bias=None if bias is None else bias[:, None, None, :width].float())
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
