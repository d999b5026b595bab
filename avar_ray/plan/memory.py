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


def activations(spec: ModelSpec, batch: Batch, b: int, checkpointing: bool, vision_trainable: bool,
                cpu: bool = False) -> dict:
    """What a forward with grad keeps until its backward, and the backward's own working set."""
    per_layer = saved_per_token(spec, b, repeat_kv=batch.rows > 1) * batch.tokens
    hidden = b * spec.hidden * batch.tokens
    if checkpointing:  # each layer keeps its input; the backward recomputes one layer at a time
        text = spec.layers * hidden + per_layer
    else:
        text = spec.layers * per_layer
    text += 3 * hidden  # the last hidden states, their gradient, the residual stream's
    out = {"activations": text,
           # a layer's backward: the MLP's four [T, I] gradients and the hidden states' (measured on CPU)
           "backward working set": b * batch.tokens * (4 * spec.intermediate + 4 * spec.hidden),
           # autograd computes a weight's whole gradient before adding it to .grad (or before ZeRO
           # reduces it): the largest, the embedding / LM head, once
           "largest weight gradient": b * spec.vocab * spec.hidden}
    if cpu:
        out["runtime (CPU)"] = CPU_RUNTIME
    if spec.v_layers and batch.images and vision_trainable:
        patches = batch.images * batch.image_tokens * spec.v_merge ** 2
        block = vision_saved_per_patch(spec, b) * patches
        out["vision activations"] = (spec.v_layers * b * spec.v_hidden * patches + block if checkpointing
                                     else spec.v_layers * block)
    return out


def no_grad_forward(spec: ModelSpec, batch: Batch, b: int) -> int:
    """One layer's largest moment without grad (the MLP: SiLU(gate), up and their product) and
    the residual stream: everything else is freed as soon as it is used."""
    return b * batch.tokens * (3 * spec.intermediate + 3 * spec.hidden)


def no_grad_peak(spec: ModelSpec, batch: Batch, b: int, stats: float, head: float) -> float:
    """A no-grad forward's peak: inside a layer (with the statistics' extra), or at the end
    (the last hidden states and the head's output: full logits, or one log-prob chunk)."""
    return max(no_grad_forward(spec, batch, b) + stats, 2 * b * spec.hidden * batch.tokens + head)


def stats_extra(spec: ModelSpec, batch: Batch, b: int, *, grad: bool, chunk_size, stats_layers: int,
                cuda: bool) -> int:
    """The attention statistics' memory above plain SDPA (``avar_ray.attention.kernel``).

    fused, float32 model: one SDPA call with q/k/v padded by two columns: O(T). fused, bf16:
    a second, float32 call; with GQA on CUDA that call runs PyTorch's math kernel (the H200
    measurement: +1.4 GiB at T=4096 and 16 heads, bench/results/gpu_check.md), which holds the
    [H, T, T] float32 scores twice, and under autograd keeps the softmax for every statistics
    layer. chunked: chunk x T scores per head, checkpointed."""
    rows, length = batch.rows, max(1, batch.tokens // max(batch.rows, 1))
    linear = F32 * (spec.q_dim + 2 * spec.kv_dim) * batch.tokens  # float32 q, k and the indicator values
    if chunk_size:
        return linear + 3 * F32 * spec.heads * min(chunk_size, length) * length * rows
    if b == F32 or not cuda:
        return linear * (stats_layers if grad else 1)
    square = F32 * spec.heads * length * length * rows
    return linear + 2 * square + (square * (stats_layers - 1) if grad else 0)


def logprob_chunk(spec: ModelSpec, b: int, grad: bool) -> int:
    """``actors.policy.hidden_logprobs``: a [128, V] float32 logits chunk and its logsumexp
    (the entropy metric's softmax beside it); under grad recomputed with its gradient."""
    return (b + (5 if grad else 3) * F32) * LOGPROB_CHUNK * spec.vocab


def lm_loss(spec: ModelSpec, tokens: int, b: int) -> int:
    """SFT's HF loss over full logits: the logits (kept by the model output), their float32 copy
    and log-softmax, and the backward's two [T, V] float32 gradients."""
    return (b + (F32 if b < F32 else 0) + 3 * F32) * tokens * spec.vocab


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
