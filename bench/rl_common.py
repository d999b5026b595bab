"""What the RL benches (``rl_step.py``, ``rl_async.py``) share: the environment their Ray
workers inherit (set on import, before vLLM is imported), the model and workload flags, the
tiny model (optionally deepened) and the embedded local Ray."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="an HF checkpoint directory (default: the tiny model, built here)")
    parser.add_argument("--layers", type=int, default=0, help="the tiny model with this many text layers (0: its 4)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)


def model_variant(model_dir: Path, out: Path, edit) -> Path:
    """The tiny checkpoint with its config changed by ``edit(config)``: fresh random weights
    (seed 0), float32, the same processor."""
    import torch
    from transformers import AutoConfig, AutoProcessor, GenerationConfig, Qwen2_5_VLForConditionalGeneration

    config = AutoConfig.from_pretrained(model_dir)
    edit(config)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    model.generation_config = GenerationConfig.from_pretrained(model_dir)
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(model_dir).save_pretrained(out)
    return out


def deepened(model_dir: Path, layers: int) -> Path:
    """The tiny checkpoint with ``layers`` text layers."""
    def edit(config):
        config.text_config.num_hidden_layers = layers
        config.text_config.layer_types = ["full_attention"] * layers

    return model_variant(model_dir, model_dir.parent / f"tiny_{layers}_layers", edit)


def bench_model(args, tmp: Path) -> str:
    """``--model``, or the tiny model built under ``tmp`` (with ``--layers`` text layers)."""
    if args.model is not None:
        return args.model
    from avar_ray.tiny_model import build_tiny_model

    tiny = build_tiny_model(tmp / "tiny", seed=0)
    return str(deepened(tiny, args.layers) if args.layers else tiny)


def init_ray(env: dict | None = None) -> None:
    """An embedded local Ray whose workers see this process's vLLM/tokenizer settings (and ``env``)."""
    import ray

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": os.environ["VLLM_CPU_KVCACHE_SPACE"],
                                       "TOKENIZERS_PARALLELISM": "false", **(env or {})}})
