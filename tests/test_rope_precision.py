"""RoPE's inverse frequencies stay float32 where DeepSpeed trains in bf16 (``modeling.float32_rope``).

Found on an H200 (bench/gpu_check.sh): ZeRO-3's ``zero.Init`` built the learner's rotary buffers in
bf16, as a plain ``.to(bfloat16)`` does (``deepspeed.initialize`` on a built model, as in SFT, casts
only the parameters). The angle of position p
is ``p * inv_freq``, so bf16's rounding puts long positions whole turns off, and the learner's
log-probs drift from vLLM's with the position."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _rope_buffers(model) -> dict[str, torch.Tensor]:
    return {n: b.detach().cpu() for n, b in model.named_buffers() if n.endswith("inv_freq")}


def test_half_cast_rope_is_recomputed_exactly(tiny_model_dir):
    from avar_ray.modeling import float32_rope, load_model

    reference = _rope_buffers(load_model(str(tiny_model_dir), "float32"))
    model = load_model(str(tiny_model_dir), "float32").to(torch.bfloat16)  # rounds the RoPE buffers, as zero.Init does
    cast = _rope_buffers(model)
    assert set(cast) == set(reference) and len(reference) == 4  # text and vision: inv_freq, original_inv_freq
    assert all(cast[n].dtype == torch.bfloat16 for n in cast)
    assert max(float((cast[n].float() - reference[n]).abs().max()) for n in reference) > 1e-4  # the bits lost
    assert float32_rope(model) == 2
    fixed = _rope_buffers(model)
    for name, value in reference.items():
        assert fixed[name].dtype == torch.float32 and torch.equal(fixed[name], value), name
    # the angles at a long position: bf16 frequencies put them radians off, the fixed ones exactly on
    position = 4096.0
    text = "model.language_model.rotary_emb.inv_freq"
    assert float((position * cast[text].float() - position * reference[text]).abs().max()) > 0.5
    assert torch.equal(position * fixed[text], position * reference[text])


@pytest.mark.slow
def test_zero3_learner_rope_frequencies_equal_float32(tiny_model_dir):
    """The production path: one learner rank under ZeRO-3 in bf16 (``zero.Init``), in a process of
    its own (it initialises torch.distributed)."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from actors.learner import Learner
        from avar_ray.config import load_config
        from avar_ray.modeling import load_model
        from avar_ray.ray_utils import free_port
        path = {str(tiny_model_dir)!r}
        cfg = load_config("configs/tiny_local.yaml", [f"model.path={{path}}", "model.dtype=bfloat16",
                                                      "rl.zero_stage=3", "rl.kl_coef=0.0"])
        rank = Learner(cfg.rl, cfg.model, cfg.attention, 0, 1)
        rank.setup("127.0.0.1", free_port("127.0.0.1"), 0, 1)
        ref = {{n: b for n, b in load_model(path, "float32").named_buffers() if n.endswith("inv_freq")}}
        got = {{n: b for n, b in rank.engine.module.named_buffers() if n.endswith("inv_freq")}}
        assert set(got) == set(ref), (sorted(got), sorted(ref))
        print("ROPE", max(float((got[n].float() - ref[n]).abs().max()) for n in ref),
              sorted({{str(b.dtype) for b in got.values()}}), next(rank.engine.module.parameters()).dtype)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=str(ROOT))
    line = next((x for x in out.stdout.splitlines() if x.startswith("ROPE")), None)
    assert line is not None, out.stderr[-3000:]
    _, err, dtypes, param_dtype = line.split(" ", 3)
    assert param_dtype == "torch.bfloat16"  # it does train in bf16
    assert float(err) == 0.0 and dtypes == "['torch.float32']", line
