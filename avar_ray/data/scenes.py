"""Scene graphs and questions for the procedural tasks (no drawing here; see render.py).

A task builder takes a random.Random and the image side, and returns a TaskDraw: the scene
graph (JSON-serialisable), the question, the answer and the "target" (what the question is
about, used by the oracle reasoning). All randomness comes from the given Random.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable

from avar_ray.data.schema import letter

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 60, 180),
    "orange": (245, 140, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Radius as a fraction of the image side: a small shape still spans > 1 visual patch at 112 px.
SIZES: dict[str, float] = {"small": 0.075, "large": 0.15}
GRID = 3
CELL_NAMES = (
    ("top left", "top centre", "top right"),
    ("middle left", "centre", "middle right"),
    ("bottom left", "bottom centre", "bottom right"),
)
RELATIONS = ("to the left of", "to the right of", "above", "below")
BAR_LABELS = "KLMNPQRSTW"  # avoids A-D, which name the options
Y_MAX = 10
TRIANGLE_VERTICES = ("P", "Q", "R")


@dataclass
class TaskDraw:
    scene: dict[str, Any]
    question: str
    answer: str
    answer_type: str
    choices: list[str] = field(default_factory=list)
    target: dict[str, Any] = field(default_factory=dict)


def object_name(obj: dict[str, Any]) -> str:
    return f"{obj['colour']} {obj['shape']}"


def plural(shape: str, count: int) -> str:
    return shape if count == 1 else f"{shape}s"


# ---------------------------------------------------------------- layout


def _make_object(
    rng: random.Random, idx: int, cell: int, shape: str, colour: str, size: str, side: int
) -> dict[str, Any]:
    row, col = divmod(cell, GRID)
    cell_px = side / GRID
    radius = max(3, round(SIZES[size] * side))
    # Jitter inside the cell only, so shapes never overlap and row/col stay truthful.
    slack = max(0, int(cell_px / 2 - radius - 2))
    x = round((col + 0.5) * cell_px) + rng.randint(-slack, slack)
    y = round((row + 0.5) * cell_px) + rng.randint(-slack, slack)
    return {
        "id": idx, "shape": shape, "colour": colour, "size": size, "radius": radius,
        "x": x, "y": y, "row": row, "col": col, "position": CELL_NAMES[row][col],
    }


def _shapes_scene(
    rng: random.Random, specs: list[tuple[str, str, str]], cells: list[int], side: int
) -> dict[str, Any]:
    objects = [
        _make_object(rng, i, cell, shape, colour, size, side)
        for i, ((shape, colour, size), cell) in enumerate(zip(specs, cells))
    ]
    return {"kind": "shapes", "width": side, "height": side, "background": "white",
            "objects": objects}


def _random_size(rng: random.Random) -> str:
    return rng.choice(tuple(SIZES))


def _choice_question(
    rng: random.Random, correct: str, distractors: list[str]
) -> tuple[list[str], str]:
    """Shuffle the correct option among up to three distractors; return (choices, letter)."""
    options = [correct] + distractors[:3]
    rng.shuffle(options)
    return options, letter(options.index(correct))


def _numeric_distractors(
    rng: random.Random, answer: int, lo: int, hi: int, step: int = 1
) -> list[str]:
    pool = [answer + d * step for d in (-3, -2, -1, 1, 2, 3)]
    pool = [v for v in pool if lo <= v <= hi]
    rng.shuffle(pool)
    return [str(v) for v in pool]


# ---------------------------------------------------------------- shape tasks


def shape_colour(rng: random.Random, side: int) -> TaskDraw:
    """What colour is the <shape>? The asked shape is the only one of its kind."""
    n = rng.randint(2, 4)
    target = rng.choice(SHAPES)
    others = [s for s in SHAPES if s != target]
    shapes = [target] + [rng.choice(others) for _ in range(n - 1)]
    colours = rng.sample(list(COLOURS), n)  # distinct, so the answer is unambiguous
    specs = [(s, c, _random_size(rng)) for s, c in zip(shapes, colours)]
    rng.shuffle(specs)
    scene = _shapes_scene(rng, specs, rng.sample(range(GRID * GRID), n), side)
    obj = next(o for o in scene["objects"] if o["shape"] == target)
    # Colours present in the scene are the most plausible wrong options.
    in_scene = [c for c in colours if c != obj["colour"]]
    rest = [c for c in COLOURS if c not in colours]
    rng.shuffle(rest)
    choices, ans = _choice_question(rng, obj["colour"], in_scene + rest)
    return TaskDraw(scene, f"What colour is the {target}?", ans, "choice", choices,
                    {"object": obj["id"], "shape": target})


def count(rng: random.Random, side: int) -> TaskDraw:
    """How many <colour|shape|colour shape>s are there?"""
    n = rng.randint(3, 7)
    palette = rng.sample(list(COLOURS), 4)  # few colours per scene keeps it readable
    mode = rng.choice(("shape", "colour", "both"))
    t_shape, t_colour = rng.choice(SHAPES), rng.choice(palette)
    k = rng.randint(1, min(5, n))

    def matches(shape: str, colour: str) -> bool:
        return {"shape": shape == t_shape, "colour": colour == t_colour,
                "both": shape == t_shape and colour == t_colour}[mode]

    specs: list[tuple[str, str, str]] = []
    for i in range(n):
        while True:
            shape = t_shape if i < k and mode != "colour" else rng.choice(SHAPES)
            colour = t_colour if i < k and mode != "shape" else rng.choice(palette)
            if matches(shape, colour) == (i < k):
                break
        specs.append((shape, colour, _random_size(rng)))
    rng.shuffle(specs)
    scene = _shapes_scene(rng, specs, rng.sample(range(GRID * GRID), n), side)
    noun = {"shape": f"{t_shape}s", "colour": f"{t_colour} shapes",
            "both": f"{t_colour} {t_shape}s"}[mode]
    target = {"mode": mode, "shape": t_shape, "colour": t_colour, "noun": noun,
              "objects": [o["id"] for o in scene["objects"] if matches(o["shape"], o["colour"])]}
    question = f"How many {noun} are there in the image?"
    if rng.random() < 0.5:
        return TaskDraw(scene, question, str(k), "integer", [], target)
    choices, ans = _choice_question(rng, str(k), _numeric_distractors(rng, k, 0, 9))
    return TaskDraw(scene, question, ans, "choice", choices, target)


def _distinct_specs(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """n distinct (shape, colour) pairs, so that "the red circle" names one object."""
    pairs = [(s, c) for s in SHAPES for c in COLOURS]
    return rng.sample(pairs, n)


def relation(rng: random.Random, side: int) -> TaskDraw:
    """Where is A relative to B? A and B share a row or a column, so one relation holds."""
    n = rng.randint(2, 4)
    pairs = _distinct_specs(rng, n)
    line = rng.randrange(GRID)
    i, j = rng.sample(range(GRID), 2)
    if rng.random() < 0.5:  # same row: left/right
        cell_a, cell_b = line * GRID + i, line * GRID + j
    else:  # same column: above/below
        cell_a, cell_b = i * GRID + line, j * GRID + line
    free = [c for c in range(GRID * GRID) if c not in (cell_a, cell_b)]
    cells = [cell_a, cell_b] + rng.sample(free, n - 2)
    specs = [(s, c, _random_size(rng)) for s, c in pairs]
    scene = _shapes_scene(rng, specs, cells, side)
    a, b = scene["objects"][0], scene["objects"][1]
    rel = relation_between(a, b)
    options = [f"{r} the {object_name(b)}" for r in RELATIONS]
    correct = options[RELATIONS.index(rel)]
    rng.shuffle(options)
    return TaskDraw(scene, f"Where is the {object_name(a)} relative to the {object_name(b)}?",
                    letter(options.index(correct)), "choice", options,
                    {"a": a["id"], "b": b["id"], "relation": rel})


def relation_between(a: dict[str, Any], b: dict[str, Any]) -> str:
    """The grid relation of a to b along the axis where they differ (column first)."""
    if a["col"] != b["col"]:
        return RELATIONS[0] if a["col"] < b["col"] else RELATIONS[1]
    return RELATIONS[2] if a["row"] < b["row"] else RELATIONS[3]


def size(rng: random.Random, side: int) -> TaskDraw:
    """Which shape is the largest? One large shape among small ones."""
    pairs = _distinct_specs(rng, 4)
    big = rng.randrange(4)
    specs = [(s, c, "large" if i == big else "small") for i, (s, c) in enumerate(pairs)]
    scene = _shapes_scene(rng, specs, rng.sample(range(GRID * GRID), 4), side)
    names = [f"the {object_name(o)}" for o in scene["objects"]]
    correct = names[big]
    rng.shuffle(names)
    return TaskDraw(scene, "Which shape is the largest?", letter(names.index(correct)), "choice",
                    names, {"object": big})


# ---------------------------------------------------------------- easy tasks
# Questions a tiny model can learn in a few CPU minutes (the toy world's "easy" set, used by the
# demo and the learning tests): the answer is a colour or a count of one colour, which the
# pre-trained tiny vision tower encodes per token, with no shape-colour binding to learn.


def largest_colour(rng: random.Random, side: int) -> TaskDraw:
    """What colour is the largest shape? One large shape among 1-3 small ones, distinct colours."""
    n = rng.randint(2, 4)
    colours = rng.sample(list(COLOURS), n)
    specs = [(rng.choice(SHAPES), c, "large" if i == 0 else "small") for i, c in enumerate(colours)]
    scene = _shapes_scene(rng, specs, rng.sample(range(GRID * GRID), n), side)
    rest = [c for c in COLOURS if c not in colours]
    rng.shuffle(rest)
    choices, ans = _choice_question(rng, colours[0], colours[1:] + rest)
    return TaskDraw(scene, "What colour is the largest shape?", ans, "choice", choices, {"object": 0})


def count_colour(rng: random.Random, side: int) -> TaskDraw:
    """How many <colour> shapes are there? 2-6 small shapes in three colours, 1-4 of the asked one."""
    n = rng.randint(2, 6)
    palette = rng.sample(list(COLOURS), 3)
    k = rng.randint(1, min(4, n))
    colours = [palette[0]] * k + [rng.choice(palette[1:]) for _ in range(n - k)]
    specs = [(rng.choice(SHAPES), c, "small") for c in colours]
    rng.shuffle(specs)
    scene = _shapes_scene(rng, specs, rng.sample(range(GRID * GRID), n), side)
    noun = f"{palette[0]} shapes"
    target = {"mode": "colour", "shape": None, "colour": palette[0], "noun": noun,
              "objects": [o["id"] for o in scene["objects"] if o["colour"] == palette[0]]}
    return TaskDraw(scene, f"How many {noun} are there in the image?", str(k), "integer", [], target)


# ---------------------------------------------------------------- charts and geometry


def bar_chart(rng: random.Random, side: int) -> TaskDraw:
    """Read one bar's value, or name the tallest bar."""
    n = rng.randint(4, 5)
    labels = sorted(rng.sample(BAR_LABELS, n))
    colours = rng.sample(list(COLOURS), n)
    values = rng.sample(range(1, Y_MAX), n)  # distinct: one tallest bar, readable gaps
    top = values.index(max(values))
    bars = [{"label": lab, "colour": col, "value": v}
            for lab, col, v in zip(labels, colours, values)]
    scene = {"kind": "bar_chart", "width": side, "height": side, "background": "white",
             "y_max": Y_MAX, "bars": bars}
    if rng.random() < 0.5:
        options = [labels[top]] + rng.sample([lab for i, lab in enumerate(labels) if i != top], 3)
        choices, ans = _choice_question(rng, labels[top], options[1:])
        return TaskDraw(scene, "Which bar is the tallest?", ans, "choice", choices,
                        {"variant": "tallest", "bar": labels[top]})
    k = rng.randrange(n)
    value = values[k]
    question = f"What is the value of bar {labels[k]}?"
    target = {"variant": "value", "bar": labels[k]}
    if rng.random() < 0.5:
        return TaskDraw(scene, question, str(value), "integer", [], target)
    others = [str(v) for v in sorted(set(values) - {value})]
    rng.shuffle(others)
    near = [d for d in _numeric_distractors(rng, value, 0, Y_MAX) if d not in others]
    choices, ans = _choice_question(rng, str(value), (others[:2] + near)[:3])
    return TaskDraw(scene, question, ans, "choice", choices, target)


