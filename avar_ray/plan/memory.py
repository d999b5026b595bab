"""Per-GPU (or per-process) memory of each role, itemised, from a ``ModelSpec`` and the run's
settings: pure arithmetic, no torch. Bytes everywhere; ``GIB`` converts.

Activations are what autograd keeps for the backward, counted tensor by tensor for the HF
Qwen2/Qwen2.5/Qwen3 decoder layer under SDPA (``saved_per_token``), and calibrated against
measured peaks (``bench/plan_calibration.py``, ``bench/results/plan.md``): the CPU learner
update and SFT step on the tiny model and on a 2-layer model at Qwen2.5-VL-3B widths, and the
H200 figures of ``bench/results/gpu_check.md``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from avar_ray.plan.model_spec import ModelSpec

GIB = 2 ** 30
F32 = 4
LOGPROB_CHUNK = 128  # actors.policy.LOGPROB_CHUNK (not imported: the plan imports no torch)
# DeepSpeed defaults the configs keep (deepspeed_config sets neither): gradient reduce bucket
# (elements) and, under ZeRO-3, the parameters gathered ahead of use.
REDUCE_BUCKET = 5e8
PREFETCH_BUCKET = 5e7
# vLLM's own use beside weights and KV cache: its profiling forward over max_num_batched_tokens,
# the sampler's logits for max_num_seqs rows, CUDA graphs and non-torch memory.
VLLM_BATCHED_TOKENS = 8192
VLLM_MAX_NUM_SEQS = 256  # vLLM's default; the configs do not set it
VLLM_FIXED = 1.0 * GIB
# A CPU process's own growth in a step (malloc arenas, the autograd graph): measured on the tiny model.
CPU_RUNTIME = 24 * 2 ** 20


def dtype_bytes(dtype: str) -> int:
    return 4 if dtype in ("float32", "auto_f32") else 2


def _norm(width: int, b: int) -> int:
    """RMSNorm under autograd: its float32 input and normalised rows, and the weight-multiplied
    output in the model dtype (kept by the next linear); in bf16 also the cast copy."""
    return (2 * F32 + (2 * b if b < F32 else b)) * width


def saved_per_token(spec: ModelSpec, b: int, repeat_kv: bool) -> int:
    """Bytes one decoder layer keeps per token for its backward: two norms; RoPE'd q and k, v,
    SDPA's output and o_proj's input copy; the MLP's gate, SiLU, up and product.
    ``repeat_kv``: k/v expanded to every head (transformers does so when the batch has a padding
    mask; without one SDPA reads the grouped heads)."""
    kv = spec.q_dim if repeat_kv else spec.kv_dim
    return 2 * _norm(spec.hidden, b) + b * (3 * spec.q_dim + 2 * kv + 4 * spec.intermediate)


def vision_saved_per_patch(spec: ModelSpec, b: int) -> int:
    """One vision block's saved bytes per patch (full multi-head attention; SwiGLU or GELU MLP)."""
    hv = spec.v_hidden
    mlp = (4 if spec.v_mlp_mats == 3 else 2) * spec.v_intermediate
    return 2 * _norm(hv, b) + b * (5 * hv + mlp)


@dataclass
class Batch:
    """One forward's shape: rows, padded tokens in all, distinct images and their LM tokens."""

    rows: int
    tokens: int
    images: int
    image_tokens: int


