"""Procedural tasks: determinism, coverage, answers re-derived from the scene graph, captions."""

from __future__ import annotations

import math
import re
from collections import Counter

import pyarrow.parquet as pq
import pytest

from avar_ray.data.procedural import (
    TASKS,
    anchor_phrases,
    generate_samples,
    oracle_reasoning,
    write_procedural,
)
from avar_ray.data.schema import (
    DEFAULT_INSTRUCTION,
    ImageDecodeError,
    build_messages,
    decode_image,
    encode_png,
    format_question,
    read_parquet,
    to_row,
)

N = 36  # six of each task


@pytest.fixture(scope="module")
def samples():
    return generate_samples(N, seed=11)


def _value(sample) -> str:
    """The answer as option text for choice questions, else the answer itself."""
    if sample.answer_type == "choice":
        return sample.choices["ABCD".index(sample.answer)]
    return sample.answer


def _find(objects, colour, shape):
    found = [o for o in objects if o["colour"] == colour and o["shape"] == shape]
    assert len(found) == 1, f"{colour} {shape} is not unique in the scene"
    return found[0]


def _expected(sample) -> str:
    """Re-derive the answer from the scene graph and the question text alone."""
    task, scene, q = sample.meta["task"], sample.meta["scene"], sample.question
    if task == "shape_colour":
        shape = re.fullmatch(r"What colour is the (\w+)\?", q).group(1)
        (obj,) = [o for o in scene["objects"] if o["shape"] == shape]
        return obj["colour"]
    if task == "count":
        words = re.fullmatch(r"How many (.+) are there in the image\?", q).group(1).split()
        if words[-1] == "shapes":
            hit = lambda o: o["colour"] == words[0]  # noqa: E731
        elif len(words) == 2:
            hit = lambda o: o["colour"] == words[0] and o["shape"] == words[1][:-1]  # noqa: E731
        else:
            hit = lambda o: o["shape"] == words[0][:-1]  # noqa: E731
        return str(sum(1 for o in scene["objects"] if hit(o)))
    if task == "relation":
        ca, sa, cb, sb = re.fullmatch(r"Where is the (\w+) (\w+) relative to the (\w+) (\w+)\?", q).groups()
        a, b = _find(scene["objects"], ca, sa), _find(scene["objects"], cb, sb)
        dx, dy = a["x"] - b["x"], a["y"] - b["y"]  # pixel geometry, not the grid cells
        if abs(dx) > abs(dy):
            rel = "to the left of" if dx < 0 else "to the right of"
        else:
            rel = "above" if dy < 0 else "below"
        return f"{rel} the {cb} {sb}"
    if task == "size":
        big = max(scene["objects"], key=lambda o: o["radius"])
        assert sum(o["radius"] == big["radius"] for o in scene["objects"]) == 1
        return f"the {big['colour']} {big['shape']}"
    if task == "bar_chart":
        if q == "Which bar is the tallest?":
            return max(scene["bars"], key=lambda b: b["value"])["label"]
        label = re.fullmatch(r"What is the value of bar (\w)\?", q).group(1)
        return str(next(b["value"] for b in scene["bars"] if b["label"] == label))
    if task == "triangle_angle":
        known = re.search(r"angles at (\w) and (\w)", q).groups()
        return str(180 - sum(scene["angles"][v] for v in known))
    raise AssertionError(f"unknown task {task}")


def test_same_seed_gives_identical_rows():
    a = [to_row(s) for s in generate_samples(12, seed=5)]
    b = [to_row(s) for s in generate_samples(12, seed=5)]
    assert a == b
    # Sample i does not depend on n.
    assert [to_row(s) for s in generate_samples(4, seed=5)] == a[:4]


def test_different_seeds_differ():
    a = generate_samples(6, seed=1)
    b = generate_samples(6, seed=2)
    assert [s.images for s in a] != [s.images for s in b]
    assert sum(x.images[0] != y.images[0] for x, y in zip(a, b)) >= 5


