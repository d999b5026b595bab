"""One logger for the metrics of SFT, RL and eval: per-step records and run summaries go to the
backends that ``tracking.backends`` names.

    tracker = Tracker(cfg.tracking, out, "rl", run_config=to_dict(cfg), start_step=0, total_steps=10)
    tracker.log(1, {"reward/total": 0.5})
    tracker.summary({"overall/accuracy": 0.3})
    tracker.close()

Backends: ``jsonl`` (``<out>/metrics.jsonl``, one object per step; SFT and RL always write it:
their reports read it back), ``tensorboard`` (``<out>/tensorboard``), ``wandb`` (``online`` or
``offline`` into ``<out>/wandb``) and ``mlflow`` (``tracking.mlflow_tracking_uri``, else
``MLFLOW_TRACKING_URI``, else a local file store ``<out>/mlruns``).

Keys: W&B and MLflow read their credentials from the environment (``WANDB_API_KEY``,
``MLFLOW_TRACKING_TOKEN``...); no config field holds one. The values of secret-looking
environment variables (names with KEY, TOKEN, SECRET or PASSWORD) are also replaced by ``***``
in everything the tracker stores (run config, run name, metric names), and W&B's console
capture is off, so a key pasted into a config or printed by a library does not reach a log.

Resume: a run started at ``start_step > 0`` keeps ``metrics.jsonl`` up to that step (later
records are redone), purges TensorBoard's later events and continues the same W&B and MLflow
runs (their ids are kept in ``<out>/tracking.json``).
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

METRICS = "metrics.jsonl"
STATE = "tracking.json"  # run ids of the W&B and MLflow runs, for a resumed run
BACKENDS = ("jsonl", "tensorboard", "wandb", "mlflow")
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)
_MASK = "***"


def secret_values(environ: Optional[dict] = None) -> list[str]:
    """Values of the environment variables whose names look secret (8+ characters: shorter
    values would mask ordinary words)."""
    env = os.environ if environ is None else environ
    return sorted({v for k, v in env.items() if _SECRET_NAME.search(k) and len(v) >= 8}, key=len, reverse=True)


def scrub(value: Any, secrets: Sequence[str]) -> Any:
    """``value`` with every occurrence of a secret replaced by ``***``, recursively."""
    if isinstance(value, str):
        for s in secrets:
            value = value.replace(s, _MASK)
        return value
    if isinstance(value, dict):
        return {scrub(k, secrets): scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v, secrets) for v in value]
    return value


def clean(value: Any) -> Any:
    """numpy / torch scalars -> Python numbers; NaN and inf -> None (strict JSON)."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, TypeError):
            pass
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _scalars(record: dict) -> dict[str, float]:
    """The plottable entries of a record: finite numbers, booleans left out."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (a run config as tracker parameters)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def read_metrics(path: Path, upto: Optional[int] = None) -> list[dict]:
    """The per-step records of a ``metrics.jsonl`` (summary lines left out), up to a step."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "step" in r and (upto is None or r["step"] <= upto)]


def keep_records_upto(path: Path, step: int) -> None:
    """Rewrite a per-step ``.jsonl`` with its records up to ``step`` (none at 0): a resumed
    run redoes the steps after its checkpoint."""
    kept = read_metrics(path, upto=step) if step else []
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


class _Jsonl:
    def __init__(self, out: Path, start_step: int, **_) -> None:
        self.path = out / METRICS
        keep_records_upto(self.path, start_step)
        self.fh = self.path.open("a", encoding="utf-8")

    def _write(self, obj: dict) -> None:
        self.fh.write(json.dumps(obj) + "\n")
        self.fh.flush()

    def log(self, step: int, record: dict) -> None:
        self._write({"step": step, **record})

    def summary(self, record: dict) -> None:
        self._write({"summary": record})

    def close(self) -> None:
        self.fh.close()


class _TensorBoard:
    def __init__(self, out: Path, start_step: int, stage: str, **_) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.stage = stage
        self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, record: dict) -> None:
        for key, value in _scalars(record).items():
            self.tb.add_scalar(f"{self.stage}/{key}", value, step)
        self.tb.flush()

    def summary(self, record: dict) -> None:
        self.log(0, record)

    def close(self) -> None:
        self.tb.close()


