"""Attention core (SPEC.md §1, §2, §4): statistics computed inside the attention call, VAS and
friends, the training-free intervention and the AGTO losses.

    from avar_ray.attention import attention_statistics, Intervention, vas_from_stats, agto_losses

    outputs, stats = attention_statistics(model, encoded, query="response",
                                          intervention=Intervention(a_img=0.2, a_sys=0.4))
    vas = vas_from_stats(stats)            # VASResult: vas, alpha_img, eps_img, alpha_sys, per_layer
    losses = agto_losses(stats)            # with grad=True: losses.enh / losses.sup backpropagate

The model must run ``attn_implementation="avar"`` (``avar_ray.modeling.load_model`` does).
"""
from avar_ray.attention.agto import AGTOLosses, agto_losses
from avar_ray.attention.context import (NO_SYSTEM_PROMPT, AttentionContext, AttentionStats, Intervention,
                                        NoSystemPromptError, attention_statistics, generate, require_avar,
                                        require_system_span, use_context)
from avar_ray.attention.kernel import ATTN_IMPLEMENTATION, avar_attention_forward, register_attention
from avar_ray.attention.vas import BANDS, VASResult, band, compute_vas, vas_from_stats

__all__ = [
    "AGTOLosses", "ATTN_IMPLEMENTATION", "AttentionContext", "AttentionStats", "BANDS", "Intervention",
    "NO_SYSTEM_PROMPT", "NoSystemPromptError", "VASResult", "agto_losses", "attention_statistics",
    "avar_attention_forward", "band", "compute_vas", "generate", "register_attention", "require_avar",
    "require_system_span", "use_context", "vas_from_stats",
]
