"""The ``lse`` statistics method: the masses of the query rows from the attention kernel's own
log-sum-exp, so that a statistics layer costs about one attention call in the model's dtype.

For query row i and key set K the mass is ``m_K(i) = sum_{j in K} exp(z_ij - LSE_i)`` with
``z_ij = scale·q_i·k_j + b_j`` (b: the intervention's key bias) and ``LSE_i`` over every key row i
sees. The output call (``lse_attention``: the CPU flash kernel, or on CUDA the flash /
memory-efficient kernel) returns ``LSE_i`` in float32 beside the output, in the model's dtype;
the masses then need ``q_i·k_j`` only for the rows of Q and the columns of V ∪ S, in float32
from the model's own q and k (``lse_masses``, chunks of rows; extra memory about chunk x T
per head, forward and backward). The key bias enters both identically: the kernel adds it as
one more q/k column (as ``kernel.augmented_call``), and the masses add the very value the
kernel adds (the column rounded to the model's dtype, times ``scale``).

Gradient (AGTO): ``LSE`` is not differentiable through the kernel, so ``_Masses`` has its own
backward. With upstream ``g_iK`` and ``c_i = sum_K g_iK m_K(i)``,

    dL/dz_ij = p_ij (sum_K g_iK 1[j in K] - c_i),   p_ij = exp(z_ij - LSE_i),

over every key row i sees (the ``-c_i`` term is LSE's gradient), so the backward recomputes
``z`` for the rows of Q against the keys (causal: up to the chunk's last row), chunk by chunk
in float32: three |Q| x T x D products per head, no T x T tensor, nothing stored from the
forward but q, k, LSE and the masses. Exact: gradcheck in float64 (tests/test_attention_lse.py).
Measured, it is not cheaper than backpropagating through the fused call (one statistics layer
at Qwen2.5-VL-3B widths, T = 4096, with grad: bf16 2.89x a plain SDPA call vs fused 2.32x,
fp32 1.75x vs 1.12x; ``kernel``'s docstring), so the automatic choice keeps ``fused`` for
grad and takes ``lse`` for the bf16 forward without grad.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

OFF_ROW = 1e30  # LSE of a row outside its batch row's Q: exp(z - 1e30) = 0, finite arithmetic


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    return x if x.shape[-1] == width else torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def _kernel_mask(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """transformers' mask as the kernels take it: additive, in the query's dtype (a boolean mask
    becomes 0 / -inf, as ``F.scaled_dot_product_attention`` converts it)."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def lse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor],
                  causal: bool, scale: float, bias: Optional[torch.Tensor] = None, dropout: float = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """One attention call in the inputs' dtype that also returns each row's log-sum-exp.

    query ``[B, H, Tq, D]``, key/value ``[B, Hkv, Tk, D]``, ``mask`` transformers' (bool or
    additive ``[B|1, 1, Tq, Tk]``, or None with ``causal`` for is_causal), ``bias`` the key bias
    ``[B, Tk]`` float32 or None. Returns (output ``[B, Tq, H, Dv]``, LSE ``[B, H, Tq]`` float32,
    the bias exactly as the kernel added it ``[B, Tk]`` float32 or None). ``dropout`` acts on
    the output only: LSE, hence the masses, are those of the softmax before dropout."""
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len, v_dim = key.shape[1], key.shape[2], value.shape[-1]
    q, k, v = query, key, value
    if bias is not None:  # one more q/k column: scale·[q, 1]·[k, b/scale] = scale·q·k + b
        column = (bias.to(_compute_dtype(key)) / scale).to(key.dtype)
        q = torch.cat([q, q.new_ones(q.shape[:-1] + (1,))], dim=-1)
        k = torch.cat([k, column[:, None, :, None].expand(batch, kv_heads, kv_len, 1)], dim=-1)
        bias = column.to(_compute_dtype(column)) * scale
    width = max(q.shape[-1], v_dim)
    if query.device.type == "cuda":
        width += -width % 8  # the CUDA kernels want head dims in multiples of 8
    q, k, v = _pad(q, width), _pad(k, width), _pad(v, width)
    is_causal = causal and mask is None and q_len > 1
    if is_causal and q_len != kv_len:
        raise ValueError(f"lse_attention: is_causal with {q_len} queries and {kv_len} keys (a KV cache)")
    amask = _kernel_mask(mask, q.dtype)
    if query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout, is_causal,
                                                                             attn_mask=amask, scale=scale)
    else:
        out, lse = _cuda_lse_attention(q, k, v, amask, is_causal, scale, heads // kv_heads, dropout)
    return out[..., :v_dim].transpose(1, 2).contiguous(), lse[..., :q_len].to(_compute_dtype(lse)), bias


def _cuda_lse_attention(q, k, v, amask, is_causal, scale, groups, dropout):
    """Flash (no mask, half precision) or memory-efficient SDPA kernel with its log-sum-exp.
    Not yet run on a GPU (bench/gpu_check.sh checks it against ``chunked``)."""
    if groups > 1:
        k, v = (x.repeat_interleave(groups, dim=1) for x in (k, v))
    if amask is None and q.dtype in (torch.float16, torch.bfloat16):
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout, is_causal, False, scale=scale)
        return res[0], res[1]
    if amask is not None:  # the kernel wants [B, H, Tq, Tk] with the last dim's rows 16-byte aligned
        kv_len = k.shape[2]
        pad = -kv_len % 16
        amask = torch.nn.functional.pad(amask.expand(q.shape[0], q.shape[1], q.shape[2], kv_len), (0, pad))
        amask = amask[..., :kv_len]
    res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, amask, True, dropout, is_causal, scale=scale)
    return res[0], res[1]


