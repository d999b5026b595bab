"""``avar vas`` end to end on the tiny model and procedural data."""
from __future__ import annotations

import json

import pytest

from avar_ray.cli import main


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_vas_cli_user_query(tiny_model_dir, procedural_parquet, tmp_path):
    out = tmp_path / "vas_user"
    assert main(["vas", "--model", str(tiny_model_dir), "--data", str(procedural_parquet), "--query", "user",
                 "--out", str(out), "--limit", "3", "--batch-size", "2"]) == 0
    rows = _rows(out / "vas.jsonl")
    assert len(rows) == 3
    for row in rows:
        assert {"id", "vas", "alpha_img", "eps_img", "alpha_sys", "per_layer", "band"} <= set(row)
        assert len(row["per_layer"]) == 4 and row["vas"] > 0 and row["alpha_img"] > 0
        assert row["eps_img"] == pytest.approx(row["alpha_img"] / row["visual_tokens"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 3 and summary["band"] in ("narrow", "wide", "panoramic")
    assert summary["vas"] == pytest.approx(sum(r["vas"] for r in rows) / 3)
    assert len(summary["per_layer_mean"]) == 4 and len(summary["per_layer_std"]) == 4
    assert (out / "vas_profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vas_cli_response_query(tiny_model_dir, procedural_parquet, tmp_path):
    # generated responses (greedy), with the intervention on two layers
    out = tmp_path / "vas_gen"
    assert main(["vas", "--model", str(tiny_model_dir), "--data", str(procedural_parquet), "--query", "response",
                 "--out", str(out), "--limit", "2", "--max-new-tokens", "4", "--intervention",
                 "--intervention-layers", "0,2", "--layers", "1,3"]) == 0
    rows = _rows(out / "vas.jsonl")
    assert [r["response_source"] for r in rows] == ["generated", "generated"]
    assert all(r["layers"] == [1, 3] and 1 <= r["query_tokens"] <= 4 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["intervention"] == {"a_img": 0.15, "a_sys": 0.4, "layers": [0, 2]}
    # responses from a file
    responses = tmp_path / "responses.jsonl"
    responses.write_text("".join(json.dumps({"id": r["id"], "response": "<think>look</think><answer>A</answer>"}) + "\n"
                                 for r in rows) + "{not json\n")  # a corrupt row: skipped and counted
    out2 = tmp_path / "vas_file"
    assert main(["vas", "--model", str(tiny_model_dir), "--data", str(procedural_parquet), "--query", "response",
                 "--out", str(out2), "--limit", "2", "--responses", str(responses), "--method", "chunked"]) == 0
    rows2 = _rows(out2 / "vas.jsonl")
    assert [r["response_source"] for r in rows2] == ["file", "file"]
    assert all(r["vas"] > 0 for r in rows2)
    assert json.loads((out2 / "summary.json").read_text())["responses_skipped"] == 1


@pytest.mark.parametrize("extra, message", [
    (["--intervention", "--a-sys", "1"], "a_sys"),
    (["--layers", "9"], "--layers: layer 9 out of range"),
    (["--layers", "one"], "--layers must be"),
])
def test_vas_cli_bad_options(tiny_model_dir, procedural_parquet, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        main(["vas", "--model", str(tiny_model_dir), "--data", str(procedural_parquet), "--out", str(tmp_path / "x"),
              "--limit", "1"] + extra)


def test_vas_cli_qwen3_vl_needs_a_system_prompt(tiny_qwen3_vl_dir, procedural_parquet, tmp_path):
    """Qwen3-VL's template adds no system turn: `avar vas` stops with the fix instead of writing
    inf; with a system prompt the same call measures a finite VAS."""
    args = ["vas", "--model", str(tiny_qwen3_vl_dir), "--data", str(procedural_parquet), "--limit", "2"]
    with pytest.raises(SystemExit, match="VAS needs a system prompt: set model.system_prompt .*--system-prompt"):
        main(args + ["--out", str(tmp_path / "none")])
    assert not (tmp_path / "none" / "vas.jsonl").exists()
    out = tmp_path / "sys"
    assert main(args + ["--out", str(out), "--system-prompt", "You are a helpful assistant."]) == 0
    rows = _rows(out / "vas.jsonl")
    assert len(rows) == 2 and all(0 < r["vas"] < float("inf") and r["alpha_sys"] > 0 for r in rows)
