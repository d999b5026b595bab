"""The real job's data (EasyR1/verl form): files the tests write in Geometry3K's layout (EasyR1's
hiyouga/geometry3k: ``images`` of {bytes, path} structs, ``problem`` with an ``<image>``
placeholder, ``answer``) and ViRL39K's (``question`` with placeholders, ``answer``, ``image`` as
a list of paths relative to the file), read through ``data.prompt_key`` / ``answer_key`` /
``image_key`` from a folder of Parquet shards, a glob, JSONL and an HF ``datasets`` directory;
bad rows are counted with their file and row; ``<image>`` puts each image where it stands."""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from avar_ray.config import load_config
from avar_ray.data.readers import DataKeys, read_samples
from avar_ray.data.schema import Sample, build_messages
from avar_ray.rl.prompts import require_images


def _png(colour: tuple[int, int, int], size: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "PNG")
    return buf.getvalue()


RED, GREEN, BLUE = _png((255, 0, 0)), _png((0, 255, 0)), _png((0, 0, 255))
REPO = Path(__file__).resolve().parents[1]
CORRUPT = RED[:30] + b"\x00not a png" * 4
GEO_KEYS = DataKeys.of(load_config(None, ["data.prompt_key=problem"]).data)
VIRL_KEYS = DataKeys.of(load_config(None, ["data.image_key=image"]).data)

# ---------------------------------------------------------------- Geometry3K (EasyR1)

GEO_ROWS = [
    [{"images": [{"bytes": RED, "path": None}], "problem": "<image>Find x. Round to the nearest tenth.",
      "answer": "5.8"},
     {"images": [{"bytes": GREEN, "path": None}], "problem": "<image>Find the measure of angle 1.",
      "answer": "113"},
     {"images": [{"bytes": CORRUPT, "path": None}], "problem": "<image>Find y.", "answer": "4"}],  # corrupt image
    [{"images": [{"bytes": BLUE, "path": None}], "problem": "Find $m \\angle 2$. <image>",
      "answer": "3 \\sqrt { 2 }"},
     {"images": [{"bytes": RED, "path": None}], "problem": "<image>Find z.", "answer": None},  # no answer
     {"images": [{"bytes": RED, "path": None}], "problem": "<image> and <image>: find x.", "answer": "2"}],
]
GEO_BAD = {("train-00000-of-00002", "2"): "corrupt image", ("train-00001-of-00002", "1"): "missing answer",
           ("train-00001-of-00002", "2"): "image placeholders"}


def _write_geometry3k(root: Path) -> Path:
    root.mkdir(parents=True)
    for i, rows in enumerate(GEO_ROWS):
        pq.write_table(pa.Table.from_pylist(rows), root / f"train-{i:05d}-of-00002.parquet")
    (root / "README.md").write_text("not data")  # ignored: a folder's shards are its .parquet/.jsonl files
    return root


def _bad(report) -> dict:
    return {(Path(f).stem, row): why.split(":")[0] for f, row, why in report.bad_rows}


def _check_geometry3k(samples: list[Sample], report, prefix: str) -> None:
    assert [(s.answer, s.answer_type) for s in samples] == [("5.8", "float"), ("113", "integer"),
                                                            ("3 \\sqrt { 2 }", "text")]
    assert [s.images for s in samples] == [[RED], [GREEN], [BLUE]]
    assert samples[0].id == f"{prefix}-0" and samples[0].question.startswith("<image>Find x")
    assert report.loaded == 3 and report.skipped == 3
    assert report.reasons == Counter(GEO_BAD.values())


def test_geometry3k_folder_and_glob_of_parquet_shards(tmp_path, caplog):
    root = _write_geometry3k(tmp_path / "geometry3k")
    samples, report = read_samples(root, keys=GEO_KEYS)
    _check_geometry3k(samples, report, "train-00000-of-00002")
    assert _bad(report) == GEO_BAD  # each bad row named by its shard and row
    assert any("train-00001-of-00002.parquet" in m and "row 1 " in m for m in caplog.messages)
    by_glob, glob_report = read_samples(str(root / "train-*.parquet"), keys=GEO_KEYS)
    assert by_glob == samples and _bad(glob_report) == GEO_BAD
    # Without the key the prompt column is not found: every row is a bad row, named.
    none, default_report = read_samples(root)
    assert none == [] and default_report.reasons == Counter({"missing question": 6})


