"""Per-step SFT metrics, written by rank 0: JSONL (one object per optimizer step), TensorBoard
scalars and a progress bar."""
from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm import tqdm


class MetricsLogger:
    def __init__(self, out: str | Path, total_steps: int, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.jsonl"
        # A fresh run starts the file anew; a resumed one keeps the steps up to its checkpoint.
        kept = [line for line in (path.read_text().splitlines() if path.exists() and start_step else [])
                if line.strip() and json.loads(line)["step"] <= start_step]
        path.write_text("".join(line + "\n" for line in kept))
        self.jsonl = path.open("a", encoding="utf-8")
        self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="sft", unit="step")

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
                self.tb.add_scalar(f"sft/{key}", value, step)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", lm=f"{metrics['lm_loss']:.3f}", vas=f"{metrics['vas']:.3g}")

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.tb.close()
            self.jsonl.close()
