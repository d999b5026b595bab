"""The trained model as a Hugging Face directory that transformers and vLLM load: weights
(safetensors), config, generation config, and the processor/tokenizer files (vLLM reads the
tokenizer and chat template from the model directory)."""
from __future__ import annotations

import json
from pathlib import Path


def export_hf(engine, processor, out: str | Path, zero_stage: int, rank: int, info: dict) -> Path | None:
    """Call on every rank (ZeRO-3 gathers the weights collectively); rank 0 writes ``out``."""
    out = Path(out)
    if zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # full weights on rank 0 only
    else:
        state_dict = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        return None
    out.mkdir(parents=True, exist_ok=True)
    engine.module.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "avar_sft.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    return out
