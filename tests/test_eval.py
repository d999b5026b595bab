"""`avar eval` end to end on the tiny model: benchmark files in every reader format, each with a
bad row planted; results, per-sample JSONL, report and PNGs written; bad rows counted; the
training-free intervention moves alpha_img the way it is asked to."""
from __future__ import annotations

import base64
import dataclasses
import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from avar_ray.attention import Intervention
from avar_ray.config import load_config
from avar_ray.data.procedural import generate_samples
from avar_ray.data.schema import write_parquet
from conftest import visual_tokens

OVERRIDES = ["model.max_model_len=1024", "eval.max_new_tokens=8", "eval.heatmaps=2", "eval.batch_size=4"]
# benchmark name -> the reason its planted bad row must be counted under
PLANTED = {"mathvista": "missing image", "vlmeval": "missing answer", "rows": "invalid JSON",
           "table": "prompt too long"}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write_benchmarks(root: Path) -> dict[str, Path]:
    """Two good procedural samples per file plus one bad row each."""
    s = generate_samples(8, seed=5)
    root.mkdir(parents=True, exist_ok=True)
    (root / "img").mkdir()
    files = {}

    mv = {}
    for i, smp in enumerate(s[0:2]):
        (root / "img" / f"{i}.png").write_bytes(smp.images[0])
        mc = smp.answer_type == "choice"
        mv[smp.id] = {"pid": smp.id, "question": smp.question, "image": f"img/{i}.png",
                      "question_type": "multi_choice" if mc else "free_form",
                      "answer_type": "text" if mc else smp.answer_type, "precision": None,
                      "choices": smp.choices if mc else None,
                      "answer": smp.choices["ABCD".index(smp.answer)] if mc else smp.answer}
    mv["bad"] = dict(mv[s[0].id], pid="bad", image="img/nowhere.png")
    files["mathvista"] = root / "mathvista.json"
    files["mathvista"].write_text(json.dumps(mv))

    rows = []
    for i, smp in enumerate(s[2:4]):
        row = {"index": i, "image": _b64(smp.images[0]), "question": smp.question, "answer": smp.answer}
        row.update({letter: c for letter, c in zip("ABCD", smp.choices)})
        rows.append(row)
    rows.append(dict(rows[0], index=99, answer=""))
    files["vlmeval"] = root / "vlmeval.tsv"
    pd.DataFrame(rows).to_csv(files["vlmeval"], sep="\t", index=False)

    lines = [json.dumps({"id": smp.id, "question": smp.question, "answer": smp.answer, "choices": smp.choices,
                         "image": _b64(smp.images[0])}) for smp in s[4:6]]
    lines.insert(1, '{"id": "broken", "question": ')
    files["rows"] = root / "rows.jsonl"
    files["rows"].write_text("\n".join(lines) + "\n")

    long = dataclasses.replace(s[6], id="too-long", question="circle " * 1500)
    files["table"] = write_parquet([s[6], long, s[7]], root / "table.parquet")
    return files


@pytest.fixture(scope="module")
def bench_files(tmp_path_factory) -> dict[str, Path]:
    return write_benchmarks(tmp_path_factory.mktemp("bench"))


@pytest.fixture(scope="module")
def plain_run(tiny_model_dir, vllm_engine, bench_files, tmp_path_factory):
    """The plain mode (vLLM generation) on all four files, sharing the session's engine."""
    from avar_ray.eval import run_eval

    out = tmp_path_factory.mktemp("eval_plain")
    results = run_eval(tiny_model_dir, list(bench_files.values()), out, load_config(None, OVERRIDES),
                       llm=vllm_engine, label="base")
    return out, results


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_eval_writes_results_report_and_counts_bad_rows(plain_run, tiny_model_dir):
    out, results = plain_run
    assert json.loads((out / "results.json").read_text()) == results
    assert results["generation"] == "vllm" and results["intervention"] is None and results["label"] == "base"
    assert list(results["benchmarks"]) == list(PLANTED)
    for name, reason in PLANTED.items():
        bench = results["benchmarks"][name]
        assert bench["n"] == 2, name
        assert bench["bad_rows"]["count"] == 1 and bench["bad_rows"]["reasons"] == {reason: 1}, bench["bad_rows"]
    assert results["overall"]["n"] == 8 and results["overall"]["bad_rows"]["count"] == 4

    records = _records(out)
    assert len(records) == 8
    # every benchmark image is a procedural one of the default size: one |V|, from the image processor
    n_v = visual_tokens(tiny_model_dir, generate_samples(1, seed=0)[0].images[0])
    assert results["overall"]["accuracy"] == pytest.approx(sum(r["correct"] for r in records) / 8)
    assert results["prompt_ids_mismatch"] == 0 and all(r["prompt_ids_match"] for r in records)
    for r in records:
        user, resp = r["attention"]["user"], r["attention"]["response"]
        assert 1 <= r["response_tokens"] <= 8 and resp["query_tokens"] == r["response_tokens"]
        assert user["visual_tokens"] > 0 and user["query_tokens"] > 0
        for span in (user, resp):
            assert math.isfinite(span["vas"]) and span["vas"] > 0 and 0 < span["alpha_img"] < 1
            assert span["visual_tokens"] == n_v and span["eps_img"] == pytest.approx(span["alpha_img"] / n_v)
            assert len(span["per_layer"]) == 4
        assert r["vas"] == user["vas"]

    report = (out / "report.md").read_text()
    assert "| **overall** | 8 |" in report and "missing image" in report
    pngs = re.findall(r"\]\((plots/[^)]+\.png)\)", report)
    assert {"plots/vas_distribution.png", "plots/layer_profile.png"} <= set(pngs)
    assert len([p for p in pngs if "heatmap_" in p]) == 2
    for rel in pngs:
        with Image.open(out / rel) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200


