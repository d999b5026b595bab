"""Eval that scales out and resumes: on the tiny model, the Ray Data eval (two vLLM engine
actors, a statistics actor) gives the single-process eval's results; a killed eval (a real
SIGKILL of `avar eval` in a subprocess) resumes without redoing its finished samples and ends
equal to an uninterrupted one; a line torn by a kill is redone."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avar_ray.attention import Intervention
from avar_ray.config import load_config
from avar_ray.data.procedural import generate_samples
from avar_ray.data.schema import write_parquet
from avar_ray.eval.progress import PROGRESS

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["model.max_model_len=1024", "eval.max_new_tokens=8", "eval.heatmaps=2", "eval.batch_size=2",
             "tracking.backends=[jsonl]"]
N = 6  # samples over two files: three batches of two


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("scale_bench")
    samples = generate_samples(N, seed=21)
    return [write_parquet(samples[:3], root / "first.parquet"), write_parquet(samples[3:], root / "second.parquet")]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, vllm_engine, bench, tmp_path_factory):
    """Today's single-process eval (the session's engine), uninterrupted."""
    from avar_ray.eval import run_eval

    out = tmp_path_factory.mktemp("eval_reference")
    return out, run_eval(tiny_model_dir, bench, out, load_config(None, OVERRIDES), llm=vllm_engine)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def progress_lines(out: Path) -> list[str]:
    """The committed lines (a line cut by the kill has no newline yet)."""
    path = out / PROGRESS
    return path.read_text().split("\n")[:-1] if path.exists() else []


def assert_same_eval(out: Path, results: dict, ref_out: Path, ref: dict) -> None:
    """Same samples in the same order, same responses and scores; the statistics equal up to
    float noise (other batch neighbours and thread counts change summation order)."""
    got, want = records(out), records(ref_out)
    assert len(got) == len(want) == ref["overall"]["n"] > 0
    for g, w in zip(got, want):
        exact = ("benchmark", "id", "response", "response_tokens", "finish_reason", "prediction", "correct",
                 "prompt_ids_match")
        assert {k: g[k] for k in exact} == {k: w[k] for k in exact}
        for span in ("user", "response"):
            a, b = g["attention"][span], w["attention"][span]
            assert a["visual_tokens"] == b["visual_tokens"] and a["query_tokens"] == b["query_tokens"]
            for key in ("vas", "alpha_img", "alpha_sys"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-9), (g["id"], span, key)
            assert a["per_layer"] == pytest.approx(b["per_layer"], rel=1e-4, abs=1e-9)
    for key in ("accuracy", "format", "n"):
        assert results["overall"][key] == ref["overall"][key]
    assert results["overall"]["vas"] == pytest.approx(ref["overall"]["vas"], rel=1e-4)
    figures = sorted(p.name for p in (out / "plots").glob("heatmap_*.png"))
    assert figures == sorted(p.name for p in (ref_out / "plots").glob("heatmap_*.png")) and len(figures) == 2


@pytest.mark.slow
def test_ray_data_eval_with_two_engines_equals_the_single_process_eval(ray_local, tiny_model_dir, bench, reference,
                                                                      tmp_path, engines_stopped):
    from avar_ray.eval import run_eval

    cfg = load_config(None, OVERRIDES + ["eval.num_engines=2", "eval.stats_workers=1"])
    results = run_eval(tiny_model_dir, bench, tmp_path, cfg)
    assert results["engines"] == 2 and results["resumed"] == 0 and "pools_s" in results["timings"]
    assert len(progress_lines(tmp_path)) == N
    assert_same_eval(tmp_path, results, *reference)
    engines_stopped(at_least=1)  # the stage's engines (the second may be killed starting: the first did all)


@pytest.mark.slow
def test_torn_progress_line_is_redone_and_the_rest_kept(tiny_model_dir, vllm_engine, bench, reference, tmp_path):
    from avar_ray.eval import run_eval

    ref_out, ref = reference
    out = tmp_path / "eval"
    shutil.copytree(ref_out, out)
    lines = progress_lines(out)
    (out / PROGRESS).write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])  # killed mid-write
    results = run_eval(tiny_model_dir, bench, out, load_config(None, OVERRIDES), llm=vllm_engine)
    assert results["resumed"] == 2
    assert progress_lines(out)[:2] == lines[:2] and len(progress_lines(out)) == N
    assert_same_eval(out, results, ref_out, ref)
    with pytest.raises(ValueError, match=r"eval.resume: .* other settings \(generation\)"):
        run_eval(tiny_model_dir, bench, out, load_config(None, OVERRIDES + ["eval.max_new_tokens=9"]), llm=vllm_engine)


@pytest.mark.slow
def test_killed_eval_resumes_without_redoing_finished_samples(tiny_model_dir, bench, tmp_path):
    """`avar eval --intervene` (transformers generation, one batch of one at a time) is
    SIGKILLed once its first samples are committed; the rerun keeps them byte for byte, does
    only the rest, and equals an uninterrupted run."""
    from avar_ray.eval import run_eval

    killed = tmp_path / "killed"
    overrides = OVERRIDES + ["eval.batch_size=1"]
    cmd = [sys.executable, "-m", "avar_ray", "eval", "--model", str(tiny_model_dir), "--bench", *map(str, bench),
           "--out", str(killed), "--intervene", "0.5,0.4", *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while len(progress_lines(killed)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"eval ended before the kill: {proc.stderr.read().decode()[-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    before = progress_lines(killed)
    assert 2 <= len(before) < N and not (killed / "results.json").exists()

    intervention = Intervention(a_img=0.5, a_sys=0.4)
    resumed = run_eval(tiny_model_dir, bench, killed, load_config(None, overrides), intervention=intervention)
    assert resumed["resumed"] == len(before) and resumed["generation"] == "transformers"
    after = progress_lines(killed)
    assert after[:len(before)] == before and len(after) == N  # finished samples not redone

    fresh = tmp_path / "fresh"
    uninterrupted = run_eval(tiny_model_dir, bench, fresh, load_config(None, overrides), intervention=intervention)
    assert uninterrupted["resumed"] == 0
    assert_same_eval(killed, resumed, fresh, uninterrupted)
