"""Stage 1 driver (VARD, SPEC.md §3): raw samples → caption → caption-grounded reasoning →
visual anchors → answer verification → Parquet shards, on Ray Data.

    report = run_synthesis(load_config("configs/tiny_local.yaml"))

The driver reads the input with the foundation readers (bad rows counted and quarantined),
leaves out ids that committed shards already hold, runs the stages, and commits shards as
results stream back, so a killed job loses at most the rows of one uncommitted shard.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
from tqdm import tqdm

from avar_ray.data.readers import DataKeys, read_samples
from avar_ray.data.schema import to_row
from avar_ray.synth.openai_client import api_key_from_env
from avar_ray.synth.prompts import load_prompt
from avar_ray.synth.shards import TRAIN_SCHEMA, ShardStore, write_json_atomic
from avar_ray.synth.stages import StepRunner, plan_stages, step_teachers, verify_batch
from avar_ray.synth.steps import DROPPED, KEPT, QUARANTINED, ROW_SCHEMA, new_row
from avar_ray.synth.teachers import teacher_name

log = logging.getLogger("avar_ray.synth")


@dataclass
class SynthReport:
    input: str
    out: str
    read: int = 0
    read_skipped: dict = field(default_factory=dict)  # reader reason -> count
    duplicate_ids: int = 0
    already_done: int = 0  # ids committed by an earlier run (resume)
    deferred: int = 0  # pending rows left for a later run by synth.max_rows
    processed: int = 0
    kept: int = 0
    dropped: dict = field(default_factory=dict)  # reason -> count
    quarantined: dict = field(default_factory=dict)  # reason -> count
    anchor_modes: dict = field(default_factory=dict)
    shards_written: int = 0
    orphans_removed: int = 0
    total_kept: int = 0  # this run and earlier ones
    seconds: float = 0.0
    rows_per_s: float = 0.0
    teachers: dict = field(default_factory=dict)
    prompts: dict = field(default_factory=dict)

    def summary(self) -> str:
        def fmt(d: dict) -> str:
            return ", ".join(f"{k}: {v}" for k, v in sorted(d.items())) or "none"
        return (f"synth: {self.processed} rows in {self.seconds:.1f}s ({self.rows_per_s:.2f} rows/s); "
                f"kept {self.kept} (total {self.total_kept}); dropped {sum(self.dropped.values())} "
                f"({fmt(self.dropped)}); quarantined {sum(self.quarantined.values())} ({fmt(self.quarantined)}); "
                f"unreadable input rows {sum(self.read_skipped.values())}; already done {self.already_done}; "
                f"left for a later run {self.deferred}; "
                f"anchors {fmt(self.anchor_modes)}")


class ShardWriter:
    """Collects finished rows and commits a shard every ``rows_per_shard`` rows."""

    def __init__(self, store: ShardStore, rows_per_shard: int, teachers_json: str, prompts_json: str) -> None:
        self.store, self.rows_per_shard = store, rows_per_shard
        self.teachers_json, self.prompts_json = teachers_json, prompts_json
        self.kept: list[dict] = []
        self.dropped: dict[str, str] = {}
        self.quarantined: list[dict] = []
        self.all_quarantined: list[dict] = []
        self.counts = {"kept": 0, "dropped": Counter(), "quarantined": Counter(), "anchor": Counter(), "shards": 0}

    def add(self, row: dict) -> None:
        status = row["status"]
        if status == KEPT:
            self.kept.append({**{k: row[k] for k in TRAIN_SCHEMA.names if k in row},
                              "teachers": self.teachers_json, "prompts": self.prompts_json})
            self.counts["kept"] += 1
            self.counts["anchor"][row["anchor_mode"]] += 1
        elif status == DROPPED:
            self.dropped[row["id"]] = row["reason"]
            self.counts["dropped"][row["reason"]] += 1
        elif status == QUARANTINED:
            record = {"id": row["id"], "source": row["source"], "step": row["failed_step"],
                      "reason": row["reason"], "detail": row["detail"]}
            self.quarantined.append(record)
            self.all_quarantined.append(record)
            self.counts["quarantined"][row["reason"]] += 1
        else:
            raise RuntimeError(f"row {row['id']!r} left the pipeline without a status")
        if len(self.kept) + len(self.dropped) + len(self.quarantined) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if self.kept or self.dropped or self.quarantined:
            self.store.commit(self.kept, self.dropped, self.quarantined)
            self.counts["shards"] += 1
            self.kept, self.dropped, self.quarantined = [], {}, []


def _check_teachers(synth_cfg) -> None:
    for step, t in step_teachers(synth_cfg).items():
        if t.kind == "vllm" and not Path(t.model).is_dir():
            raise ValueError(f"synth.{step}.model: vllm teacher needs a local model directory, got {t.model!r}")
        if t.kind == "openai" and not (t.base_url and t.model):
            raise ValueError(f"synth.{step}: an openai teacher needs base_url and model")


def build_dataset(rows: list[dict], synth_cfg, prompts: dict, seed: int):
    """The Ray Data pipeline over pending rows: one stage per teacher group, then verification."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows one bar over rows
    bs = synth_cfg.batch_size
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    ds = ray.data.from_arrow([table.slice(i, bs) for i in range(0, len(rows), bs)])
    teachers = step_teachers(synth_cfg)
    for plan in plan_stages(synth_cfg):
        t = plan.teacher
        key = api_key_from_env(t.api_key_env, f"synth.{plan.steps[0]}.api_key_env") if t.kind == "openai" else None
        ds = ds.map_batches(
            StepRunner, batch_size=bs, batch_format="pyarrow",
            fn_constructor_kwargs=dict(steps=plan.steps, teachers={s: teachers[s] for s in plan.steps},
                                       prompts={s: prompts[s] for s in plan.steps},
                                       positions=list(synth_cfg.anchor_positions), seed=seed, api_key=key),
            compute=ray.data.ActorPoolStrategy(size=synth_cfg.num_actors),
            num_cpus=t.num_cpus, num_gpus=t.num_gpus)
    return ds.map_batches(verify_batch, batch_size=bs, batch_format="pyarrow", num_cpus=0.25)


