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
    from avar_ray.data.readers import read_samples
    from avar_ray.data.schema import build_messages, pil_images
    from avar_ray.modeling import load_processor

    rows = _rows(out / "vas.jsonl")
    assert len(rows) == 3
    processor = load_processor(str(tiny_model_dir))
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for row, sample in zip(rows, read_samples(procedural_parquet)[0]):
        assert {"id", "vas", "alpha_img", "eps_img", "alpha_sys", "per_layer", "band"} <= set(row)
        assert len(row["per_layer"]) == 4 and row["vas"] > 0 and row["alpha_img"] > 0
        text = processor.apply_chat_template(build_messages(sample), tokenize=False, add_generation_prompt=True)
        n_v = int((processor(text=[text], images=pil_images(sample), return_tensors="pt")["input_ids"] == image_pad).sum())
        assert row["id"] == sample.id and row["visual_tokens"] == n_v > 0  # |V| from the ids
        assert row["eps_img"] == pytest.approx(row["alpha_img"] / n_v)
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


def test_vas_cli_intervention_equals_eager_attention_with_the_bias(tiny_model_dir, procedural_parquet, tmp_path):
    """``--intervention`` changes the measured VAS by what eager attention with SPEC.md §2's bias
    gives: weights times ``1 + a_img M_V - a_sys M_S`` per key, renormalised, on the intervened
    layers (tests/test_attention.py's reference implementation); VAS = the mean over layers,
    heads and question tokens of mass(V) / mass(S). eps_img against |V| counted from the ids."""
    import torch
    from test_attention import REF_IMPL, _register_reference, eager_masses  # noqa: E402 - tests/ on sys.path

    from avar_ray.data.readers import read_samples
    from avar_ray.data.schema import build_messages, pil_images
    from avar_ray.modeling import encode_batch, load_model, load_processor

    a_img, a_sys, layers = 0.5, 0.3, (0, 2)
    runs = {}
    for name, extra in (("plain", []), ("bias", ["--intervention", "--a-img", str(a_img), "--a-sys", str(a_sys),
                                                 "--intervention-layers", "0,2"])):
        assert main(["vas", "--model", str(tiny_model_dir), "--data", str(procedural_parquet), "--query", "user",
                     "--out", str(tmp_path / name), "--limit", "2", *extra]) == 0
        runs[name] = _rows(tmp_path / name / "vas.jsonl")
    _register_reference()
    processor = load_processor(str(tiny_model_dir))
    ref = load_model(str(tiny_model_dir), attn_implementation=REF_IMPL).eval()
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for sample, plain, bias in zip(read_samples(procedural_parquet)[0][:2], runs["plain"], runs["bias"]):
        enc = encode_batch(processor, [build_messages(sample)], [pil_images(sample)])
        q = enc.spans.query("user")[0]
        weight = 1.0 + a_img * enc.spans.visual.float() - a_sys * enc.spans.system.float()
        expected = {}
        for name, kwargs in (("plain", {}), ("bias", {"ref_reweight": weight, "ref_layers": layers})):
            with torch.no_grad():
                attentions = ref(**enc.inputs, output_attentions=True, **kwargs).attentions
            mv, ms = eager_masses(attentions, enc.spans, "user")
            expected[name] = float((mv[0][..., q] / ms[0][..., q]).mean())
        assert plain["vas"] == pytest.approx(expected["plain"], rel=1e-4)
        assert bias["vas"] == pytest.approx(expected["bias"], rel=1e-4)
        assert abs(expected["bias"] - expected["plain"]) > 0.05 * expected["plain"]  # the bias matters here
        n_v = int((enc.inputs["input_ids"][0] == image_pad).sum())
        assert bias["visual_tokens"] == n_v > 0 and bias["eps_img"] == pytest.approx(bias["alpha_img"] / n_v)


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