# ----------------------------------------------------------------------------- masses
@dataclass
class _Plan:
    """What the masses' forward and backward share besides tensors with gradients: the rows of
    Q (``rows``, ascending) and the V ∪ S columns (``cols``, ascending), their indicators, the
    mask and the key bias. Rows outside a batch row's Q carry LSE = +inf (mass 0, no NaN)."""

    rows: torch.Tensor  # [n]
    cols: torch.Tensor  # [m]
    ind: torch.Tensor  # [B, 1, m, 2] float: 1_V, 1_S at cols
    mask: Optional[torch.Tensor]  # transformers' mask [B|1, 1, Tq, Tk] or None
    causal: bool  # is_causal without a mask: the causal mask is built here
    crop: bool  # a causal full pass (query i is key i): row i sees no key after i
    bias: Optional[torch.Tensor]  # [B, Tk] float32, as the kernel added it
    scale: float
    chunk: int
    kv_len: int

    def chunks(self, forward: bool = False) -> list[slice]:
        """Slices of ``rows``: ``chunk`` rows (x every key, the backward), or in the forward
        as many rows x |V ∪ S| columns as that many elements (fewer, larger products)."""
        n = self.rows.numel()
        size = max(self.chunk, self.chunk * self.kv_len // self.cols.numel()) if forward else self.chunk
        return [slice(s, min(s + size, n)) for s in range(0, n, size)]

    def width(self, sl: slice) -> int:
        """Keys the chunk's rows can see: up to its last row in a causal full pass."""
        return int(self.rows[sl.stop - 1]) + 1 if self.crop else self.kv_len

    def visible(self, sl: slice, keys: torch.Tensor) -> Optional[torch.Tensor]:
        """Which ``keys`` the chunk's rows see: bool (or transformers' additive float) mask
        ``[B|1, 1, c, |keys|]``, or None where they see them all (Q = R: V and S precede it)."""
        rows = self.rows[sl]
        if self.mask is not None:
            return self.mask.index_select(2, rows).index_select(3, keys)
        if self.causal and int(keys[-1]) > int(rows[0]):
            return (keys[None, :] <= rows[:, None])[None, None]
        return None

    def keys_aug(self, k: torch.Tensor, keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[k, b_j, 1]`` at ``keys`` ``[B, Hkv, |keys|, D + 1|2]``: one product with ``rows_aug``
        gives ``z - LSE`` (no pass over the logits for the bias, the scale or LSE)."""
        batch, kv_heads, n, _ = k.shape
        parts = [k.to(dtype)]
        if self.bias is not None:
            parts.append(self.bias.index_select(1, keys).to(dtype)[:, None, :, None].expand(batch, kv_heads, n, 1))
        parts.append(k.new_ones((batch, kv_heads, n, 1), dtype=dtype))
        return torch.cat(parts, dim=-1)

    def rows_aug(self, q: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[scale·q, 1, -LSE]`` of a chunk of rows ``[B, H, c, D + 1|2]``."""
        parts = [q.to(dtype) * self.scale]
        if self.bias is not None:
            parts.append(q.new_ones(q.shape[:-1] + (1,), dtype=dtype))
        parts.append(-lse.to(dtype)[..., None])
        return torch.cat(parts, dim=-1)

    def probs(self, q_aug: torch.Tensor, k_aug: torch.Tensor, sl: slice, keys: torch.Tensor) -> torch.Tensor:
        """``exp(z - LSE)`` ``[B, H, c, |keys|]`` of the chunk's rows at ``keys``, from ``rows_aug``
        ``[B, H, c, D']`` and ``keys_aug`` ``[B, Hkv, |keys|, D']``."""
        batch, heads, c, dim = q_aug.shape
        kv_heads = k_aug.shape[1]
        # GQA: head h reads kv head h // groups (transformers' repeat_kv)
        z = torch.matmul(q_aug.reshape(batch, kv_heads, -1, dim), k_aug.transpose(-1, -2)).view(batch, heads, c, -1)
        seen = self.visible(sl, keys)
        if seen is not None:
            z = z.masked_fill_(~seen, float("-inf")) if seen.dtype == torch.bool else z.add_(seen.to(z.dtype))
        return z.exp_()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for gradcheck


class _Masses(torch.autograd.Function):
    """(q of the rows of Q ``[B, H, n, D]``, k ``[B, Hkv, Tk, D]``, LSE ``[B, H, n]``) -> masses
    ``[B, H, n, 2]`` (V, S); differentiable in q and k, LSE's own dependence on them included."""

    @staticmethod
    def forward(fctx, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, plan: _Plan) -> torch.Tensor:
        dtype = _compute_dtype(q)
        k_cols = plan.keys_aug(k.index_select(2, plan.cols), plan.cols, dtype)
        ind = plan.ind.to(dtype)
        parts = [torch.matmul(plan.probs(plan.rows_aug(q[:, :, sl], lse[:, :, sl], dtype), k_cols, sl, plan.cols), ind)
                 for sl in plan.chunks(forward=True)]
        masses = torch.cat(parts, dim=2)
        fctx.save_for_backward(q, k, lse, masses)
        fctx.plan = plan
        return masses

    @staticmethod
    def backward(fctx, grad: torch.Tensor):
        q, k, lse, masses = fctx.saved_tensors
        plan: _Plan = fctx.plan
        dtype = _compute_dtype(q)
        grad = grad.to(dtype)
        batch, heads, _, dim = q.shape
        kv_heads = k.shape[1]
        k32 = k.to(dtype)
        k_aug = plan.keys_aug(k, torch.arange(plan.kv_len, device=k.device), dtype)
        dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
        dk = torch.zeros(k.shape, dtype=dtype, device=k.device)
        c_all = (grad * masses.to(dtype)).sum(-1, keepdim=True)  # [B, H, n, 1]
        for sl in plan.chunks():
            width = plan.width(sl)
            qc = q[:, :, sl].to(dtype)
            p = plan.probs(plan.rows_aug(qc, lse[:, :, sl], dtype), k_aug[:, :, :width], sl,
                           torch.arange(width, device=q.device))  # [B, H, c, width]
            n_cols = int(torch.searchsorted(plan.cols, width))
            cols = plan.cols[:n_cols]
            on_cols = torch.matmul(grad[:, :, sl], plan.ind[:, :, :n_cols].to(dtype).transpose(-1, -2))  # [B, H, c, m]
            on_cols = p.index_select(-1, cols).mul_(on_cols)
            dz = p.mul_(-c_all[:, :, sl]).index_add_(-1, cols, on_cols)  # p (1_K·g - c)
            dz = dz.mul_(plan.scale).reshape(batch, kv_heads, -1, width)
            c = qc.shape[2]
            dq[:, :, sl] = torch.matmul(dz, k32[:, :, :width]).view(batch, heads, c, dim)
            dk[:, :, :width] += torch.matmul(dz.transpose(-1, -2), qc.reshape(batch, kv_heads, -1, dim))
        return dq.to(q.dtype), dk.to(k.dtype), None, None


def lse_masses(query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor, mask: Optional[torch.Tensor], causal: bool,
               visual: torch.Tensor, system: torch.Tensor, qmask: torch.Tensor, scale: float, chunk_size: int,
               bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The V and S masses ``[B, H, Tq]`` (float32, or float64 for float64 inputs; zero outside
    Q) of the query rows from the row log-sum-exps ``lse`` ``[B, H, Tq]`` of ``lse_attention``,
    the same ``mask``/``causal`` and the kernel's ``bias``."""
    batch, heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    out_dtype = _compute_dtype(query)
    mass_v = torch.zeros((batch, heads, q_len), dtype=out_dtype, device=query.device)
    mass_s = torch.zeros_like(mass_v)
    rows = qmask.any(0).nonzero().flatten()
    cols = (visual | system).any(0).nonzero().flatten()
    if rows.numel() == 0 or cols.numel() == 0:  # zeros, still on the graph (AGTO's losses backpropagate)
        anchor = query.reshape(-1)[:1].to(out_dtype).sum() * 0.0
        return mass_v + anchor, mass_s + anchor
    plan = _Plan(rows=rows, cols=cols, ind=torch.stack([visual, system], dim=-1).index_select(1, cols).to(out_dtype)[:, None],
                 mask=mask, causal=causal and mask is None and q_len > 1, crop=causal and q_len == kv_len, bias=bias,
                 scale=scale, chunk=chunk_size, kv_len=kv_len)
    keep = qmask.index_select(1, rows)[:, None, :]  # [B, 1, n]
    # rows outside a batch row's Q (other rows' Q, padding): a huge LSE gives mass 0, never NaN
    lse_rows = torch.where(keep, lse.index_select(2, rows), torch.tensor(OFF_ROW, dtype=lse.dtype, device=lse.device))
    masses = _Masses.apply(query.index_select(2, rows), key, lse_rows.detach(), plan)
    return mass_v.index_copy(2, rows, masses[..., 0]), mass_s.index_copy(2, rows, masses[..., 1])
