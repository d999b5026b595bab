"""Stage 2 driver: the cold-start SFT with AGTO as a Ray Train ``TorchTrainer``.

    result = run_sft(load_config("configs/tiny_local.yaml"))

The driver prepares the Ray Data dataset (rows longer than ``sft.max_length`` are counted and
left out), derives the step count for the LR schedule, and starts ``sft.num_workers`` Ray
Train workers, each running ``loop.train_loop_per_worker`` on its split of the data. Outputs
under ``sft.out``: ``metrics.jsonl`` and the other ``tracking.backends`` (``tensorboard/``...),
``checkpoints/`` (DeepSpeed), ``final/`` (HF directory) and ``sft_report.json``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from avar_ray.checkpoints import latest_step, start_step
from avar_ray.config import to_dict
from avar_ray.sft.data import check_columns, prepare_dataset, require_system_turn_for_agto, training_files
from avar_ray.sft.ds_config import total_steps
from avar_ray.sft.loop import EXPORT_NOTE, train_loop_per_worker
from avar_ray.tracking import METRICS, read_metrics


@dataclass
class SFTReport:
    out: str
    rows: int = 0  # rows trained on (fit max_length)
    too_long: int = 0  # rows skipped: longer than sft.max_length tokens
    total_steps: int = 0
    start_step: int = 0
    final_step: int = 0
    seconds: float = 0.0
    samples_per_s: float = 0.0  # mean over the steps of this run (global batch / step time)
    first: dict = field(default_factory=dict)  # metrics of the first step of this run
    last: dict = field(default_factory=dict)  # metrics of the last step
    export: str = ""

    def summary(self) -> str:
        def g(d: dict, k: str) -> str:
            v = d.get(k)
            return "n/a" if v is None else f"{v:.4g}"
        return (f"sft: steps {self.start_step}->{self.final_step} of {self.total_steps} on {self.rows} rows "
                f"({self.too_long} longer than max_length skipped) in {self.seconds:.1f}s, "
                f"{self.samples_per_s:.2f} samples/s; lm_loss {g(self.first, 'lm_loss')} -> {g(self.last, 'lm_loss')}, "
                f"VAS {g(self.first, 'vas')} -> {g(self.last, 'vas')}; model exported to {self.export}")


def finished(out: Path) -> int | None:
    """The step of ``out``'s newest checkpoint when final/ was exported from it; else None."""
    note, saved = out / "final" / EXPORT_NOTE, latest_step(out / "checkpoints")
    if saved is None or not note.is_file():
        return None
    try:
        return saved if json.loads(note.read_text()).get("steps") == saved else None
    except json.JSONDecodeError:
        return None


def run_sft(cfg) -> SFTReport:
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from avar_ray.ray_utils import init_ray

    sft = cfg.sft
    out = Path(sft.out).resolve()
    if sft.resume == "auto" and (done := finished(out)) is not None:
        print(f"sft: {out} is complete: final/ was exported at its last checkpoint (step {done}); nothing to do "
              "(sft.resume=true continues it when sft.max_steps or sft.epochs grew)", flush=True)
        return SFTReport(out=str(out), start_step=done, final_step=done, total_steps=done, export=str(out / "final"))
    if not Path(cfg.model.path).is_dir():
        raise FileNotFoundError(f"model.path: no model directory at {cfg.model.path}")
    start = start_step(out / "checkpoints", sft.resume, "sft", "set sft.resume=true or auto to continue it")
    files = training_files(sft.data)
    check_columns(files)
    require_system_turn_for_agto(files, cfg.model, sft.beta)
    init_ray(cfg.ray)
    t0 = time.perf_counter()
    ds, rows, too_long = prepare_dataset(files, cfg.model, sft.max_length, sft.seed, sft.shuffle)
    total = total_steps(sft, rows, sft.num_workers)
    if start >= total and finished(out) == start:
        print(f"sft: {out} is complete: final/ was exported at step {start} of {total}; nothing to do", flush=True)
        return SFTReport(out=str(out), rows=rows, too_long=too_long, total_steps=total, start_step=start,
                         final_step=start, export=str(out / "final"))
    report = SFTReport(out=str(out), rows=rows, too_long=too_long, total_steps=total, start_step=start)
    if too_long:
        print(f"sft: {too_long} of {rows + too_long} rows are longer than sft.max_length={sft.max_length} tokens: skipped")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"sft": sft, "model_path": str(Path(cfg.model.path).resolve()), "model": cfg.model,
                           "total_steps": total,
                           "rows": rows, "out": str(out), "attention": cfg.attention, "backend": "nccl" if sft.use_gpu else "gloo",
                           "tracking": cfg.tracking, "run_config": to_dict(cfg)},
        torch_config=TorchConfig(backend="nccl" if sft.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=sft.num_workers, use_gpu=sft.use_gpu,
                                     resources_per_worker={"CPU": sft.cpus_per_worker}),
        run_config=RunConfig(name="sft", storage_path=str(out / "ray_train")),
        datasets={"train": ds},
        dataset_config=DataConfig(datasets_to_split="all"),
    )
    trainer.fit()
    report.seconds = time.perf_counter() - t0
    steps = [r for r in read_metrics(out / METRICS) if r["step"] > start]
    if steps:
        report.first, report.last, report.final_step = steps[0], steps[-1], steps[-1]["step"]
        rates = [s["samples_per_s"] for s in steps if s.get("samples_per_s")]
        report.samples_per_s = len(rates) / sum(1.0 / r for r in rates) if rates else math.nan  # harmonic: per time
    report.export = str(out / "final")
    (out / "sft_report.json").write_text(json.dumps(asdict(report), indent=1, sort_keys=True) + "\n")
    return report