class _Wandb:
    def __init__(self, out: Path, cfg, name: str, run_config: dict, state: dict, **_) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise ImportError("tracking.backends: 'wandb' needs the wandb package (pip install wandb)") from exc
        run_id = state.get("wandb")
        # console="off": W&B would otherwise copy everything printed into output.log
        self.run = wandb.init(project=cfg.project, entity=cfg.wandb_entity, name=name, id=run_id,
                              resume="allow" if run_id else None, dir=str(out), mode=cfg.wandb_mode,
                              config=run_config, reinit="create_new",
                              settings=wandb.Settings(console="off", silent=True))
        state["wandb"] = self.run.id

    def log(self, step: int, record: dict) -> None:
        self.run.log(_scalars(record), step=step)

    def summary(self, record: dict) -> None:
        self.run.summary.update(_scalars(record))

    def close(self) -> None:
        self.run.finish()


class _Mlflow:
    def __init__(self, out: Path, cfg, name: str, run_config: dict, state: dict, **_) -> None:
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise ImportError("tracking.backends: 'mlflow' needs the mlflow package "
                              "(pip install mlflow-skinny)") from exc
        uri = cfg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (out / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps the file store only on request; it is the one store that needs no server
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(cfg.project)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(cfg.project)
        self.run_id = state.get("mlflow")
        if self.run_id is None:
            self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in flatten(run_config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        state["mlflow"] = self.run_id

    @staticmethod
    def _key(key: str) -> str:
        return re.sub(r"[^\w\-./ ]", "_", key)  # MLflow's allowed metric name characters

    def log(self, step: int, record: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(self._key(k), v, now, step) for k, v in _scalars(record).items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def summary(self, record: dict) -> None:
        self.log(0, record)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


_KINDS = {"jsonl": _Jsonl, "tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _Mlflow}


class Tracker:
    """Metrics of one run of a stage (``sft``, ``rl``, ``eval``) to every configured backend,
    plus an optional tqdm bar (``total_steps``) whose postfix is ``progress(record)``.

    ``always``: backends the stage needs whatever the config says (SFT and RL read their
    ``metrics.jsonl`` back)."""

    def __init__(self, cfg, out: str | Path, stage: str, run_config: Optional[dict] = None, start_step: int = 0,
                 total_steps: Optional[int] = None, progress: Optional[Callable[[dict], str]] = None,
                 always: Sequence[str] = ()) -> None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        names = list(dict.fromkeys([*always, *cfg.backends]))
        unknown = [n for n in names if n not in _KINDS]
        if unknown:
            raise ValueError(f"tracking.backends: unknown {unknown} (known: {', '.join(BACKENDS)})")
        self.secrets = secret_values()
        state_path = out / STATE
        state = json.loads(state_path.read_text()) if start_step and state_path.exists() else {}
        name = scrub(cfg.run_name or f"{stage}-{out.resolve().name}", self.secrets)
        run_config = scrub(run_config or {}, self.secrets)
        self.backends = []
        try:
            for n in names:
                self.backends.append(_KINDS[n](out=out, start_step=start_step, stage=stage, cfg=cfg, name=name,
                                               run_config=run_config, state=state))
        except BaseException:
            self.close()
            raise
        if state:
            state_path.write_text(json.dumps(state))
        self.bar, self.progress = None, progress
        if total_steps is not None:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=stage, unit="step", dynamic_ncols=True)

    def _record(self, metrics: dict) -> dict:
        return {scrub(str(k), self.secrets): clean(v) for k, v in metrics.items()}

    def log(self, step: int, metrics: dict) -> None:
        record = self._record(metrics)
        for backend in self.backends:
            backend.log(step, record)
        if self.bar is not None:
            self.bar.update(1)
            if self.progress is not None:
                self.bar.set_postfix_str(self.progress({"step": step, **record}), refresh=True)

    def summary(self, metrics: dict) -> None:
        """A run's final figures (eval: accuracy and VAS per benchmark)."""
        record = self._record(metrics)
        for backend in self.backends:
            backend.summary(record)

    def close(self) -> None:
        if getattr(self, "bar", None) is not None:
            self.bar.close()
        for backend in self.backends:
            backend.close()
        self.backends = []