def update_phase(spec: ModelSpec, batch: Batch, b: int, *, checkpointing: bool, vision_trainable: bool,
                 cpu: bool = False, head_kept: Optional[dict] = None, head_backward: float = 0.0,
                 stats: tuple = (0.0, 0.0), head_uses: int = 2) -> dict:
    """A forward with grad and its backward, itemised; ``_peak`` is what is kept from the forward
    until the backward plus the larger of the backward's two moments (measured on CPU: the sum
    overstates checkpointed runs, bench/results/plan.md):

    * a layer's backward: its recomputed activations under checkpointing, the MLP's four [T, I]
      gradients and the hidden states', and the statistics' transient (``stats[1]``);
    * the head's backward: ``head_backward`` (the loss's [T, V] gradients), or later the LM
      head's weight gradient, which autograd sums over the head's ``head_uses`` (log-prob
      chunks, a tied embedding) before it reaches ``.grad`` or ZeRO: two [V, H] tensors at once.

    ``head_kept``: what the head keeps for its backward (SFT: the logits and log-softmax);
    ``stats[0]``: what the statistics keep for it."""
    per_layer = saved_per_token(spec, b, repeat_kv=batch.rows > 1) * batch.tokens
    hidden = b * spec.hidden * batch.tokens
    kept = {"activations (kept)": (spec.layers * hidden if checkpointing else spec.layers * per_layer) + 3 * hidden}
    layer = b * batch.tokens * (4 * spec.intermediate + 4 * spec.hidden) + (per_layer if checkpointing else 0)
    if spec.v_layers and batch.images and vision_trainable:
        patches = batch.images * batch.image_tokens * spec.v_merge ** 2
        block = vision_saved_per_patch(spec, b) * patches
        kept["vision activations (kept)"] = spec.v_layers * (b * spec.v_hidden * patches if checkpointing else block)
        layer = max(layer, block) if checkpointing else layer
    if stats[0]:
        kept["attention statistics (kept)"] = stats[0]
    kept.update(head_kept or {})
    if cpu:
        kept["runtime (CPU)"] = CPU_RUNTIME
    head = max(head_backward, min(head_uses, 2) * b * spec.vocab * spec.hidden)
    out = {**kept, "layer backward (transient)": layer + stats[1], "head backward (transient)": head}
    out["_peak"] = sum(kept.values()) + max(layer + stats[1], head)
    return out


def learner_update(spec: ModelSpec, batch: Batch, b: int, *, checkpointing: bool, vision_trainable: bool,
                   cpu: bool = False) -> dict:
    """The RL learner's update of one micro-batch (``actors.policy.forward_logprobs`` with grad)."""
    return update_phase(spec, batch, b, checkpointing=checkpointing, vision_trainable=vision_trainable, cpu=cpu,
                        head_backward=logprob_chunk(spec, b, grad=True))


def sft_update(spec: ModelSpec, batch: Batch, b: int, *, checkpointing: bool, vision_trainable: bool, cuda: bool,
               chunk_size, stats_layers: int, cpu: bool = False) -> dict:
    """SFT's micro-step (``avar_ray.sft.loop``): the HF loss over full logits and AGTO's
    statistics, both with grad."""
    stats = stats_with_grad(spec, batch, b, checkpointing=checkpointing, chunk_size=chunk_size,
                            stats_layers=stats_layers, cuda=cuda)
    return update_phase(spec, batch, b, checkpointing=checkpointing, vision_trainable=vision_trainable, cpu=cpu,
                        head_kept=lm_head_kept(spec, batch.tokens, b), head_backward=lm_head_backward(spec, batch.tokens),
                        stats=stats, head_uses=2 if spec.tied else 1)


def no_grad_forward(spec: ModelSpec, batch: Batch, b: int) -> int:
    """One layer's largest moment without grad (the MLP: SiLU(gate), up and their product) and
    the residual stream: everything else is freed as soon as it is used."""
    return b * batch.tokens * (3 * spec.intermediate + 3 * spec.hidden)


def no_grad_peak(spec: ModelSpec, batch: Batch, b: int, stats: float, head: float) -> float:
    """A no-grad forward's peak: inside a layer (with the statistics' extra), or at the end
    (the last hidden states and the head's output: full logits, or one log-prob chunk)."""
    return max(no_grad_forward(spec, batch, b) + stats, 2 * b * spec.hidden * batch.tokens + head)


