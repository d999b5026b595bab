"""Benchmark readers: good rows load with the right fields, planted bad rows are counted."""

from __future__ import annotations

import base64
import io
import json
import logging
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from avar_ray.data.procedural import generate_samples, write_procedural
from avar_ray.data.readers import read_mathvista, read_samples, read_vlmeval_tsv
from avar_ray.data.schema import decode_image


def _png(colour: tuple[int, int, int], size: int = 24, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), colour if mode == "RGB" else colour + (255,)).save(buf, "PNG")
    return buf.getvalue()


RED, GREEN, BLUE = _png((255, 0, 0)), _png((0, 255, 0)), _png((0, 0, 255), size=30)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---------------------------------------------------------------- MathVista


def _mathvista_rows() -> dict[str, dict]:
    base = {"question_type": "free_form", "precision": None, "choices": None,
            "metadata": {"split": "testmini", "source": "unit"}}
    rows = {
        "1": dict(base, pid="1", question="Which number is the largest?", image="images/1.png",
                  question_type="multi_choice", answer_type="text", choices=["3", "4", "5", "6"],
                  answer="5", query="Hint: ... Which number is the largest?"),
        "2": dict(base, pid="2", question="How many apples?", image="images/2.png",
                  answer_type="integer", answer="12", query="q2"),
        "3": dict(base, pid="3", question="What is the slope?", image="images/3.png",
                  answer_type="float", answer="1.25", precision=2.0, query="q3"),
        "4": dict(base, pid="4", question="Missing file", image="images/missing.png",
                  answer_type="integer", answer="1"),
        "5": dict(base, pid="5", question="Corrupt file", image="images/bad.png",
                  answer_type="integer", answer="2"),
        "6": dict(base, pid="6", question="No answer", image="images/1.png",
                  answer_type="integer", answer=""),
        "7": dict(base, pid="7", question="A list answer", image="images/1.png",
                  answer_type="list", answer="[1, 2]"),
        "8": dict(base, pid="8", question="Name the colour.", image="images/none.png",
                  decoded_image=_b64(BLUE), answer_type="text", answer="blue"),
    }
    return rows


PLANTED = {"4": "missing image", "5": "corrupt image", "6": "missing answer",
           "7": "unsupported answer_type"}


def _write_mathvista(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "images" / "1.png").write_bytes(RED)
    (root / "images" / "2.png").write_bytes(GREEN)
    (root / "images" / "3.png").write_bytes(_png((9, 9, 9), mode="RGBA"))
    (root / "images" / "bad.png").write_bytes(RED[:40] + b"\x00garbage" * 8)
    path = root / "testmini.json"
    path.write_text(json.dumps(_mathvista_rows()))
    return path


def test_mathvista_good_rows(tmp_path):
    samples, report = read_mathvista(_write_mathvista(tmp_path))
    by_id = {s.id: s for s in samples}
    assert sorted(by_id) == ["1", "2", "3", "8"]
    mc = by_id["1"]
    assert (mc.answer_type, mc.answer, mc.choices) == ("choice", "C", ["3", "4", "5", "6"])
    assert mc.meta["pid"] == "1" and mc.meta["question_type"] == "multi_choice"
    assert mc.meta["query"].startswith("Hint:") and mc.meta["answer_text"] == "5"
    assert mc.images == [RED] and mc.source == "mathvista"
    assert (by_id["2"].answer_type, by_id["2"].answer, by_id["2"].precision) == ("integer", "12", None)
    assert (by_id["3"].answer_type, by_id["3"].answer, by_id["3"].precision) == ("float", "1.25", 2)
    assert decode_image(by_id["3"].images[0]).getpixel((0, 0)) == (9, 9, 9)
    # decoded_image wins over the (missing) image path.
    assert by_id["8"].images == [BLUE] and by_id["8"].answer_type == "text"
    assert report.loaded == 4


def test_mathvista_bad_rows_are_counted(tmp_path, caplog):
    path = _write_mathvista(tmp_path)
    with caplog.at_level(logging.WARNING, logger="avar_ray.data"):
        _, report = read_mathvista(path)
    assert report.skipped == 4
    assert report.reasons == Counter(PLANTED.values())
    assert {row: reason.split(":")[0] for _, row, reason in report.bad_rows} == PLANTED
    assert all(file == str(path) for file, _, _ in report.bad_rows)
    assert "missing.png" in dict((r, why) for _, r, why in report.bad_rows)["4"]
    for row in PLANTED:
        assert any(str(path) in m and f"row {row} " in m for m in caplog.messages), row
    assert "loaded 4, skipped 4" in str(report)