def run_synthesis(cfg, progress: bool = True) -> SynthReport:
    from avar_ray.ray_utils import init_ray

    synth = cfg.synth
    _check_teachers(synth)
    teachers = step_teachers(synth)
    prompts = {s: (load_prompt(t.prompt or f"configs/prompts/{s}.txt", s, f"synth.{s}.prompt")
                   if t.kind != "oracle" else None) for s, t in teachers.items()}
    report = SynthReport(input=synth.input, out=synth.out,
                         teachers={s: teacher_name(t) for s, t in teachers.items()},
                         prompts={s: (p.provenance if p else "oracle") for s, p in prompts.items()})
    store = ShardStore(synth.out)
    ledger = store.recover()
    report.orphans_removed = ledger.orphans_removed
    samples, read_report = read_samples(synth.input, keys=DataKeys.of(cfg.data))
    report.read, report.read_skipped = read_report.loaded, dict(read_report.reasons)
    pending, seen = [], set()
    for s in samples:
        if s.id in seen:
            report.duplicate_ids += 1
            log.warning("%s: duplicate id %r skipped", synth.input, s.id)
            continue
        seen.add(s.id)
        if s.id in ledger.done:
            report.already_done += 1
        elif synth.max_rows < 0 or len(pending) < synth.max_rows:
            pending.append(new_row(to_row(s)))
        else:
            report.deferred += 1
    writer = ShardWriter(store, synth.rows_per_shard, json.dumps(report.teachers, sort_keys=True),
                         json.dumps(report.prompts, sort_keys=True))
    start = time.perf_counter()
    if pending:
        init_ray(cfg.ray)
        start = time.perf_counter()  # rows/s of the pipeline, not of connecting to Ray
        ds = build_dataset(pending, synth, prompts, cfg.seed)
        with tqdm(total=len(pending), desc="synth", unit="row", disable=not progress) as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for row in batch.to_pylist():
                    writer.add(row)
                bar.update(batch.num_rows)
        writer.flush()
    report.seconds = time.perf_counter() - start
    counts = writer.counts
    report.processed = counts["kept"] + sum(counts["dropped"].values()) + sum(counts["quarantined"].values())
    report.kept, report.shards_written = counts["kept"], counts["shards"]
    report.dropped, report.quarantined = dict(counts["dropped"]), dict(counts["quarantined"])
    report.anchor_modes = dict(counts["anchor"])
    report.total_kept = ledger.kept + report.kept
    report.rows_per_s = report.processed / report.seconds if report.seconds > 0 else 0.0
    unreadable = [{"id": None, "source": synth.input, "step": "read", "reason": why.split(": ", 1)[0], "detail": f"{file} row {key}: {why}"}
                  for file, key, why in read_report.bad_rows]
    store.write_quarantine(unreadable + ledger.quarantine + writer.all_quarantined)
    write_json_atomic(Path(synth.out) / "synth_report.json", asdict(report))
    return report
