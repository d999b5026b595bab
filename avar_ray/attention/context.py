"""How a caller asks the ``avar`` attention for statistics and/or the intervention, for one
forward pass (or one ``generate`` call), and what it gets back.

    ctx = AttentionContext.from_spans(encoded.spans, query="response", intervention=Intervention.configured())
    out = model(**encoded.inputs, avar_context=ctx)     # the kwarg reaches every attention call
    stats = ctx.stats()                                  # AttentionStats, [B, L, H, T] masses

or simply ``attention_statistics(model, encoded, query="response", ...)``. Without an
``avar_context`` the ``avar`` attention is plain SDPA. Where the caller cannot add a keyword
(``model.generate`` rejects unknown model kwargs; a trainer calling ``model(**batch)``),
``with use_context(model, ctx): ...`` injects it into every forward call of ``model``.

The training-free intervention (``Intervention``, SPEC.md §2)

    A' = A ⊙ (1 + a_img·M_V − a_sys·M_S),   rows renormalised

is exactly an additive key bias of ``log(1 + a_img)`` on the visual keys V and
``log(1 − a_sys)`` on the system keys S (softmax(z + b) ∝ A·e^b), so it runs inside SDPA-style
kernels (as an extra q/k column, see ``kernel.augmented_call``; no [T, T] mask) and never needs
eager attention maps. The bias is applied in the text decoder's layers (all, or a chosen
subset); the vision tower is untouched. Under ``generate`` tokens produced by ``generate`` are response tokens (never
V or S), so the bias covers the prompt keys and is zero on every key appended later (the KV
cache grows; the attention function pads the bias with zeros to the current key length).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal, Optional, Sequence

import torch

from avar_ray.config import InterventionConfig
from avar_ray.spans import QUERY_SPANS, Spans

Method = Literal["auto", "lse", "fused", "chunked"]
METHODS = ("auto", "lse", "fused", "chunked")
DEFAULT_CHUNK_SIZE = 256  # query rows per chunk when the chunked method is asked for without a size

@dataclass(frozen=True)
class Intervention:
    """Re-weighting strengths and the text layers they apply to (None = all layers). No
    defaults here: they live in ``config.InterventionConfig`` (``from_config``, ``configured``)."""

    a_img: float
    a_sys: float
    layers: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        if not self.a_sys < 1.0:
            raise ValueError(
                f"intervention a_sys must be < 1, got {self.a_sys}: the system keys are re-weighted by "
                "(1 - a_sys), so a_sys = 1 removes the system span entirely (key bias log(0) = -inf)")
        if not self.a_img > -1.0:
            raise ValueError(f"intervention a_img must be > -1, got {self.a_img}: the visual keys are re-weighted "
                             "by (1 + a_img), which must stay positive")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))

    @classmethod
    def from_config(cls, cfg) -> Optional["Intervention"]:
        """From ``avar_ray.config.InterventionConfig``; None when it is not enabled."""
        return cls.configured(cfg) if cfg.enabled else None

    @classmethod
    def configured(cls, cfg=None) -> "Intervention":
        """The re-weighting of an ``InterventionConfig`` whether enabled or not (None: the
        schema's defaults), e.g. for a request that turns it on."""
        cfg = InterventionConfig() if cfg is None else cfg
        return cls(a_img=cfg.a_img, a_sys=cfg.a_sys, layers=None if cfg.layers is None else tuple(cfg.layers))

    @property
    def visual_bias(self) -> float:
        return math.log1p(self.a_img)

    @property
    def system_bias(self) -> float:
        return math.log1p(-self.a_sys)

    def applies_to(self, layer_idx: int) -> bool:
        return self.layers is None or layer_idx in self.layers

    def key_bias(self, visual: torch.Tensor, system: torch.Tensor) -> torch.Tensor:
        """Additive bias per key position ``[B, T]`` (float32) from the V and S masks ``[B, T]``."""
        bias = torch.zeros(visual.shape, dtype=torch.float32, device=visual.device)
        bias = bias.masked_fill(visual.bool(), self.visual_bias)
        return bias.masked_fill(system.bool(), self.system_bias)

    def reweight(self, visual: torch.Tensor, system: torch.Tensor) -> torch.Tensor:
        """The multiplicative form ``1 + a_img·M_V − a_sys·M_S`` per key ``[B, T]`` (for references)."""
        return 1.0 + self.a_img * visual.float() - self.a_sys * system.float()


def validate_layers(layers: Optional[Sequence[int]], num_layers: int, what: str) -> Optional[tuple[int, ...]]:
    """Normalise a layer subset (negative indices count from the end); None = all layers."""
    if layers is None:
        return None
    out = []
    for i in layers:
        j = int(i) + num_layers if int(i) < 0 else int(i)
        if not 0 <= j < num_layers:
            raise ValueError(f"{what}: layer {i} out of range for a model with {num_layers} text layers")
        out.append(j)
    if not out:
        raise ValueError(f"{what}: the layer subset is empty (use None for all layers)")
    return tuple(sorted(set(out)))


# VAS = V/S mass ratio: without a system turn (Qwen3-VL's template adds no default one) S is
# empty and every ratio is x/0. Tools stop with this message instead of printing inf/NaN.
NO_SYSTEM_PROMPT = ("VAS needs a system prompt: set model.system_prompt (the chat template added no system turn, "
                    "so the system span S is empty and VAS = V/S is undefined; Qwen3-VL's template has no default "
                    "system prompt)")


class NoSystemPromptError(RuntimeError):
    """A VAS computation on a conversation without a system span: a setting to fix, not a bad
    row (a RuntimeError, so that per-row ``ValueError`` handlers do not swallow it)."""


def require_system_span(system: torch.Tensor, hint: str = "") -> None:
    """Raise ``NoSystemPromptError`` unless every row has a system span (``system``: the S mask
    ``[B, T]`` or the counts ``[B]``). ``hint`` names the tool's own option, if it has one."""
    counts = system.sum(-1) if system.dim() == 2 else system
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        rows = f" (rows {empty[:8]}{' ...' if len(empty) > 8 else ''} of {counts.numel()})"
        raise NoSystemPromptError(NO_SYSTEM_PROMPT + (f" or {hint}" if hint else "") + rows)


@dataclass
class AttentionStats:
    """Attention mass of the query span Q on the visual (V) and system (S) keys.

    ``mass_v[b, l, h, i] = sum_{j in V} A[l, h, i, j]`` for query positions i in Q (zero
    elsewhere), ``l`` running over ``layers`` (text-decoder layer indices, in order).
    """

    mass_v: torch.Tensor  # [B, L, H, T]
    mass_s: torch.Tensor  # [B, L, H, T]
    query_mask: torch.Tensor  # [B, T] bool: Q
    visual_count: torch.Tensor  # [B] |V| per row
    layers: list[int]
    system_count: torch.Tensor  # [B] |S| per row

    @property
    def query_count(self) -> torch.Tensor:
        return self.query_mask.sum(-1)

    def select_layers(self, layers: Sequence[int]) -> "AttentionStats":
        """A subset of the recorded layers (text-layer indices, which must have been recorded)."""
        missing = [i for i in layers if i not in self.layers]
        if missing:
            raise ValueError(f"layers {missing} were not recorded (recorded: {self.layers})")
        idx = [self.layers.index(i) for i in layers]
        return AttentionStats(self.mass_v[:, idx], self.mass_s[:, idx], self.query_mask, self.visual_count,
                              list(layers), self.system_count)

    def detach(self) -> "AttentionStats":
        return AttentionStats(self.mass_v.detach(), self.mass_s.detach(), self.query_mask, self.visual_count,
                              list(self.layers), self.system_count)

    def sample(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row ``b``'s masses at its query positions only: two ``[L, H, |Q_b|]`` tensors (the
        input of ``rewards.visual_ratio`` when Q = response)."""
        q = self.query_mask[b]
        return self.mass_v[b][..., q], self.mass_s[b][..., q]


class AttentionContext:
    """What one forward pass (or one ``generate`` call) asks of the ``avar`` attention.

    Key masks ``visual``/``system`` are ``[B, T]`` in the coordinates of the first forward's
    positions. ``query_mask`` (None = no statistics) selects Q; ``layers`` the text layers whose
    statistics are recorded (None = all). ``intervention`` adds its key bias in its own layers.
    ``method`` (``kernel`` and ``lse`` describe them): "lse" takes the masses from the output
    call's own log-sum-exp and float32 q·k over the V ∪ S columns of the rows of Q (chunks of
    ``chunk_size`` rows); "fused" from an SDPA call whose values are the V/S indicator columns;
    "chunked" computes ``exp(LSE_K - LSE_all)`` over chunks of query rows (``chunk_size``
    queries x all keys at a time); "auto" picks per call by device, dtype and grad
    (``kernel.AUTO``, measured). All are exact and differentiable. Left None, the method
    follows ``chunk_size`` (the ``attention.chunk_size`` config key): None = auto, N = chunked
    with N query rows per chunk.
    """

    def __init__(self, visual: torch.Tensor, system: torch.Tensor, query_mask: Optional[torch.Tensor] = None,
                 layers: Optional[Sequence[int]] = None, intervention: Optional[Intervention] = None,
                 method: Optional[Method] = None, chunk_size: Optional[int] = None,
                 num_layers: Optional[int] = None):
        if method is None:
            method = "auto" if chunk_size is None else "chunked"
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        if visual.shape != system.shape or visual.dim() != 2:
            raise ValueError(f"visual and system masks must both be [B, T]; got {tuple(visual.shape)}, {tuple(system.shape)}")
        if query_mask is not None and query_mask.shape != visual.shape:
            raise ValueError(f"query mask {tuple(query_mask.shape)} does not match the key masks {tuple(visual.shape)}")
        if num_layers is not None:
            layers = validate_layers(layers, num_layers, "statistics layers")
            if intervention is not None:
                validate_layers(intervention.layers, num_layers, "intervention layers")
        self.visual = visual.bool()
        self.system = system.bool()
        self.query_mask = None if query_mask is None else query_mask.bool()
        self.layers = None if layers is None else tuple(sorted(set(int(i) for i in layers)))
        self.intervention = intervention
        self.method = method
        self.chunk_size = int(chunk_size)
        self.num_layers = num_layers
        self.calls = 0  # text-layer attention calls that saw this context
        self._results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._bias = None if intervention is None else intervention.key_bias(self.visual, self.system)

    @classmethod
    def from_spans(cls, spans: Spans, query: Optional[str] = None, layers: Optional[Sequence[int]] = None,
                   intervention: Optional[Intervention] = None, method: Optional[Method] = None,
                   chunk_size: Optional[int] = None,
                   num_layers: Optional[int] = None) -> "AttentionContext":
        """From exact spans; ``query`` in ("user", "response", "user_visual") or None (no statistics)."""
        if query is not None and query not in QUERY_SPANS:
            raise ValueError(f"query must be one of {QUERY_SPANS}, got {query!r}")
        qmask = None if query is None else spans.query(query)
        return cls(spans.visual, spans.system, qmask, layers, intervention, method, chunk_size, num_layers)

    # ---------------------------------------------------------------- used by the kernel
    def wants_stats(self, layer_idx: int) -> bool:
        return self.query_mask is not None and (self.layers is None or layer_idx in self.layers)

    def _rows(self, mask: torch.Tensor, batch: int, length: int, fill) -> torch.Tensor:
        """A per-key row tensor ``[B, T]`` fitted to the current batch and key length."""
        if batch != mask.shape[0]:
            if batch % mask.shape[0]:
                raise ValueError(f"avar attention: batch {batch} does not match the context's {mask.shape[0]} rows")
            mask = mask.repeat_interleave(batch // mask.shape[0], dim=0)  # generate's expansion
        width = mask.shape[1]
        if length < width:
            raise ValueError(f"avar attention: {length} keys but the context describes {width} positions")
        if length > width:  # keys appended by generation: response tokens, neither V nor S
            mask = torch.cat([mask, torch.full((mask.shape[0], length - width), fill, dtype=mask.dtype,
                                               device=mask.device)], dim=1)
        return mask

    def key_bias(self, layer_idx: int, batch: int, kv_len: int, device) -> Optional[torch.Tensor]:
        if self._bias is None or not self.intervention.applies_to(layer_idx):
            return None
        return self._rows(self._bias, batch, kv_len, 0.0).to(device)

    def key_masks(self, batch: int, kv_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        return (self._rows(self.visual, batch, kv_len, False).to(device),
                self._rows(self.system, batch, kv_len, False).to(device))

    def queries(self, batch: int, q_len: int, device) -> torch.Tensor:
        if self.query_mask.shape != (batch, q_len):
            raise ValueError(
                f"attention statistics need one full forward pass over the encoded batch (no KV cache): the "
                f"query mask is {tuple(self.query_mask.shape)} but the layer sees {batch} x {q_len} queries")
        return self.query_mask.to(device)

    def record(self, layer_idx: int, mass_v: torch.Tensor, mass_s: torch.Tensor) -> None:
        # A recomputation inside the backward (gradient checkpointing) keeps the forward's masses,
        # which the loss used: the recomputed ones would hold the recomputed layer's graph (its
        # saved tensors: on CUDA the math kernel's [H, T, T] softmax) until the context goes,
        # every layer's by the end of the backward (measured: bench/plan_calibration.py).
        if layer_idx in self._results and torch._C._current_graph_task_id() != -1:
            return
        self._results[layer_idx] = (mass_v, mass_s)

    # ---------------------------------------------------------------- used by the caller
    def reset(self) -> None:
        self._results.clear()
        self.calls = 0

    def check_used(self) -> None:
        if self.calls == 0:
            raise RuntimeError("the model never called the avar attention with this context: load it with "
                               "attn_implementation='avar' (avar_ray.modeling.load_model does)")

    def stats(self) -> AttentionStats:
        if self.query_mask is None:
            raise RuntimeError("this context asked for no statistics (query=None)")
        self.check_used()
        if not self._results:
            raise RuntimeError("no attention statistics were recorded (layer subset outside the model?)")
        layers = sorted(self._results)
        if self.layers is not None and layers != list(self.layers):
            raise RuntimeError(f"statistics recorded for layers {layers}, asked for {list(self.layers)}")
        if self.num_layers is not None and self.layers is None and len(layers) != self.num_layers:
            raise RuntimeError(f"statistics recorded for {len(layers)} of {self.num_layers} layers")
        mass_v = torch.stack([self._results[i][0] for i in layers], dim=1)
        mass_s = torch.stack([self._results[i][1] for i in layers], dim=1)
        device = mass_v.device
        return AttentionStats(mass_v, mass_s, self.query_mask.to(device), self.visual.sum(-1).to(device), layers,
                              self.system.sum(-1).to(device))


@contextmanager
def use_context(model, ctx: AttentionContext) -> Iterator[AttentionContext]:
    """Inject ``avar_context=ctx`` into every forward call of ``model`` inside the block (a
    forward pre-hook, removed on exit)."""
    def hook(module, args, kwargs):
        return args, {**kwargs, "avar_context": ctx}

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield ctx
    finally:
        handle.remove()


def require_avar(model) -> None:
    """Raise unless the model's text decoder runs the ``avar`` attention."""
    impl = model.config.get_text_config()._attn_implementation
    if impl != "avar":
        raise ValueError(f"the model uses attn_implementation={impl!r}; attention statistics and the intervention "
                         "need 'avar' (avar_ray.modeling.load_model(path) loads it so)")


