"""A model's shape from its ``config.json`` alone (no weights, no transformers): what the
memory plan needs. Where ``model.path`` is not reachable from the planning machine (a volume
only the cluster mounts), a copy shipped in ``model_configs/`` is used, matched by the
directory's name (``.../Qwen2.5-VL-7B-Instruct`` -> ``qwen2_5_vl_7b.json``).

The shipped copies hold the architecture fields of the published checkpoints' config.json
(huggingface.co/Qwen/<name>/blob/main/config.json; each file's ``_source`` names it):
Qwen2.5-VL 3B/7B/32B/72B, Qwen3-VL 2B/4B/8B/32B (the dense sizes; the MoE ones are not
modelled) and Qwen3-32B (the text-only anchor teacher). Parameter counts this module derives
from them: 3.75B, 8.29B, 33.45B, 73.4B; 2.13B, 4.44B, 8.77B, 33.4B; 32.8B, the published
sizes (``tests/test_plan.py`` checks them).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

SHIPPED = Path(__file__).with_name("model_configs")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str  # the config.json read
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool  # Qwen2 / 2.5: biased q, k, v; Qwen3: q/k norms instead
    # vision tower (0 layers: a text-only model)
    v_hidden: int = 0
    v_layers: int = 0
    v_intermediate: int = 0
    v_mlp_mats: int = 3  # Qwen2.5-VL: SwiGLU (gate, up, down); Qwen3-VL: two-matrix GELU MLP
    v_patch: int = 14
    v_temporal: int = 2
    v_merge: int = 2
    v_mergers: int = 1  # the merger, plus Qwen3-VL's DeepStack mergers
    v_pos_embeddings: int = 0
    max_pixels: int = 12_845_056  # the processor's bound (processor_config.json), Qwen2.5-VL's by default

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        h, attn = self.hidden, self.hidden * (self.q_dim + 2 * self.kv_dim) + self.q_dim * self.hidden
        bias = self.q_dim + 2 * self.kv_dim if self.qkv_bias else 2 * self.head_dim  # Qwen3: q_norm, k_norm
        return attn + bias + 3 * h * self.intermediate + 2 * h

    def text_params(self) -> int:
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.layers * self.layer_params() + self.hidden

    def vision_params(self) -> int:
        if not self.v_layers:
            return 0
        hv, merged = self.v_hidden, self.v_hidden * self.v_merge ** 2
        block = 4 * hv * hv + 4 * hv + self.v_mlp_mats * hv * self.v_intermediate + 4 * hv
        merger = merged * merged + merged * self.hidden + merged + self.hidden + 2 * merged
        patch = 3 * self.v_temporal * self.v_patch ** 2 * hv
        return patch + self.v_pos_embeddings * hv + self.v_layers * block + self.v_mergers * merger

    def params(self) -> int:
        return self.text_params() + self.vision_params()

    def image_tokens(self, max_pixels: Optional[int]) -> int:
        """LM tokens of one image at ``max_pixels`` (None: the checkpoint processor's bound)."""
        pixels = max_pixels or self.max_pixels
        return max(1, pixels // (self.v_patch * self.v_merge) ** 2)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_dim * dtype_bytes


def spec_from_json(values: dict, name: str, source: str) -> ModelSpec:
    text = values.get("text_config") or values
    heads = text["num_attention_heads"]
    vision = values.get("vision_config") or {}
    qwen3 = "qwen3" in str(values.get("model_type", ""))
    v_fields = {}
    if vision:
        v_fields = dict(v_hidden=vision.get("hidden_size", vision.get("embed_dim", 0)), v_layers=vision.get("depth", 0),
                        v_intermediate=vision.get("intermediate_size", 4 * vision.get("hidden_size", 0)),
                        v_mlp_mats=2 if qwen3 else 3, v_patch=vision.get("patch_size", 14),
                        v_temporal=vision.get("temporal_patch_size", 2), v_merge=vision.get("spatial_merge_size", 2),
                        v_mergers=1 + len(vision.get("deepstack_visual_indexes") or []),
                        v_pos_embeddings=vision.get("num_position_embeddings", 0))
    return ModelSpec(name=name, source=source, hidden=text["hidden_size"], layers=text["num_hidden_layers"],
                     heads=heads, kv_heads=text.get("num_key_value_heads", heads),
                     head_dim=text.get("head_dim") or text["hidden_size"] // heads,
                     intermediate=text["intermediate_size"], vocab=text["vocab_size"],
                     tied=bool(values.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
                     qkv_bias=not qwen3, **v_fields)


def processor_max_pixels(model_dir: Path) -> dict:
    """The image processor's pixel bound from a checkpoint directory, if it has one."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        p = model_dir / name
        if p.is_file():
            values = json.loads(p.read_text())
            values = values.get("image_processor", values)
            pixels = values.get("max_pixels") or (values.get("size") or {}).get("longest_edge")
            if pixels:
                return {"max_pixels": int(pixels)}
    return {}


def shipped_name(path: str) -> str:
    """``/mnt/x/Qwen2.5-VL-7B-Instruct`` -> ``qwen2_5_vl_7b`` (the shipped file's stem)."""
    stem = Path(str(path).rstrip("/")).name.lower()
    stem = re.sub(r"-(instruct|thinking)(-\d+)?$", "", stem)
    return re.sub(r"[^a-z0-9]+", "_", stem).strip("_")


def load_spec(model_path: str, override: Optional[str] = None) -> ModelSpec:
    """``override`` (a config.json or a directory with one), else ``model_path``'s config.json,
    else the shipped copy matching its name; FileNotFoundError naming what was tried."""
    candidates = []
    if override:
        p = Path(override)
        candidates.append(p / "config.json" if p.is_dir() else p)
    else:
        candidates += [Path(model_path) / "config.json", SHIPPED / f"{shipped_name(model_path)}.json"]
    for p in candidates:
        if p.is_file():
            spec = spec_from_json(json.loads(p.read_text()), Path(model_path).name or str(p), str(p))
            return replace(spec, **processor_max_pixels(p.parent))
    known = ", ".join(sorted(f.stem for f in SHIPPED.glob("*.json")))
    raise FileNotFoundError(f"no config.json at {' or '.join(map(str, candidates))} (shipped: {known}; "
                            "name one with --model-config)")
