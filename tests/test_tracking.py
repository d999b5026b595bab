"""The one tracker (avar_ray.tracking) with its real backends, offline: JSONL, TensorBoard, W&B in
offline mode and MLflow on a local file store; resume continues the same runs; no API key from
the environment reaches a log, a stored config or any output file."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from avar_ray.config import TrackingConfig, load_config, to_dict
from avar_ray.tracking import STATE, Tracker, read_metrics, scrub

WANDB_KEY = "wandbkey-0123456789abcdef0123456789abcdef01234567"
MLFLOW_TOKEN = "mlflowtoken-fedcba9876543210"
ALL = ["jsonl", "tensorboard", "wandb", "mlflow"]


@pytest.fixture
def keys(monkeypatch, tmp_path):
    """Fake credentials in the environment, as a user's shell would hold them; W&B kept off
    the user's home and offline."""
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", MLFLOW_TOKEN)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return WANDB_KEY, MLFLOW_TOKEN


def tracking(**kw) -> TrackingConfig:
    return TrackingConfig(**{"backends": ALL, "wandb_mode": "offline", "project": "avar-test", **kw})


def steps(n0: int, n1: int) -> dict[int, dict]:
    return {s: {"loss": 1.0 / s, "vas/response": 0.1 * s, "grad_norm": float("nan"), "done": s == n1}
            for s in range(n0, n1 + 1)}


def mlflow_history(out: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def tensorboard_scalars(out: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events in sorted((out / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def test_every_backend_records_the_steps_and_a_resume_continues_the_same_runs(keys, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, [])
    tracker = Tracker(tracking(), out, "sft", to_dict(cfg), start_step=0, total_steps=4)
    for step, metrics in steps(1, 3).items():
        tracker.log(step, metrics)
    tracker.close()
    state = json.loads((out / STATE).read_text())
    assert set(state) == {"wandb", "mlflow"}

    # a resume from the step-2 checkpoint: step 3 is redone, step 4 is new. W&B names an offline run's
    # folder by the second it started: a resume in the same second would write into the first's folder.
    time.sleep(1.1)
    tracker = Tracker(tracking(), out, "sft", to_dict(cfg), start_step=2, total_steps=4)
    for step, metrics in steps(3, 4).items():
        tracker.log(step, metrics)
    tracker.summary({"final/loss": 0.25})
    tracker.close()

    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[0]["grad_norm"] is None and records[3]["done"] is True and records[1]["loss"] == 0.5
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1]) == {"summary": {"final/loss": 0.25}}
    assert tensorboard_scalars(out, "sft/loss") == pytest.approx({1: 1.0, 2: 0.5, 3: 1 / 3, 4: 0.25})
    assert json.loads((out / STATE).read_text()) == state  # the same W&B and MLflow runs went on
    history = mlflow_history(out, state["mlflow"], "vas/response")
    assert [s for s, _ in history] == [1, 2, 3, 3, 4]  # MLflow cannot retract the redone step 3
    assert dict(history)[4] == pytest.approx(0.4)
    assert mlflow_history(out, state["mlflow"], "final/loss") == [(0, 0.25)]
    assert not mlflow_history(out, state["mlflow"], "grad_norm")  # NaN is not a point
    runs = list((out / "wandb").glob(f"offline-run-*-{state['wandb']}"))
    assert len(runs) == 2 and all(list(r.glob("run-*.wandb")) for r in runs)  # W&B appends on resume


def test_no_key_reaches_a_log_a_stored_config_or_any_output(keys, tmp_path, capfd):
    """A key pasted into the config (here: the run name and a teacher endpoint) is masked, and
    the keys W&B and MLflow read from the environment are never written by either."""
    out = tmp_path / "run"
    cfg = load_config(None, [f"synth.caption.base_url=http://127.0.0.1:9/v1?key={MLFLOW_TOKEN}"])
    tracker = Tracker(tracking(run_name=f"trial-{WANDB_KEY}"), out, "rl", to_dict(cfg), total_steps=2)
    tracker.log(1, {"reward/total": 0.5, f"x/{WANDB_KEY}": 1.0})
    tracker.summary({"overall/accuracy": 0.5})
    tracker.close()
    captured = capfd.readouterr()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any("mlruns" in p.parts for p in files)
    leaks = []
    for key in keys:
        needle = key.encode()
        leaks += [str(p) for p in files if needle in p.read_bytes()]
        leaks += [name for name, text in (("stdout", captured.out), ("stderr", captured.err)) if key in text]
    assert not leaks, leaks
    # the masked config is what MLflow stored
    params = {p.name: p.read_text() for p in out.rglob("params/synth.caption.base_url")}
    assert list(params.values()) == ["http://127.0.0.1:9/v1?key=***"]


def test_scrub_and_config_errors(tmp_path):
    assert scrub({"a": ["x-SECRET-y", 3], "SECRET": "b"}, ["SECRET"]) == {"a": ["x-***-y", 3], "***": "b"}
    with pytest.raises(ValueError, match="tracking.backends"):
        load_config(None, ["tracking.backends=[jsonl, neptune]"])
    with pytest.raises(ValueError, match=r"tracking.backends: unknown \['neptune'\]"):
        Tracker(TrackingConfig(backends=["neptune"]), tmp_path, "eval")


def test_rl_metrics_writer_keeps_its_api(tmp_path):
    from avar_ray.rl.driver import MetricsWriter

    writer = MetricsWriter(tmp_path / "rl", total_steps=2, start_step=0, tracking=TrackingConfig(backends=["jsonl"]))
    writer.log(1, {"reward/total": float("inf"), "time/step": 1.5})
    writer.close()
    assert writer.path == tmp_path / "rl" / "metrics.jsonl"
    (record,) = read_metrics(writer.path)
    assert record == {"step": 1, "reward/total": None, "time/step": 1.5}
    assert not (tmp_path / "rl" / "tensorboard").exists()  # only the configured backends
