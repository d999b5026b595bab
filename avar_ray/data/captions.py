"""Text written from a scene graph: the oracle VARD caption, a caption-grounded reasoning chain
and visual-anchor phrases. Everything here reads the scene, so it is true by construction."""

from __future__ import annotations

from collections import Counter
from typing import Any

from avar_ray.data.scenes import RELATIONS, object_name, plural, relation_between
from avar_ray.data.schema import Sample

# ---------------------------------------------------------------- naming


def _names(objects: list[dict[str, Any]]) -> dict[int, str]:
    """Short name per object; the grid position is added only where the short name repeats."""
    counts = Counter(object_name(o) for o in objects)
    return {
        o["id"]: f"{object_name(o)}" if counts[object_name(o)] == 1
        else f"{object_name(o)} at the {o['position']}"
        for o in objects
    }


def _reading_order(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(objects, key=lambda o: (o["row"], o["col"]))


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _tally(objects: list[dict[str, Any]], key: str) -> str:
    counts = Counter(o[key] for o in objects)
    if key == "shape":
        return _join([f"{n} {plural(s, n)}" for s, n in sorted(counts.items())])
    return _join([f"{n} {c}" for c, n in sorted(counts.items())])


def _full_relation(a: dict[str, Any], b: dict[str, Any]) -> str:
    parts = []
    if a["col"] != b["col"]:
        parts.append(RELATIONS[0] if a["col"] < b["col"] else RELATIONS[1])
    if a["row"] != b["row"]:
        parts.append(RELATIONS[2] if a["row"] < b["row"] else RELATIONS[3])
    return " and ".join(parts)


# ---------------------------------------------------------------- captions


def _shapes_caption(scene: dict[str, Any]) -> list[str]:
    objs = _reading_order(scene["objects"])
    names = _names(objs)
    n = len(objs)
    glob = (f"A {scene['width']}x{scene['height']} image with a plain white background showing "
            f"{n} simple flat {plural('shape', n)} ({_tally(objs, 'shape')}) spread over a "
            f"3x3 layout.")
    elems = "; ".join(f"a {o['size']} {o['colour']} {o['shape']} at the {o['position']}"
                      for o in objs) + "."
    rels = [f"the {names[a['id']]} is {_full_relation(a, b)} the {names[b['id']]}"
            for a, b in zip(objs, objs[1:])]
    larger = [o for o in objs if o["size"] == "large"]
    if larger and len(larger) < n:
        rels.append(f"the large {plural('shape', len(larger))} "
                    f"({_join(['the ' + names[o['id']] for o in larger])}) "
                    f"{'is' if len(larger) == 1 else 'are'} bigger than the small ones")
    synth = (f"Overall, the scene contains {_tally(objs, 'shape')}, coloured "
             f"{_tally(objs, 'colour')}, with no overlaps.")
    rel_text = "; ".join(rels) + "." if rels else "there is a single shape."
    return [glob, elems, rel_text[0].upper() + rel_text[1:], synth]


def _chart_caption(scene: dict[str, Any]) -> list[str]:
    bars = scene["bars"]
    labels = [b["label"] for b in bars]
    glob = (f"A bar chart on a white background with {len(bars)} vertical bars labelled "
            f"{_join(labels)} from left to right; the y-axis runs from 0 to {scene['y_max']} with "
            f"a light gridline at every unit.")
    elems = "; ".join(
        f"bar {b['label']} is {b['colour']} and reaches {b['value']}" for b in bars
    ) + "."
    ordered = sorted(bars, key=lambda b: -b["value"])
    rels = (f"Bar {ordered[0]['label']} is the tallest and bar {ordered[-1]['label']} the "
            f"shortest; "
            f"from tallest to shortest: {', '.join(b['label'] for b in ordered)}.")
    total = sum(b["value"] for b in bars)
    synth = (f"Overall, the values range from {ordered[-1]['value']} to {ordered[0]['value']} "
             f"and add up to {total}.")
    return [glob, elems, rels, synth]


def _triangle_caption(scene: dict[str, Any]) -> list[str]:
    verts, angles = scene["vertices"], scene["angles"]
    top = min(verts, key=lambda v: verts[v][1])
    glob = ("A single triangle drawn with a black outline on a white background; its corners are "
            "labelled P, Q and R, and numbers are written inside two of the corners.")
    elems = "; ".join(
        f"corner {v} is marked with a question mark" if v == scene["unknown"]
        else f"corner {v} is marked {angles[v]} degrees"
        for v in sorted(verts)
    ) + "."
    rels = (f"P, Q and R are the three corners of the same triangle, joined by sides PQ, QR "
            f"and RP; "
            f"{top} is the highest corner.")
    k1, k2 = scene["known"]
    synth = (f"Overall, a triangle with two known interior angles ({angles[k1]} and {angles[k2]} "
             f"degrees) and an unknown angle at {scene['unknown']}.")
    return [glob, elems, rels, synth]


def caption(scene: dict[str, Any]) -> str:
    """Oracle caption in the VARD order: global scan, elements, relations, synthesis."""
    kind = scene["kind"]
    parts = {"shapes": _shapes_caption, "bar_chart": _chart_caption,
             "triangle": _triangle_caption}[kind](scene)
    heads = ("Global scan", "Elements", "Relations", "Synthesis")
    return "\n".join(f"{h}: {p}" for h, p in zip(heads, parts))


# ---------------------------------------------------------------- reasoning


def _final(sample: Sample, value: str) -> str:
    """Closing sentences: for choice questions, map the value to its option letter."""
    if sample.answer_type == "choice":
        return f"That matches option {sample.answer} ({value}). The answer is {sample.answer}."
    return f"The answer is {sample.answer}."


def _obj(scene: dict[str, Any], oid: int) -> dict[str, Any]:
    return next(o for o in scene["objects"] if o["id"] == oid)


def _reason_colour(sample: Sample, scene: dict[str, Any], target: dict[str, Any]) -> str:
    o = _obj(scene, target["object"])
    shapes = Counter(x["shape"] for x in scene["objects"])
    return (f"The question asks for the colour of the {o['shape']}. The image has "
            f"{_tally(scene['objects'], 'shape')}, so there is exactly one {o['shape']}: the "
            f"{o['size']} one at the {o['position']}. Its fill is {o['colour']}. Checking again: "
            f"no other {o['shape']} appears ({shapes[o['shape']]} in total), so the colour is "
            f"unambiguous. " + _final(sample, o["colour"]))


def _reason_count(sample: Sample, scene: dict[str, Any], target: dict[str, Any]) -> str:
    noun, hits = target["noun"], set(target["objects"])
    steps, running = [], 0
    for o in _reading_order(scene["objects"]):
        if o["id"] in hits:
            running += 1
            steps.append(f"the {object_name(o)} at the {o['position']} counts ({running})")
        else:
            steps.append(f"the {object_name(o)} at the {o['position']} does not")
    rows = [sum(1 for o in scene["objects"] if o["id"] in hits and o["row"] == r) for r in range(3)]
    return (f"I need to count the {noun}. Going through the shapes from top left to bottom right: "
            f"{'; '.join(steps)}. That gives {running}. Double-checking row by row: "
            f"{rows[0]} in the top row, {rows[1]} in the middle row and {rows[2]} in the bottom "
            f"row, {sum(rows)} in total. " + _final(sample, str(running)))


def _reason_relation(sample: Sample, scene: dict[str, Any], target: dict[str, Any]) -> str:
    a, b = _obj(scene, target["a"]), _obj(scene, target["b"])
    na, nb = object_name(a), object_name(b)
    rel = relation_between(a, b)
    if rel in RELATIONS[:2]:
        why = (f"Both are in the same row, and the {na} is at x={a['x']} while the {nb} is at "
               f"x={b['x']}, so the {na} is {rel} the {nb}. Their heights match, so 'above' and "
               f"'below' do not apply.")
    else:
        why = (f"Both are in the same column, and the {na} is at y={a['y']} while the {nb} is at "
               f"y={b['y']} (y grows downwards), so the {na} is {rel} the {nb}. They are "
               f"horizontally aligned, so 'left' and 'right' do not apply.")
    return (f"The {na} is at the {a['position']} and the {nb} is at the {b['position']}. " + why
            + " " + _final(sample, f"{rel} the {nb}"))


def _sized(o: dict[str, Any]) -> str:
    return f"the {object_name(o)} ({2 * o['radius']} px)"


def _size_comparison(scene: dict[str, Any], target: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The large object and a sentence comparing it with the small ones."""
    big = _obj(scene, target["object"])
    others = [o for o in scene["objects"] if o["id"] != big["id"]]
    return big, (f"the {object_name(big)} at the {big['position']} is large (about {2 * big['radius']} pixels "
                 f"across), while {_join([_sized(o) for o in others])} {'is' if len(others) == 1 else 'are'} small.")


def _reason_size(sample: Sample, scene: dict[str, Any], target: dict[str, Any]) -> str:
    big, comparison = _size_comparison(scene, target)
    return (f"Comparing the four shapes: {comparison} Checking once more, none of the others comes close "
            f"to the size of the {object_name(big)}. " + _final(sample, f"the {object_name(big)}"))


def _reason_largest_colour(sample: Sample, scene: dict[str, Any], target: dict[str, Any]) -> str:
    big, comparison = _size_comparison(scene, target)
    return (f"The question asks for the colour of the largest shape. Comparing the shapes: {comparison} "
            f"So the largest shape is {big['colour']}. " + _final(sample, big["colour"]))


def _reason_chart(sample: Sample, scene: dict[str, Any], target: dict[str, Any]) -> str:
    bars = {b["label"]: b for b in scene["bars"]}
    readings = "; ".join(
        f"bar {b['label']} ({b['colour']}) reaches {b['value']}" for b in scene["bars"]
    )
    if target["variant"] == "tallest":
        best = bars[target["bar"]]
        rest = [b for b in scene["bars"] if b is not best]
        return (f"Reading each bar against the gridlines: {readings}. The highest value is "
                f"{best['value']}, for bar {best['label']}; the next highest is "
                f"{max(b['value'] for b in rest)}, so the tallest bar is unique. "
                + _final(sample, best["label"]))
    bar = bars[target["bar"]]
    return (f"Bar {bar['label']} is the {bar['colour']} bar. Its top lines up with the gridline at "
            f"{bar['value']} on the y-axis (labels are printed at every second unit, gridlines at "
            f"every unit). For reference, {readings}. So bar {bar['label']} has the value "
            f"{bar['value']}. " + _final(sample, str(bar["value"])))


def _reason_triangle(sample: Sample, scene: dict[str, Any], target: dict[str, Any]) -> str:
    angles, (k1, k2), u = scene["angles"], scene["known"], scene["unknown"]
    return (f"The angles marked in the triangle are {angles[k1]} degrees at {k1} and "
            f"{angles[k2]} degrees at {k2}; the angle at {u} carries a question mark. The interior "
            f"angles of any triangle sum to 180 degrees, so the angle at {u} is "
            f"180 - {angles[k1]} - {angles[k2]} = {angles[u]}. Check: {angles[k1]} + {angles[k2]} "
            f"+ {angles[u]} = 180. " + _final(sample, str(angles[u])))


# ---------------------------------------------------------------- short chains
# One or two sentences per task: what the tiny model can learn in a few CPU minutes (the full
# chains above run to 150-300 tokens). A choice is answered with the option's text, not its
# letter (the accuracy reward accepts the text of exactly one option): mapping a value to its
# letter is a copy from the prompt that the tiny model did not learn in the measured runs.


def _short_final(sample: Sample, value: str) -> str:
    return f"The answer is {value}." if sample.answer_type == "choice" else f"The answer is {sample.answer}."


def _short_colour(sample: Sample, scene: dict[str, Any], target: dict[str, Any]) -> str:
    o = _obj(scene, target["object"])
    return f"The {o['shape']} is {o['colour']}. " + _short_final(sample, o["colour"])


def _short_count(sample: Sample, scene: dict[str, Any], target: dict[str, Any]) -> str:
    k = len(target["objects"])
    return f"I count {k} {target['noun']}. " + _short_final(sample, str(k))


def _short_relation(sample: Sample, scene: dict[str, Any], target: dict[str, Any]) -> str:
    a, b = _obj(scene, target["a"]), _obj(scene, target["b"])
    rel = relation_between(a, b)
    return (f"The {object_name(a)} is at the {a['position']}, the {object_name(b)} at the "
            f"{b['position']}. " + _short_final(sample, f"{rel} the {object_name(b)}"))


def _short_size(sample: Sample, scene: dict[str, Any], target: dict[str, Any]) -> str:
    big = _obj(scene, target["object"])
    return f"The {object_name(big)} is the large one. " + _short_final(sample, f"the {object_name(big)}")


def _short_largest_colour(sample: Sample, scene: dict[str, Any], target: dict[str, Any]) -> str:
    big = _obj(scene, target["object"])
    return f"The largest shape is the {object_name(big)}. " + _short_final(sample, big["colour"])


def _short_chart(sample: Sample, scene: dict[str, Any], target: dict[str, Any]) -> str:
    bar = next(b for b in scene["bars"] if b["label"] == target["bar"])
    if target["variant"] == "tallest":
        return f"Bar {bar['label']} is the tallest, at {bar['value']}. " + _short_final(sample, bar["label"])
    return f"Bar {bar['label']} reaches {bar['value']}. " + _short_final(sample, str(bar["value"]))


def _short_triangle(sample: Sample, scene: dict[str, Any], target: dict[str, Any]) -> str:
    angles, (k1, k2), u = scene["angles"], scene["known"], scene["unknown"]
    return (f"{u} = 180 - {angles[k1]} - {angles[k2]} = {angles[u]}. " + _short_final(sample, str(angles[u])))


_SHORT_REASONERS = {
    "shape_colour": _short_colour,
    "count": _short_count,
    "relation": _short_relation,
    "size": _short_size,
    "bar_chart": _short_chart,
    "triangle_angle": _short_triangle,
    "largest_colour": _short_largest_colour,
    "count_colour": _short_count,
}
CHAIN_STYLES = ("full", "short")

_REASONERS = {
    "shape_colour": _reason_colour,
    "count": _reason_count,
    "relation": _reason_relation,
    "size": _reason_size,
    "bar_chart": _reason_chart,
    "triangle_angle": _reason_triangle,
    "largest_colour": _reason_largest_colour,
    "count_colour": _reason_count,
}


def oracle_reasoning(sample: Sample, style: str | None = None) -> str:
    """A reasoning chain grounded in the scene graph that ends with "The answer is X.".

    ``style``: "full" (the long templated chain) or "short" (one or two sentences); None reads
    the sample's ``meta.chain`` (set by ``write_procedural(chain=...)``), default "full"."""
    meta = sample.meta
    style = style or meta.get("chain", "full")
    if style not in CHAIN_STYLES:
        raise ValueError(f"sample {sample.id!r}: unknown chain style {style!r} (expected one of {CHAIN_STYLES})")
    reasoners = _SHORT_REASONERS if style == "short" else _REASONERS
    return reasoners[meta["task"]](sample, meta["scene"], meta["target"])


# ---------------------------------------------------------------- anchors


# A short chain gets one anchor that re-reads from the image the fact its answer rests on, in the
# chain's own words: anchors naming other objects (the full style's) need a shape-colour binding
# the tiny model lacks and cost the demo's cold start 18 accuracy points (docs/results/demo.md).
def _anchor_count(scene: dict[str, Any], target: dict[str, Any]) -> str:
    return f"Checking the image: {len(target['objects'])} {target['noun']} in all."


def _anchor_chart(scene: dict[str, Any], target: dict[str, Any]) -> str:
    bar = next(b for b in scene["bars"] if b["label"] == target["bar"])
    if target["variant"] == "tallest":
        return f"Checking the image: no bar is taller than bar {bar['label']}."
    return f"Checking the image: the top of bar {bar['label']} lines up with {bar['value']}."


def _anchor_triangle(scene: dict[str, Any], target: dict[str, Any]) -> str:
    (k1, k2), angles = scene["known"], scene["angles"]
    return f"Checking the image: {k1} is marked {angles[k1]} and {k2} is marked {angles[k2]}."


_SHORT_ANCHORS = {
    "shape_colour": lambda sc, t: f"Checking the image: one {t['shape']}, and it is {_obj(sc, t['object'])['colour']}.",
    "count": _anchor_count,
    "relation": lambda sc, t: (f"Checking the image: the {object_name(_obj(sc, t['a']))} is {t['relation']} "
                               f"the {object_name(_obj(sc, t['b']))}."),
    "size": lambda sc, t: "Checking the image: the other shapes are small.",
    "bar_chart": _anchor_chart,
    "triangle_angle": _anchor_triangle,
    "largest_colour": lambda sc, t: f"Checking the image: the {object_name(_obj(sc, t['object']))} is the large one.",
    "count_colour": _anchor_count,
}


def anchor_phrases(sample: Sample) -> list[str]:
    """Visual-anchor sentences naming elements of the scene (all true of the image); for a short
    chain (``meta.chain``), the one sentence that re-reads the fact its answer rests on."""
    scene = sample.meta["scene"]
    if sample.meta.get("chain") == "short":
        return [_SHORT_ANCHORS[sample.meta["task"]](scene, sample.meta["target"])]
    kind = scene["kind"]
    if kind == "shapes":
        names = _names(scene["objects"])
        out = []
        for o in _reading_order(scene["objects"]):
            out.append(f"Let me look at the {names[o['id']]} again.")
            out.append(f"Checking the image: there is a {o['size']} {object_name(o)} at the "
                       f"{o['position']}.")
        return out
    if kind == "bar_chart":
        out = []
        for b in scene["bars"]:
            out.append(f"Let me look at bar {b['label']} again.")
            out.append(f"Checking the image: bar {b['label']} reaches {b['value']}.")
        return out
    out = []
    for v in sorted(scene["vertices"]):
        out.append(f"Let me look at the angle at corner {v} again.")
        if v == scene["unknown"]:
            out.append(f"Checking the image: corner {v} is marked with a question mark.")
        else:
            out.append(f"Checking the image: corner {v} is marked {scene['angles'][v]} degrees.")
    return out


__all__ = ["CHAIN_STYLES", "anchor_phrases", "caption", "oracle_reasoning"]
