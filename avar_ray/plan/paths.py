"""Missing model and data paths, one line each naming the key (and, for the tiny config's
``runs/`` layout, the command that makes the path)."""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Optional


def _exists(path: str) -> bool:
    return Path(path).exists() or bool(glob.glob(path))


def _hint(key: str, path: str, config_path: Optional[str], cfg) -> str:
    p = Path(path)
    if p.is_absolute() or not p.parts or p.parts[0] != "runs":
        return ""
    config = config_path or "CONFIG"
    if key == "model.path":
        return f"; make it with: avar tiny-model --out {path}"
    if key == "sft.data":
        return f"; make it with: avar synth -c {config}"
    if key in ("data.train", "synth.input"):
        return f"; make it with: avar make-data --out {p.parent} --split {p.stem} --n {cfg.data.n_train}"
    if key.startswith("data.eval") or key == "--bench":
        return f"; make it with: avar make-data --out {p.parent} --split {p.stem} --n {cfg.data.n_eval}"
    return ""


def path_problems(cfg, stage: str, model: Optional[str] = None, bench: Optional[list] = None,
                  config_path: Optional[str] = None) -> list[str]:
    model_key = "--model" if model else "model.path"
    wanted = {"synth": [("synth.input", cfg.synth.input)]
              + [(f"synth.{s}.model", getattr(cfg.synth, s).model) for s in ("caption", "reasoning", "anchor")
                 if getattr(cfg.synth, s).kind == "vllm"],
              "sft": [(model_key, model or cfg.model.path), ("sft.data", cfg.sft.data)],
              "rl": [(model_key, model or cfg.model.path), ("data.train", cfg.data.train)],
              "eval": [(model_key, model or cfg.model.path)]
              + ([("--bench", f) for f in bench] if bench else
                 [(f"data.eval[{i}]", f) for i, f in enumerate(cfg.data.eval)]),
              "serve": [(model_key, model or cfg.model.path)]}[stage]
    out = []
    for key, path in wanted:
        if not path or not _exists(path):
            what = "model directory" if "model" in key else "file or directory"
            out.append(f"{key}: no {what} at {path or '(empty)'}{_hint(key, path or '', config_path, cfg)}")
    return out