def attention_statistics(model, encoded, query: str = "user", layers: Optional[Sequence[int]] = None,
                         chunk_size: Optional[int] = None, intervention: Optional[Intervention] = None,
                         grad: bool = False, method: Optional[Method] = None, **model_kwargs):
    """One forward pass of ``encoded`` (an ``avar_ray.modeling.Encoded``) that also returns the
    attention masses of Q = ``query`` on V and S: ``(outputs, AttentionStats)``.

    ``grad=True`` keeps the graph (AGTO training: the stats and ``outputs`` backpropagate);
    ``model_kwargs`` go to the forward (e.g. ``labels``). With ``intervention`` the statistics
    describe the re-weighted attention, and the outputs are the intervened model's.
    """
    require_avar(model)
    device = next(model.parameters()).device
    encoded = encoded.to(device)
    num_layers = model.config.get_text_config().num_hidden_layers
    ctx = AttentionContext.from_spans(encoded.spans, query=query, layers=layers, intervention=intervention,
                                      method=method, chunk_size=chunk_size, num_layers=num_layers)
    with torch.set_grad_enabled(grad):
        outputs = model(**encoded.inputs, avar_context=ctx, use_cache=False, **model_kwargs)
    return outputs, ctx.stats()


def generate(model, encoded, intervention: Optional[Intervention], **generate_kwargs) -> torch.Tensor:
    """``model.generate`` on an encoded prompt batch with the intervention applied.

    ``encoded`` is an ``avar_ray.modeling.Encoded`` of generation prompts (no response); for
    more than one row use ``padding_side="left"``, as ``generate`` expects. Returns what
    ``generate`` returns (prompt + new token ids). With ``intervention=None`` this is plain
    generation.
    """
    if intervention is None:
        return model.generate(**encoded.inputs, **generate_kwargs)
    require_avar(model)
    if encoded.spans.response.any():
        raise ValueError("generate: the encoded batch already holds response tokens; encode the prompts only")
    num_layers = model.config.get_text_config().num_hidden_layers
    ctx = AttentionContext.from_spans(encoded.spans, intervention=intervention, num_layers=num_layers)
    with use_context(model, ctx):  # generate() rejects unknown model kwargs; a hook adds it per forward
        out = model.generate(**encoded.inputs, **generate_kwargs)
    ctx.check_used()
    return out