@pytest.mark.slow
def test_intervention_moves_alpha_img_as_asked(plain_run, tiny_model_dir, bench_files, tmp_path):
    from avar_ray.cli import main
    from avar_ray.eval import run_eval

    plain = {r["id"]: r for r in _records(plain_run[0]) if r["benchmark"] == "vlmeval"}
    up = tmp_path / "up"
    assert main(["eval", "--model", str(tiny_model_dir), "--bench", str(bench_files["vlmeval"]), "--out", str(up),
                 "--intervene", "0.5,0.4", *OVERRIDES]) == 0
    results = json.loads((up / "results.json").read_text())
    assert results["generation"] == "transformers"
    assert results["intervention"] == {"a_img": 0.5, "a_sys": 0.4, "layers": None}
    down = run_eval(tiny_model_dir, [bench_files["vlmeval"]], tmp_path / "down",
                    load_config(None, OVERRIDES + ["eval.heatmaps=0"]), intervention=Intervention(a_img=-0.5, a_sys=0.0))

    raised, lowered = {r["id"]: r for r in _records(up)}, {r["id"]: r for r in _records(tmp_path / "down")}
    assert set(raised) == set(lowered) == set(plain)
    for sid, base in plain.items():
        b, u, d = (x["attention"]["user"] for x in (base, raised[sid], lowered[sid]))
        # Layer 0 sees the same inputs in every mode: there the re-weighting alone acts, exactly.
        assert u["per_layer_alpha_img"][0] > b["per_layer_alpha_img"][0] > d["per_layer_alpha_img"][0]
        assert u["alpha_img"] > b["alpha_img"] > d["alpha_img"], sid
    assert results["overall"]["alpha_img"] > plain_run[1]["benchmarks"]["vlmeval"]["alpha_img"] > \
        down["overall"]["alpha_img"]
    assert (up / "report.md").read_text().count("heatmap_") >= 1


def test_eval_cli_rejects_bad_arguments(tmp_path):
    from avar_ray.cli import main
    from avar_ray.eval.benchmarks import load_benchmarks

    with pytest.raises(SystemExit, match="--intervene"):
        main(["eval", "--bench", "x.parquet", "--out", str(tmp_path), "--intervene", "0.5"])
    with pytest.raises(SystemExit, match="--intervene"):
        main(["eval", "--bench", "x.parquet", "--out", str(tmp_path), "--intervene", "0.1,1.0"])
    with pytest.raises(FileNotFoundError, match="nowhere.tsv"):
        load_benchmarks([tmp_path / "nowhere.tsv"], processor=None, system_prompt=None, max_prompt_tokens=100)


def _engine_processes() -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True) if "EngineCore" in p.name()]


@pytest.mark.slow
def test_repeated_in_process_evals_under_ray_free_their_engines(ray_local, tiny_model_dir, bench_files, tmp_path,
                                                               engines_stopped):
    """What the demo does: run_eval three times in one process with Ray initialised, each
    starting its own vLLM engine. Each must shut its engine down (no EngineCore process, no
    `vllm.LLM` object, no /dev/shm queue left behind) before returning."""
    import gc

    import vllm

    from avar_ray.eval import run_eval

    assert ray_local.is_initialized()
    cfg = load_config(None, OVERRIDES + ["eval.heatmaps=0", "eval.max_samples=1"])

    def alive() -> tuple[int, int]:
        gc.collect()
        return sum(isinstance(o, vllm.LLM) for o in gc.get_objects()), len(_engine_processes())

    before = alive()  # the session's shared engine, if another test has started it
    for k in range(2):
        results = run_eval(tiny_model_dir, [bench_files["rows"]], tmp_path / f"run{k}", cfg, label=f"run{k}")
        assert results["generation"] == "vllm" and results["overall"]["n"] == 1
        assert alive() == before, f"call {k} left a vLLM engine behind"
    engines_stopped(at_least=2)


def test_unsegmentable_response_is_skipped_and_counted(tiny_model_dir, bench_files):
    """A response holding a template token (<|im_start|> opens a turn the span finder cannot
    read) fails the attention pass for its own item only: the batch is retried item by item, the
    item is skipped and counted in its benchmark's bad rows, the rest is scored."""
    from avar_ray.eval.attention_pass import attention_rows
    from avar_ray.eval.benchmarks import load_benchmarks
    from avar_ray.eval.generation import Generation
    from avar_ray.eval.progress import item_keys
    from avar_ray.eval.runner import drop_failed
    from avar_ray.modeling import load_model, load_processor
    from avar_ray.spans import banned_token_ids

    processor = load_processor(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir)).eval()
    (bench,) = load_benchmarks([bench_files["rows"]], processor, None, 900)
    tok = processor.tokenizer
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert im_start in banned_token_ids(processor)  # banned in generation
    good = tok.encode("answer A")
    gens = [Generation(good, "answer A", "length"), Generation(good + [im_start] + good, "x", "length")]
    rows = attention_rows(model, processor, bench.items, gens, None, None, 256, batch_size=2)
    assert "error" not in rows[0] and math.isfinite(rows[0]["response"]["vas"])
    assert "unknown role header" in rows[1]["error"]
    before = bench.report.skipped
    first = bench.items[0].sample.id
    drop_failed([bench], dict(zip(item_keys(bench.items), rows)))
    assert [it.sample.id for it in bench.items] == [first]
    assert bench.report.skipped == before + 1 and bench.report.reasons["attention pass failed"] == 1