def test_geometry3k_as_a_datasets_save_to_disk_directory(tmp_path):
    rows = [r for shard in GEO_ROWS for r in shard]
    out = tmp_path / "geo_hf"
    try:
        import datasets
    except ImportError:  # the layout save_to_disk writes: Arrow stream files listed in state.json
        out.mkdir()
        table = pa.Table.from_pylist(rows)
        names = []
        for i, part in enumerate((table.slice(0, 4), table.slice(4))):
            names.append(f"data-{i:05d}-of-00002.arrow")
            with pa.OSFile(str(out / names[-1]), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(part)
        (out / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                    "_fingerprint": "0", "_split": None}))
        (out / "dataset_info.json").write_text(json.dumps({"features": {}}))
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(out), num_shards=2)
    samples, report = read_samples(out, keys=GEO_KEYS)
    assert [s.images for s in samples] == [[RED], [GREEN], [BLUE]]
    assert report.loaded == 3 and report.reasons == Counter(GEO_BAD.values())
    assert {Path(f).parent for f, _, _ in report.bad_rows} == {out}
    dict_dir = tmp_path / "dd"
    dict_dir.mkdir()
    (dict_dir / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(ValueError, match="DatasetDict"):
        read_samples(dict_dir)


# ---------------------------------------------------------------- ViRL39K


def _write_virl(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    for name, data in (("a.png", RED), ("b.png", GREEN), ("c.png", BLUE), ("bad.png", CORRUPT)):
        (root / "images" / name).write_bytes(data)
    rows = [
        {"qid": "q1", "question": "<image>Which shape is red?\nChoices:\nA: circle\nB: square", "answer": "\\boxed{B}",
         "image": ["images/a.png"], "category": "(GradeSchool) Geometric", "source": "unit", "PassRate_7BTrained": 0.5},
        {"qid": "q2", "question": "Compare <image> and <image>: how many sides in total?", "answer": "\\boxed{12}",
         "image": ["images/b.png", "images/c.png"], "category": "(GradeSchool) Geometric", "source": "unit",
         "PassRate_7BTrained": 0.25},
        {"qid": "q3", "question": "<image>Missing file", "answer": "1", "image": ["images/gone.png"]},
        {"qid": "q4", "question": None, "answer": "1", "image": ["images/a.png"]},
        {"qid": "q5", "question": "<image>Corrupt", "answer": "1", "image": ["images/bad.png"]},
        {"qid": "q6", "question": "A text-only question", "answer": "1", "image": []},
    ]
    path = root / "39Krelease.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pq.write_table(pa.Table.from_pylist(rows[:2]), root / "39Krelease.parquet")
    return path


def test_virl39k_jsonl_with_relative_image_paths(tmp_path):
    path = _write_virl(tmp_path / "virl")
    samples, report = read_samples(path, keys=VIRL_KEYS)
    assert [(s.answer, s.answer_type, s.images) for s in samples] == [("B", "text", [RED]),
                                                                      ("12", "integer", [GREEN, BLUE])]
    assert samples[0].meta["qid"] == "q1" and samples[0].meta["category"] == "(GradeSchool) Geometric"
    assert _bad(report) == {("39Krelease", "line 3"): "missing image", ("39Krelease", "line 4"): "missing question",
                            ("39Krelease", "line 5"): "corrupt image", ("39Krelease", "line 6"): "missing image"}
    assert "text-only" in dict(((r, why) for _, r, why in report.bad_rows))["line 6"]
    parquet, parquet_report = read_samples(path.with_suffix(".parquet"), keys=VIRL_KEYS)
    assert [(s.question, s.answer, s.images) for s in parquet] == [(s.question, s.answer, s.images) for s in samples]
    assert parquet_report.skipped == 0


def test_image_placeholders_put_each_image_where_it_stands(tmp_path, tiny_model_dir):
    from avar_ray.modeling import load_processor

    samples, _ = read_samples(_write_virl(tmp_path / "virl"), keys=VIRL_KEYS)
    content = build_messages(samples[1])[-1]["content"]
    assert [part["type"] for part in content] == ["text", "image", "text", "image", "text"]
    assert content[0]["text"] == "Compare " and content[2]["text"] == " and "
    assert "<image>" not in json.dumps(content)
    # The chat template (an independent reader of the parts) renders the vision blocks in place.
    text = load_processor(str(tiny_model_dir)).apply_chat_template(build_messages(samples[1]), tokenize=False,
                                                                  add_generation_prompt=True)
    block = "<|vision_start|><|image_pad|><|vision_end|>"
    assert f"Compare {block} and {block}: how many sides" in text
    # A leading placeholder gives this project's own layout (images, then the text): same prompt.
    lead = samples[0]
    plain = Sample(lead.id, lead.question.replace("<image>", ""), lead.answer, lead.answer_type, lead.images)
    assert build_messages(lead) == build_messages(plain)


def test_rl_prompts_from_a_shard_folder_through_the_config_keys(tmp_path, tiny_model_dir):
    from avar_ray.rl.prompts import load_prompts

    root = _write_geometry3k(tmp_path / "geometry3k")
    cfg = load_config(REPO / "configs" / "tiny_local.yaml",
                      [f"data.train={root}", "data.prompt_key=problem", f"model.path={tiny_model_dir}"])
    prompts = load_prompts(cfg)
    assert [s.answer for s in prompts.samples] == ["5.8", "113", "3 \\sqrt { 2 }"] and prompts.bad_rows == 3
    with pytest.raises(FileNotFoundError, match="data.train"):
        load_prompts(load_config(REPO / "configs" / "tiny_local.yaml", [f"data.train={tmp_path / 'none-*.parquet'}"]))


def test_rl_refuses_text_only_prompts_naming_them():
    sample = Sample("t1", "no image here", "1", "integer", [])
    with pytest.raises(ValueError, match=r"text-only prompts .*'t1'"):
        require_images([sample])
    require_images([Sample("v1", "<image>", "1", "integer", [RED])])  # an image: accepted


def test_missing_sources_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        read_samples(tmp_path / "nothing_here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        read_samples(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"shard-\*"):
        read_samples(str(tmp_path / "shard-*.parquet"))