def triangle_angle(rng: random.Random, side: int) -> TaskDraw:
    """Two interior angles are marked; find the third (angles sum to 180)."""
    while True:
        # 40-95 degrees each: no sliver triangles, so the marks fit inside the corners.
        angles = [rng.randrange(40, 100, 5), rng.randrange(40, 100, 5)]
        third = 180 - sum(angles)
        if 40 <= third <= 95:
            break
    unknown = rng.choice(TRIANGLE_VERTICES)
    known = [v for v in TRIANGLE_VERTICES if v != unknown]
    angle_of = {known[0]: angles[0], known[1]: angles[1], unknown: third}
    scene = {"kind": "triangle", "width": side, "height": side, "background": "white",
             "angles": {v: angle_of[v] for v in TRIANGLE_VERTICES},
             "known": known, "unknown": unknown,
             "vertices": _triangle_vertices(rng, angle_of, side)}
    question = (f"In triangle PQR, the angles at {known[0]} and {known[1]} are marked in degrees. "
                f"What is the measure of the angle at {unknown}, in degrees?")
    target = {"vertex": unknown}
    if rng.random() < 0.5:
        return TaskDraw(scene, question, str(third), "integer", [], target)
    plausible = [180 - angles[0], 180 - angles[1], sum(angles), third + 10, third - 10, 90 - third]
    plausible = list(dict.fromkeys(v for v in plausible if 0 < v < 180 and v != third))
    rng.shuffle(plausible)
    choices, ans = _choice_question(rng, str(third), [str(v) for v in plausible])
    return TaskDraw(scene, question, ans, "choice", choices, target)


