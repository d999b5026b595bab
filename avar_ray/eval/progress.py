"""Per-sample results of an eval, appended as they finish (``<out>/progress.jsonl``), so that a
killed eval resumes without redoing finished samples.

Each line is ``{"key": ..., "record": {...}}`` (a scored sample, with its heatmap grid when it
was picked for one) or ``{"key": ..., "error": "..."}`` (the statistics pass could not segment
it: counted as a bad row). ``progress_meta.json`` holds the settings the results depend on; a
resume under other settings is refused instead of mixing two evals. A line torn by a kill is
dropped (that sample is redone).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

log = logging.getLogger("avar_ray.eval")

PROGRESS = "progress.jsonl"
META = "progress_meta.json"


def item_keys(items: Sequence) -> list[str]:
    """A stable key per item: benchmark, sample id and, for repeated ids, their occurrence."""
    seen: dict[tuple[str, str], int] = {}
    keys = []
    for item in items:
        ident = (item.benchmark, item.sample.id)
        n = seen.get(ident, 0)
        seen[ident] = n + 1
        keys.append(f"{item.benchmark}/{item.sample.id}" + (f"#{n}" if n else ""))
    return keys


class ProgressStore:
    def __init__(self, out: Path, settings: dict, resume: bool) -> None:
        self.path, meta = out / PROGRESS, out / META
        self.done: dict[str, dict] = {}
        settings = json.loads(json.dumps(settings, default=str))  # as it reads back
        if resume and self.path.exists() and meta.exists():
            earlier = json.loads(meta.read_text())
            if earlier != settings:
                changed = sorted(k for k in set(earlier) | set(settings) if earlier.get(k) != settings.get(k))
                raise ValueError(f"eval.resume: {out} holds samples of an eval with other settings ({', '.join(changed)}); "
                                 "choose another output directory, or set eval.resume=false to start over")
            self._load()
        else:
            meta.write_text(json.dumps(settings, indent=1, sort_keys=True))
            self.path.write_text("")
        self.resumed = len(self.done)
        self.fh = self.path.open("a", encoding="utf-8")

    def _load(self) -> None:
        good = 0
        with self.path.open("rb") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except ValueError:
                    break  # torn by a kill: it and anything after it are redone
                if not line.endswith(b"\n"):
                    break
                self.done[row["key"]] = row
                good += len(line)
        if good != self.path.stat().st_size:
            log.warning("eval: %s ends in a torn line (a killed run); that sample is redone", self.path)
            with self.path.open("r+b") as fh:
                fh.truncate(good)
        log.info("eval: resuming, %d samples already done in %s", len(self.done), self.path)

    def append(self, rows: Iterable[dict]) -> None:
        """Commit finished samples (flushed and synced: a kill loses none of them)."""
        for row in rows:
            # NaN stays NaN (Python's JSON), so a resumed record equals a fresh one
            self.fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.done[row["key"]] = row
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()