def test_mathvista_image_root_and_jsonl(tmp_path):
    _write_mathvista(tmp_path / "data")
    rows = _mathvista_rows()
    jsonl = tmp_path / "elsewhere" / "mv.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text("\n".join(json.dumps(rows[k]) for k in ("1", "2", "4")) + "\n{oops\n")
    # Without the root the relative paths do not resolve.
    samples, report = read_samples(jsonl)
    assert samples == [] and report.reasons["missing image"] == 3
    samples, report = read_samples(jsonl, image_root=tmp_path / "data")
    assert [s.id for s in samples] == ["1", "2"]
    assert report.reasons == Counter({"missing image": 1, "invalid JSON": 1})
    assert ("line 4" in {r for _, r, _ in report.bad_rows})


# ---------------------------------------------------------------- VLMEvalKit TSV


def _write_tsv(path: Path) -> Path:
    nan = float("nan")
    good = _b64(GREEN)
    rows = [
        dict(index=10, image=_b64(RED), question="What colour is it?", hint="It is bright.",
             A="red", B="blue", C="green", D="None", answer="A", category="colour"),
        dict(index=11, image="10", question="Is it red?", hint=nan, A="yes", B="no", C=nan, D=nan,
             answer="A", category="colour"),
        dict(index=12, image=good, question="How many?", hint=nan, A=nan, B=nan, C=nan, D=nan,
             answer="42", category="count"),
        dict(index=13, image=good, question="Ratio?", hint=nan, A=nan, B=nan, C=nan, D=nan,
             answer="3.5", category="math"),
        dict(index=14, image=good[:100] + "!!corrupt!!" + good[100:], question="Broken image",
             hint=nan, A="x", B="y", C=nan, D=nan, answer="A", category="bad"),
        dict(index=15, image=good, question="No answer", hint=nan, A="x", B="y", C=nan, D=nan,
             answer=nan, category="bad"),
    ]
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def test_vlmeval_tsv(tmp_path, caplog):
    path = _write_tsv(tmp_path / "MMStar.tsv")
    with caplog.at_level(logging.WARNING, logger="avar_ray.data"):
        samples, report = read_vlmeval_tsv(path)
    by_id = {s.id: s for s in samples}
    assert sorted(by_id) == ["10", "11", "12", "13"]
    first = by_id["10"]
    assert first.choices == ["red", "blue", "green", "None"]  # "None" is an option text, not NaN
    assert (first.answer_type, first.answer) == ("choice", "A")
    assert first.question == "Hint: It is bright.\nWhat colour is it?"
    assert first.meta["category"] == "colour" and first.meta["hint"] == "It is bright."
    assert first.source == "MMStar" and first.images == [RED]
    second = by_id["11"]
    assert second.images == [RED]  # image "10" refers to row 10's image
    assert (second.choices, second.answer) == (["yes", "no"], "A")
    assert (by_id["12"].answer_type, by_id["12"].answer, by_id["12"].choices) == ("integer", "42", [])
    assert (by_id["13"].answer_type, by_id["13"].precision) == ("float", 1)
    assert report.loaded == 4 and report.skipped == 2
    assert report.reasons == Counter({"corrupt image": 1, "missing answer": 1})
    assert sorted((f, r, why.split(":")[0]) for f, r, why in report.bad_rows) == [
        (str(path), "14", "corrupt image"), (str(path), "15", "missing answer")]
    assert any("MMStar.tsv" in m and "row 14" in m for m in caplog.messages)


def test_vlmeval_answer_must_be_an_option(tmp_path):
    path = tmp_path / "x.tsv"
    pd.DataFrame([dict(index=0, image=_b64(RED), question="q", A="a", B="b", answer="E")]).to_csv(
        path, sep="\t", index=False)
    samples, report = read_samples(path)
    assert samples == [] and report.reasons == Counter({"answer not among choices": 1})


# ---------------------------------------------------------------- tables and dispatch


def test_parquet_and_plain_jsonl(tmp_path):
    path = write_procedural(tmp_path, n=6, seed=2)
    samples, report = read_samples(path)
    assert samples == generate_samples(6, seed=2) and report.skipped == 0
    (tmp_path / "img.png").write_bytes(GREEN)
    rows = [{"id": "a", "question": "Colour?", "answer": "green", "image_path": "img.png",
             "choices": ["red", "green"]},
            {"question": "Count?", "answer": "7", "image": _b64(RED)},
            {"question": "Count?", "answer": "7"}]
    jsonl = tmp_path / "plain.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    samples, report = read_samples(jsonl)
    assert [(s.id, s.answer_type, s.answer) for s in samples] == [
        ("a", "choice", "B"), ("plain-line 2", "integer", "7")]
    assert samples[0].images == [GREEN] and samples[1].images == [RED]
    assert report.bad_rows == [(str(jsonl), "line 3", report.bad_rows[0][2])]
    assert report.reasons == Counter({"missing image": 1})


def test_unreadable_files_raise_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        read_samples(tmp_path / "nothere.json")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("this is not json")
    with pytest.raises(ValueError, match="bad.json"):
        read_samples(bad_json)
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"PAR1 nope")
    with pytest.raises(ValueError, match="bad.parquet"):
        read_samples(bad_parquet)
    not_vlmeval = tmp_path / "t.tsv"
    not_vlmeval.write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="t.tsv"):
        read_samples(not_vlmeval)
    other = tmp_path / "x.csv"
    other.write_text("a,b\n")
    with pytest.raises(ValueError, match="x.csv"):
        read_samples(other)


def test_mathvista_hf_parquet(tmp_path):
    """MathVista's HF release: Parquet with decoded_image structs and option-text answers."""
    rows = _mathvista_rows()
    table = []
    for key in ("1", "2", "6"):
        row = dict(rows[key], decoded_image={"bytes": GREEN, "path": None})
        row["choices"] = row["choices"] or None
        row["metadata"] = json.dumps(row["metadata"])
        table.append(row)
    path = tmp_path / "testmini.parquet"
    pd.DataFrame(table).to_parquet(path)
    samples, report = read_samples(path)
    assert [(s.id, s.answer_type, s.answer) for s in samples] == [("1", "choice", "C"),
                                                                   ("2", "integer", "12")]
    assert samples[0].images == [GREEN] and samples[0].source == "mathvista"
    assert report.reasons == Counter({"missing answer": 1})