def _triangle_vertices(
    rng: random.Random, angle_of: dict[str, int], side: int
) -> dict[str, list[int]]:
    """Pixel positions with exactly the given interior angles: a random side is the base."""
    left, right, apex = rng.sample(TRIANGLE_VERTICES, 3)
    a, b = math.radians(angle_of[left]), math.radians(angle_of[right])
    # Law of sines with base length 1: |left-apex| = sin(b) / sin(c).
    reach = math.sin(b) / math.sin(math.pi - a - b)
    pts = {left: (0.0, 0.0), right: (1.0, 0.0), apex: (reach * math.cos(a), reach * math.sin(a))}
    xs = [p[0] for p in pts.values()]
    ys = [p[1] for p in pts.values()]
    margin = 0.17 * side  # room for the vertex letters and angle marks
    scale = (side - 2 * margin) / max(max(xs) - min(xs), max(ys) - min(ys))
    x0 = (side - scale * (max(xs) - min(xs))) / 2
    y0 = (side - scale * (max(ys) - min(ys))) / 2
    return {
        v: [round(x0 + scale * (x - min(xs))), round(side - y0 - scale * (y - min(ys)))]
        for v, (x, y) in sorted(pts.items())
    }


BUILDERS: dict[str, Callable[[random.Random, int], TaskDraw]] = {
    "shape_colour": shape_colour,
    "count": count,
    "relation": relation,
    "size": size,
    "bar_chart": bar_chart,
    "triangle_angle": triangle_angle,
}
EASY_BUILDERS: dict[str, Callable[[random.Random, int], TaskDraw]] = {
    "largest_colour": largest_colour,
    "count_colour": count_colour,
}
