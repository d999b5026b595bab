"""PNG figures of the eval report and the cross-checkpoint analysis (matplotlib, Agg backend:
no display needed). Each function draws one figure from plain numbers and returns its path."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

# SPEC.md §1 bands on the Qwen2.5-VL-7B scale: narrow < 10, wide 10-15, panoramic > 15.
BAND_EDGES = (10.0, 15.0)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite(values: Sequence[Optional[float]]) -> np.ndarray:
    arr = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    return arr[np.isfinite(arr)]


def vas_distribution(values: dict[str, dict[str, list[Optional[float]]]], path: str | Path) -> Path:
    """Box plots (with the samples as dots) of per-sample VAS per benchmark, one panel per query
    span. ``values[span][benchmark]`` is the list of VAS values."""
    plt = _pyplot()
    spans = list(values)
    fig, axes = plt.subplots(1, len(spans), figsize=(5.5 * len(spans), 4.2), squeeze=False)
    rng = np.random.default_rng(0)  # jitter only; fixed so the figure is reproducible
    for ax, span in zip(axes[0], spans):
        names = list(values[span])
        data = [_finite(values[span][n]) for n in names]
        ax.boxplot([d if d.size else [np.nan] for d in data], showfliers=False)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=20, ha="right", fontsize=8)
        for i, d in enumerate(data, start=1):
            ax.scatter(i + rng.uniform(-0.12, 0.12, d.size), d, s=10, alpha=0.6)
        for edge in BAND_EDGES:
            ax.axhline(edge, color="grey", lw=0.8, ls="--")
        ax.set_title(f"VAS per sample, Q = {span}")
        ax.set_ylabel("VAS (visual / system attention)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def layer_profile(profiles: dict[str, dict[str, list[Optional[float]]]], layers: Sequence[int],
                  path: str | Path) -> Path:
    """Mean VAS per decoder layer, one line per benchmark, one panel per query span.
    ``profiles[span][benchmark]`` is the per-layer list (aligned with ``layers``)."""
    plt = _pyplot()
    spans = list(profiles)
    fig, axes = plt.subplots(1, len(spans), figsize=(5.5 * len(spans), 4.0), squeeze=False)
    for ax, span in zip(axes[0], spans):
        for name, profile in profiles[span].items():
            y = np.array([np.nan if v is None else v for v in profile], dtype=float)
            ax.plot(list(layers), y, marker="o", label=name)
        if len(layers) <= 32:
            ax.set_xticks(list(layers))
        ax.set_xlabel("text decoder layer")
        ax.set_ylabel("mean VAS")
        ax.set_title(f"per-layer attention profile, Q = {span}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def vas_accuracy_scatter(labels: Sequence[str], vas: Sequence[float], accuracy: Sequence[float],
                         r: Optional[float], p: Optional[float], path: str | Path) -> Path:
    """One dot per evaluated model, its label beside it, the least-squares line and r / p."""
    plt = _pyplot()
    x, y = np.asarray(vas, dtype=float), np.asarray(accuracy, dtype=float) * 100
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    ax.scatter(x, y, s=36, zorder=3)
    for label, xi, yi in zip(labels, x, y):
        ax.annotate(label, (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if len(x) >= 2 and np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, y, 1)
        grid = np.linspace(x.min(), x.max(), 50)
        ax.plot(grid, slope * grid + intercept, color="grey", lw=1, ls="--")
    stat = "r = n/a" if r is None else f"Pearson r = {r:.3f}" + ("" if p is None else f" (p = {p:.3g})")
    ax.set_title(f"VAS vs accuracy: {stat}", fontsize=10)
    ax.set_xlabel("VAS (Q = user text)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def table_png(header: Sequence[str], rows: Sequence[Sequence[str]], title: str, path: str | Path) -> Path:
    """A table rendered as an image (for slides and the report's figure set)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(header)), 0.5 + 0.38 * (len(rows) + 1)))
    ax.axis("off")
    table = ax.table(cellText=[list(r) for r in rows], colLabels=list(header), loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.3)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def heatmap_overlay(image, grid: np.ndarray, path: str | Path, title: str) -> Path:
    """The image with a patch grid of attention laid over it (stretched to the image) and a
    colour bar."""
    plt = _pyplot()
    width, height = image.size
    fig, ax = plt.subplots(figsize=(4.8, 4.8 * height / width + 0.6))
    ax.imshow(image)
    overlay = ax.imshow(grid, cmap="inferno", alpha=0.55, extent=(0, width, height, 0), interpolation="nearest")
    fig.colorbar(overlay, ax=ax, fraction=0.046, pad=0.04, label="mean attention of the response")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