def test_tasks_are_mixed_evenly(samples):
    counts = Counter(s.meta["task"] for s in samples)
    assert set(counts) == set(TASKS) and len(TASKS) == 6
    assert set(counts.values()) == {N // len(TASKS)}
    kinds = Counter(s.answer_type for s in generate_samples(120, seed=3))
    assert set(kinds) == {"choice", "integer"} and kinds["integer"] >= 12


def test_ids_are_stable(samples):
    assert [s.id for s in samples[:3]] == ["proc-11-000000", "proc-11-000001", "proc-11-000002"]


@pytest.mark.parametrize("seed", [0, 11, 12345])
def test_answers_match_scene_graph(seed):
    for sample in generate_samples(N, seed=seed):
        assert _value(sample) == _expected(sample), (sample.id, sample.question)


def test_choices_are_letters_in_range(samples):
    choice = [s for s in samples if s.answer_type == "choice"]
    assert len(choice) >= N // 2
    for s in choice:
        assert len(s.choices) == 4 and len(set(s.choices)) == 4, s.choices
        assert s.answer in "ABCD"
    for s in samples:
        if s.answer_type == "integer":
            assert s.choices == [] and int(s.answer) >= 0


def test_triangle_geometry_has_the_stated_angles():
    tris = [s for s in generate_samples(60, seed=4) if s.meta["task"] == "triangle_angle"]
    assert tris
    for s in tris:
        scene = s.meta["scene"]
        assert sum(scene["angles"].values()) == 180
        v = scene["vertices"]
        for name, (x, y) in v.items():
            (ax, ay), (bx, by) = [v[o] for o in v if o != name]
            ang = math.degrees(abs(math.atan2(ay - y, ax - x) - math.atan2(by - y, bx - x)))
            ang = min(ang, 360 - ang)
            assert abs(ang - scene["angles"][name]) < 2.5, (s.id, name, ang)


def test_images_decode_at_the_right_size(samples):
    for s in samples:
        assert len(s.images) == 1
        img = decode_image(s.images[0])
        assert img.size == (112, 112) and img.mode == "RGB"
        # Not a blank canvas: the shapes/chart are drawn.
        assert len(img.getcolors(maxcolors=1 << 16)) > 2
    big = generate_samples(6, seed=0, image_size=224)
    assert all(decode_image(s.images[0]).size == (224, 224) for s in big)


def test_caption_has_four_parts_in_order(samples):
    heads = ["Global scan:", "Elements:", "Relations:", "Synthesis:"]
    for s in samples:
        cap = s.meta["caption"]
        pos = [cap.find(h) for h in heads]
        assert all(p >= 0 for p in pos) and pos == sorted(pos), cap
        assert cap.startswith("Global scan:")
        assert isinstance(s.meta["scene"], dict)


def test_caption_names_every_element(samples):
    for s in samples:
        scene, cap = s.meta["scene"], s.meta["caption"]
        if scene["kind"] == "shapes":
            for o in scene["objects"]:
                assert f"{o['colour']} {o['shape']} at the {o['position']}" in cap
        elif scene["kind"] == "bar_chart":
            for b in scene["bars"]:
                assert f"bar {b['label']} is {b['colour']} and reaches {b['value']}" in cap


def test_oracle_reasoning_ends_with_the_answer(samples):
    for s in samples:
        text = oracle_reasoning(s)
        assert text.endswith(f"The answer is {s.answer}."), text
        assert len(text) > 80


def test_anchor_phrases_name_scene_elements(samples):
    for s in samples:
        phrases = anchor_phrases(s)
        assert phrases and all(p.endswith(".") for p in phrases)
        joined = " ".join(phrases)
        scene = s.meta["scene"]
        if scene["kind"] == "shapes":
            for o in scene["objects"]:
                assert f"{o['colour']} {o['shape']}" in joined
        elif scene["kind"] == "bar_chart":
            assert all(f"bar {b['label']}" in joined for b in scene["bars"])
        else:
            assert all(f"corner {v}" in joined for v in "PQR")


def test_write_procedural_round_trips(tmp_path, capsys):
    path = write_procedural(tmp_path, n=12, seed=9, split_name="val")
    assert path == tmp_path / "val.parquet"
    assert "12 rows" in capsys.readouterr().out
    assert read_parquet(path) == generate_samples(12, seed=9)
    again = write_procedural(tmp_path / "b", n=12, seed=9, split_name="val")
    assert pq.read_table(path).to_pylist() == pq.read_table(again).to_pylist()


def test_messages_and_question_format(samples):
    s = next(x for x in samples if x.answer_type == "choice")
    text = format_question(s)
    assert text.splitlines()[1:] == [f"{L}. {c}" for L, c in zip("ABCD", s.choices)]
    msgs = build_messages(s)
    assert [m["role"] for m in msgs] == ["user"]
    content = msgs[0]["content"]
    assert content[0] == {"type": "image"} and content[-1]["type"] == "text"
    assert content[-1]["text"] == f"{text}\n{DEFAULT_INSTRUCTION}"
    msgs = build_messages(s, system_prompt="sys")
    assert msgs[0] == {"role": "system", "content": "sys"}


def test_decode_image_rejects_bad_input(samples):
    with pytest.raises(ImageDecodeError, match="cannot decode"):
        decode_image(b"not an image at all")
    with pytest.raises(ImageDecodeError):
        decode_image(samples[0].images[0][:60])  # truncated PNG
    with pytest.raises(ImageDecodeError, match="exceeds"):
        decode_image(samples[0].images[0], max_pixels=100)
    assert decode_image(encode_png(decode_image(samples[0].images[0]))).size == (112, 112)


def test_short_chains_verify_and_are_short(samples):
    from avar_ray.synth.verify import verify

    for s in samples:
        short = oracle_reasoning(s, "short")
        value = s.choices[ord(s.answer) - ord("A")] if s.answer_type == "choice" else s.answer
        assert short.endswith(f"The answer is {value}."), short  # choices: the option's text
        assert len(short) < len(oracle_reasoning(s, "full")) and len(short) < 160
        assert verify(s, short).target is not None  # the synthesis check accepts it
    marked = generate_samples(6, seed=3, chain="short")
    assert all(oracle_reasoning(s) == oracle_reasoning(s, "short") for s in marked)  # meta.chain picks the style
    with pytest.raises(ValueError, match="chain must be one of"):
        generate_samples(1, seed=0, chain="long")


def test_easy_tasks_are_drawn_on_request_and_verify():
    from avar_ray.data.procedural import EASY_TASKS
    from avar_ray.synth.verify import verify

    rows = generate_samples(40, seed=5, chain="short", tasks=EASY_TASKS)
    assert {s.meta["task"] for s in rows} == set(EASY_TASKS)
    for s in rows:
        assert verify(s, oracle_reasoning(s, "short")).target is not None
        assert verify(s, oracle_reasoning(s, "full")).target is not None
    big = next(s for s in rows if s.meta["task"] == "largest_colour")
    sizes = [o["size"] for o in big.meta["scene"]["objects"]]
    assert sizes.count("large") == 1
    assert generate_samples(6, seed=5)[0].meta["task"] in TASKS  # the default mix is unchanged
    with pytest.raises(ValueError, match="unknown procedural task"):
        generate_samples(2, seed=5, tasks=["no_such_task"])
