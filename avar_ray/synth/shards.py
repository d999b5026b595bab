"""Output of the synthesis stage: atomic Parquet shards, a manifest per shard, resume, quarantine.

Layout of ``synth.out``::

    shards/part-RUN-00000.parquet   training rows kept by one flush (sample row + target + provenance)
    shards/part-RUN-00000.json      its manifest: every id the flush handled, kept or not
    quarantine.jsonl                rows with a bad image / teacher error, with their reason
    synth_report.json               counts of the last run

Both files are written to a temporary name and renamed into place; the manifest goes last and
is the commit mark. A rerun reads the manifests, deletes any Parquet file without one (a job
killed between the two renames) and leaves out every id already handled, so a killed job
resumes without duplicates or losses.
"""
from __future__ import annotations

import json
import os
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from avar_ray.data.schema import PARQUET_SCHEMA

# A training row: the sample (readable with schema.from_row) plus its target and provenance.
TRAIN_SCHEMA = pa.schema(list(PARQUET_SCHEMA) + [
    ("target", pa.string()),  # <think>...</think><answer>...</answer>
    ("caption", pa.string()),
    ("anchor_mode", pa.string()),  # teacher | rule | rule-fallback
    ("teachers", pa.string()),  # JSON: step -> teacher name (never a key)
    ("prompts", pa.string()),  # JSON: step -> prompt version@hash ("oracle" for oracle steps)
])


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: Path, data) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n"))


@dataclass
class Ledger:
    """What committed shards already hold."""

    done: set = field(default_factory=set)  # every id handled (kept, dropped or quarantined)
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    quarantine: list = field(default_factory=list)  # records from the manifests
    orphans_removed: int = 0


class ShardStore:
    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.dir = self.out / "shards"
        self.run_id = uuid.uuid4().hex[:8]
        self._next = 0

    def recover(self) -> Ledger:
        """Read committed manifests; remove temp files and Parquet shards without a manifest."""
        self.dir.mkdir(parents=True, exist_ok=True)
        ledger = Ledger()
        for tmp in self.dir.glob(".*.tmp"):
            tmp.unlink()
        for part in sorted(self.dir.glob("part-*.parquet")):
            if not part.with_suffix(".json").exists():
                part.unlink()
                ledger.orphans_removed += 1
        for manifest in sorted(self.dir.glob("part-*.json")):
            m = json.loads(manifest.read_text())
            ledger.done.update(m["kept"])
            ledger.done.update(m["dropped"])
            ledger.done.update(q["id"] for q in m["quarantined"])
            ledger.kept += len(m["kept"])
            ledger.dropped.update(m["dropped"].values())
            ledger.quarantine.extend(m["quarantined"])
        return ledger

    def commit(self, kept_rows: list[dict], dropped: dict[str, str], quarantined: list[dict]) -> Path:
        """Write one shard (possibly with no kept rows) and then its manifest."""
        name = f"part-{self.run_id}-{self._next:05d}"
        self._next += 1
        parquet, manifest = self.dir / f"{name}.parquet", self.dir / f"{name}.json"
        table = pa.Table.from_pylist(kept_rows, schema=TRAIN_SCHEMA)
        _atomic_write(parquet, lambda p: pq.write_table(table, p))
        write_json_atomic(manifest, {"kept": [r["id"] for r in kept_rows], "dropped": dropped,
                                     "quarantined": quarantined, "parquet": parquet.name})
        return parquet

    def write_quarantine(self, records: list[dict]) -> Path:
        path = self.out / "quarantine.jsonl"
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        _atomic_write(path, lambda p: p.write_text(lines))
        return path


def committed_shards(out: str | Path) -> list[Path]:
    """The Parquet shards of a synthesis output directory that have a manifest (the ones to
    train on); a directory of plain Parquet files is taken as it is."""
    out = Path(out)
    shard_dir = out / "shards" if (out / "shards").is_dir() else out
    parts = [p for p in sorted(shard_dir.glob("*.parquet"))
             if not p.name.startswith("part-") or p.with_suffix(".json").exists()]
    if not parts:
        raise FileNotFoundError(f"no Parquet shards under {out}")
    return parts
