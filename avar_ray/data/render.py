"""Draw a scene graph (scenes.py) as an RGB PNG. Pure: same scene -> same bytes."""

from __future__ import annotations

import math
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from avar_ray.data.scenes import COLOURS
from avar_ray.data.schema import encode_png

OUTLINE = (30, 30, 30)
GRID_GREY = (215, 215, 215)


def _font(side: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled font: no system font lookup, so output does not depend on the host.
    return ImageFont.load_default(size=max(9, round(side * 0.09)))


def _centred_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font: Any) -> None:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    origin = (xy[0] - (left + right) / 2, xy[1] - (top + bottom) / 2)
    draw.text(origin, text, fill=OUTLINE, font=font)


def _draw_shape(draw: ImageDraw.ImageDraw, obj: dict[str, Any]) -> None:
    x, y, r = obj["x"], obj["y"], obj["radius"]
    fill = COLOURS[obj["colour"]]
    if obj["shape"] == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill, outline=OUTLINE)
    elif obj["shape"] == "square":
        h = round(r * 0.9)  # a square of half-side r looks much bigger than a circle of radius r
        draw.rectangle((x - h, y - h, x + h, y + h), fill=fill, outline=OUTLINE)
    elif obj["shape"] == "triangle":
        pts = [(x, y - r), (x - r, y + round(r * 0.8)), (x + r, y + round(r * 0.8))]
        draw.polygon(pts, fill=fill, outline=OUTLINE)
    else:
        raise ValueError(f"unknown shape {obj['shape']!r}")


def _draw_bar_chart(draw: ImageDraw.ImageDraw, scene: dict[str, Any], side: int) -> None:
    font = _font(side)
    left, right, top, bottom = 0.16 * side, 0.04 * side, 0.06 * side, 0.13 * side
    plot_w, plot_h = side - left - right, side - top - bottom
    y_max = scene["y_max"]

    def y_of(v: float) -> float:
        return top + plot_h * (1 - v / y_max)

    for v in range(y_max + 1):  # a gridline per unit, so values can be read off exactly
        draw.line((left, y_of(v), side - right, y_of(v)), fill=GRID_GREY)
        if v % 2 == 0:
            _centred_text(draw, (left / 2, y_of(v)), str(v), font)
    slot = plot_w / len(scene["bars"])
    for i, bar in enumerate(scene["bars"]):
        cx = left + slot * (i + 0.5)
        half = slot * 0.3
        draw.rectangle((cx - half, y_of(bar["value"]), cx + half, y_of(0)),
                       fill=COLOURS[bar["colour"]], outline=OUTLINE)
        _centred_text(draw, (cx, side - bottom / 2), bar["label"], font)
    draw.line((left, top, left, y_of(0)), fill=OUTLINE)
    draw.line((left, y_of(0), side - right, y_of(0)), fill=OUTLINE)


def _draw_triangle(draw: ImageDraw.ImageDraw, scene: dict[str, Any], side: int) -> None:
    font = _font(side)
    verts = {v: tuple(p) for v, p in scene["vertices"].items()}
    cx = sum(p[0] for p in verts.values()) / 3
    cy = sum(p[1] for p in verts.values()) / 3
    draw.polygon([verts[v] for v in sorted(verts)], outline=OUTLINE, width=2)
    for v, (x, y) in verts.items():
        # Letter just outside the corner, away from the centroid.
        dx, dy = x - cx, y - cy
        norm = math.hypot(dx, dy) or 1.0
        off = 0.08 * side
        _centred_text(draw, (x + dx / norm * off, y + dy / norm * off), v, font)
        # Angle mark on the bisector, far enough in that a sharp corner's sides do not cross it.
        ux, uy = 0.0, 0.0
        for w, (wx, wy) in verts.items():
            if w != v:
                d = math.hypot(wx - x, wy - y) or 1.0
                ux, uy = ux + (wx - x) / d, uy + (wy - y) / d
        un = math.hypot(ux, uy) or 1.0
        mark = "?" if v == scene["unknown"] else f"{scene['angles'][v]}°"
        left, top, right, bottom = draw.textbbox((0, 0), mark, font=font)
        half = math.hypot(right - left, bottom - top) / 2  # the box corner reaches furthest
        half_angle = math.radians(scene["angles"][v]) / 2
        dist = min(max(half / math.sin(half_angle), 0.1 * side), 0.75 * norm)
        _centred_text(draw, (x + ux / un * dist, y + uy / un * dist), mark, font)


def render_scene(scene: dict[str, Any]) -> bytes:
    side = scene["width"]
    image = Image.new("RGB", (side, scene["height"]), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    kind = scene["kind"]
    if kind == "shapes":
        for obj in scene["objects"]:
            _draw_shape(draw, obj)
    elif kind == "bar_chart":
        _draw_bar_chart(draw, scene, side)
    elif kind == "triangle":
        _draw_triangle(draw, scene, side)
    else:
        raise ValueError(f"unknown scene kind {kind!r}")
    return encode_png(image)
