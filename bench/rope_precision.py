"""What bf16 RoPE frequencies did to the learner: one ZeRO-3 learner rank in bf16 (in-process, on
CPU, or on GPU when there is one) against a float32 HF forward on the same weights: the mean and
max |log-prob difference| by response position, with ``modeling.float32_rope`` (``fix``) and
without it (``nofix``: the learner before the fix).

    .venv/bin/python bench/rope_precision.py fix
    .venv/bin/python bench/rope_precision.py nofix

Two prompts with 3000-token random responses, the tiny model. Figures: bench/results/gpu_check.md.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESPONSE = 3000
BANDS = ((0, 250), (250, 1000), (1000, 2000), (2000, 3000))


def main(fix: bool) -> None:
    from transformers import AutoConfig

    import avar_ray.modeling as modeling
    from actors.learner import Learner
    from actors.policy import banned_token_ids
    from actors.records import TrainItem
    from avar_ray.config import load_config
    from avar_ray.data.procedural import generate_samples
    from avar_ray.ray_utils import free_port
    from avar_ray.tiny_model import build_tiny_model
    from bench.gpu_learner import reference_pass

    if not fix:
        modeling.float32_rope = lambda model: 0  # the learner imports it at setup
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    cfg = load_config(str(ROOT / "configs/tiny_local.yaml"), [
        f"model.path={model_dir}", "model.dtype=bfloat16", "rl.zero_stage=3", "rl.kl_coef=0.0",
        f"rl.placement.learner_gpus={1 if device == 'cuda' else 0}"])
    processor = modeling.load_processor(str(model_dir), cfg.model)
    banned = set(banned_token_ids(processor))
    vocab = [t for t in range(AutoConfig.from_pretrained(model_dir).get_text_config().vocab_size) if t not in banned]
    gen = torch.Generator().manual_seed(0)
    items = [TrainItem(s, [vocab[int(i)] for i in torch.randint(0, len(vocab), (RESPONSE,), generator=gen)], 0.0,
                       [0.0] * RESPONSE) for s in generate_samples(2, seed=0)]
    reference = modeling.load_model(str(model_dir), "float32", attn_implementation="avar").to(device).eval()
    ref_lp, _ = reference_pass(reference, processor, items, cfg.model.system_prompt, cfg.attention, sorted(banned))
    rank = Learner(cfg.rl, cfg.model, cfg.attention, 0, 1)
    rank.setup("127.0.0.1", free_port("127.0.0.1"), 0, 1)
    learner_lp = rank.logprobs(items)
    for lo, hi in BANDS:
        diffs = [abs(a - b) for u, v in zip(learner_lp, ref_lp) for a, b in zip(u[lo:hi], v[lo:hi])]
        print(f"ROPE {'fix' if fix else 'nofix'} on {device}, response tokens {lo}-{hi}: |learner - float32| "
              f"mean {sum(diffs) / len(diffs):.4f} max {max(diffs):.3f}")


if __name__ == "__main__":
    if sys.argv[1:] not in (["fix"], ["nofix"]):
        raise SystemExit("usage: rope_precision.py {fix|nofix}")
    main(sys.argv[1] == "fix")