def _stats_terms(spec: ModelSpec, batch: Batch, b: int, chunk_size, cuda: bool) -> tuple[float, float]:
    """(float32 q, k and indicator values: O(T); the score tensor the kernel materialises)."""
    rows, length = batch.rows, max(1, batch.tokens // max(batch.rows, 1))
    linear = F32 * (spec.q_dim + 2 * spec.kv_dim) * batch.tokens
    if chunk_size:
        return linear, 3 * F32 * spec.heads * min(chunk_size, length) * length * rows
    if b == F32 or not cuda:
        return linear, 0.0
    return linear, F32 * spec.heads * length * length * rows


def stats_extra(spec: ModelSpec, batch: Batch, b: int, *, chunk_size, cuda: bool) -> float:
    """The attention statistics' memory above plain SDPA in a forward without grad
    (``avar_ray.attention.kernel``; on CUDA the default method ``auto`` is ``fused``).

    fused, float32 model: one SDPA call with q/k/v padded by two columns: O(T). fused, bf16:
    a second, float32 call; with GQA on CUDA that call runs PyTorch's math kernel (the H200
    measurement: +1.4 GiB at T=4096 and 16 heads, bench/results/gpu_check.md), which holds the
    [H, T, T] float32 scores twice. chunked: chunk x T scores per head (three tensors)."""
    linear, scores = _stats_terms(spec, batch, b, chunk_size, cuda)
    return linear + (scores if chunk_size else 2 * scores)


def stats_with_grad(spec: ModelSpec, batch: Batch, b: int, *, checkpointing: bool, chunk_size, stats_layers: int,
                    cuda: bool) -> tuple[float, float]:
    """(kept until the backward, transient) of the statistics under autograd (SFT's AGTO): the
    math kernel keeps each statistics layer's [H, T, T] softmax, the fused float32 call its
    padded q, k, v, unless checkpointing recomputes them one layer at a time; the chunked
    method checkpoints its chunks."""
    linear, scores = _stats_terms(spec, batch, b, chunk_size, cuda)
    transient = stats_extra(spec, batch, b, chunk_size=chunk_size, cuda=cuda)
    if checkpointing:
        return 0.0, transient
    return stats_layers * (linear + (0.0 if chunk_size else scores)), transient


def logprob_chunk(spec: ModelSpec, b: int, grad: bool) -> int:
    """``actors.policy.hidden_logprobs``: a [128, V] float32 logits chunk and its logsumexp
    (the entropy metric's softmax beside it); under grad recomputed with its gradient."""
    return (b + (5 if grad else 3) * F32) * LOGPROB_CHUNK * spec.vocab


def lm_head_kept(spec: ModelSpec, tokens: int, b: int) -> dict:
    """SFT's HF loss over full logits, kept until the backward: the logits (the model output
    holds them) and the float32 log-softmax the cross-entropy saves."""
    return {"LM logits (kept)": b * tokens * spec.vocab, "log-softmax (kept)": F32 * tokens * spec.vocab}


def lm_head_backward(spec: ModelSpec, tokens: int) -> float:
    """The cross-entropy's backward: two [T, V] float32 gradients."""
    return 2 * F32 * tokens * spec.vocab


def training_states(params: int, trainable: int, zero_stage: int, world: int, b: int) -> dict:
    """Weights, gradients and AdamW states per rank under DeepSpeed ZeRO (mixed precision keeps
    float32 master weights beside the two moments: 12 bytes a parameter; float32: 8)."""
    optim = (12 if b < F32 else 8) * trainable
    return {"parameters": b * params / (world if zero_stage >= 3 else 1),
            "gradients": b * trainable / (world if zero_stage >= 2 else 1),
            "optimizer states": optim / (world if zero_stage >= 1 else 1)}


def zero_buffers(spec: ModelSpec, zero_stage: int, b: int) -> int:
    """DeepSpeed's working buffers: the gradient reduce bucket; under ZeRO-3 also the largest
    gathered tensor (the embedding / LM head) and the prefetched parameters."""
    buffers = REDUCE_BUCKET * b if zero_stage >= 1 else 0
    if zero_stage >= 3:
        buffers += b * max(spec.vocab * spec.hidden, 2 * spec.layer_params()) + b * PREFETCH_BUCKET
    return buffers


def vllm_engine(spec: ModelSpec, gpu_bytes: float, utilization: float, tp: int, b: int, max_model_len: int) -> dict:
    """One engine's per-GPU memory: weights per tensor-parallel shard, vLLM's own use, and the KV
    cache ``gpu_memory_utilization`` leaves; ``sequences``: full-length sequences it holds."""
    weights = b * spec.params() / tp
    own = VLLM_FIXED + (VLLM_BATCHED_TOKENS * (4 * spec.hidden + 2 * spec.intermediate // tp) * b
                        + VLLM_MAX_NUM_SEQS * spec.vocab * F32 / tp)
    kv = utilization * gpu_bytes - weights - own
    per_token = spec.kv_bytes_per_token(b) / min(tp, spec.kv_heads)
    return {"weights (TP shard)": weights, "vLLM activations + graphs": own, "KV cache": max(kv, 0.0),
            "_kv_raw": kv, "_sequences": kv / (per_token * max_model_len)}
