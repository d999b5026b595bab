"""Loading the learner's model under ZeRO-3 without any rank holding all of it."""
from __future__ import annotations

from pathlib import Path


def load_partitioned(path: str, dtype: str, ds_config: dict):
    """The HF model built inside ``deepspeed.zero.Init`` (each rank allocates only its partition)
    and filled from the checkpoint's safetensors one tensor at a time: rank 0 reads it (memory
    mapped) into the gathered parameter, which is re-partitioned at once. No rank ever holds
    the whole model (transformers' own ZeRO-3 loading would need ``accelerate``)."""
    import json

    import deepspeed
    import torch.distributed as dist
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.initialization import no_init_weights

    from avar_ray.attention import register_attention
    from avar_ray.modeling import float32_rope, torch_dtype

    register_attention()
    config = AutoConfig.from_pretrained(path)
    # no random init (every weight comes from the checkpoint; it would index empty partitions)
    with deepspeed.zero.Init(config_dict_or_path=ds_config), no_init_weights():
        model = AutoModelForImageTextToText.from_config(config, attn_implementation="avar",
                                                        dtype=torch_dtype(dtype))
    model.tie_weights()  # tied embeddings: the head shares the embedding's (partitioned) parameter
    float32_rope(model)  # zero.Init built RoPE's frequencies in the training dtype
    index = Path(path) / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    params = dict(model.named_parameters())
    # checkpoint names -> module names, as from_pretrained renames them (e.g. Qwen2.5-VL's
    # "model.layers.*" -> "model.language_model.layers.*")
    renames = get_model_conversion_mapping(model)

    def module_name(key: str) -> str:
        for transform in renames:
            key = transform.rename_source_key(key)[0]
        return key

    loaded = set()
    for file in files:
        with safe_open(str(Path(path) / file), framework="pt") as f:
            for key in sorted(f.keys()):  # the same order on every rank: each gather is a collective
                name = module_name(key)
                if name not in params:
                    raise KeyError(f"{path}/{file}: tensor {name!r} has no parameter in the model (a checkpoint "
                                   "saved under another naming: re-save it with this transformers' save_pretrained)")
                with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0):
                    if dist.get_rank() == 0:
                        params[name].data.copy_(f.get_tensor(key))
                loaded.add(name)
    missing = set(params) - loaded
    if missing:
        raise KeyError(f"{path}: no weights for {sorted(missing)[:5]} ({len(missing)} parameters)")
    return model
