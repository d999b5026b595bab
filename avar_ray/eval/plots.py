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
        log = log_scale_if_wide(ax, [v for d in data for v in d])
        ax.set_title(f"VAS per sample, Q = {span}")
        ax.set_ylabel("VAS (visual / system attention)" + (" (log scale)" if log else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def log_scale_if_wide(ax, values: Sequence[float], axis: str = "y", decades: float = 2.0) -> bool:
    """A log axis when the positive finite ``values`` span more than ``decades`` orders of
    magnitude (VAS on a tiny model spans 1e2-1e12: a linear axis shows one point and a flat line)."""
    v = _finite(values)
    if v.size < 2 or (v <= 0).any() or v.max() / v.min() < 10 ** decades:
        return False
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    return True


def layer_profile(profiles: dict[str, dict[str, list[Optional[float]]]], layers: Sequence[int],
                  path: str | Path) -> Path:
    """Mean VAS per decoder layer, one line per benchmark, one panel per query span (log y axis
    where the values span orders of magnitude). ``profiles[span][benchmark]`` is the per-layer
    list (aligned with ``layers``)."""
    plt = _pyplot()
    spans = list(profiles)
    fig, axes = plt.subplots(1, len(spans), figsize=(5.5 * len(spans), 4.0), squeeze=False)
    for ax, span in zip(axes[0], spans):
        for name, profile in profiles[span].items():
            y = np.array([np.nan if v is None else v for v in profile], dtype=float)
            ax.plot(list(layers), y, marker="o", label=name)
        log = log_scale_if_wide(ax, [v for p in profiles[span].values() for v in p])
        if len(layers) <= 32:
            ax.set_xticks(list(layers))
        ax.set_xlabel("text decoder layer")
        ax.set_ylabel("mean VAS" + (" (log scale)" if log else ""))
        ax.set_title(f"per-layer attention profile, Q = {span}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def vas_accuracy_scatter(labels: Sequence[str], accuracy: Sequence[float],
                         panels: Sequence[tuple[str, Sequence[Optional[float]], Optional[float], Optional[float]]],
                         path: str | Path) -> Path:
    """One panel per attention figure (``panels``: (axis name, x per model, r, p); e.g. the
    paper's VAS and its robust companion side by side): one dot per evaluated model with its
    label, the least-squares line (in the axis' own scale) and r / p. The x axis is logarithmic
    where the values span orders of magnitude."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.4), squeeze=False)
    for ax, (name, xs, r, p) in zip(axes[0], panels):
        keep = [i for i, v in enumerate(xs) if v is not None and np.isfinite(v)]
        x = np.asarray([xs[i] for i in keep], dtype=float)
        y = np.asarray([accuracy[i] for i in keep], dtype=float) * 100
        ax.scatter(x, y, s=36, zorder=3)
        for i, xi, yi in zip(keep, x, y):
            ax.annotate(labels[i], (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize=8)
        log = log_scale_if_wide(ax, x, axis="x")
        fx = np.log10(x) if log else x
        if len(x) >= 2 and np.ptp(fx) > 0:
            slope, intercept = np.polyfit(fx, y, 1)
            grid = np.linspace(fx.min(), fx.max(), 50)
            ax.plot(10 ** grid if log else grid, slope * grid + intercept, color="grey", lw=1, ls="--")
        stat = "r = n/a" if r is None else f"Pearson r = {r:.3f}" + ("" if p is None else f" (p = {p:.3g})")
        ax.set_title(f"{name} vs accuracy: {stat}", fontsize=10)
        ax.set_xlabel(name + (" (log scale)" if log else ""))
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def stage_chart(labels: Sequence[str], figures: Sequence[tuple[str, Sequence[Optional[Sequence[float]]]]],
                path: str | Path) -> Path:
    """The stage table as a chart a reader can read: one panel per figure (``figures``: (name,
    per stage (value, low, high) or None)), a bar per stage with its 95% interval as an error bar
    and the value written above it."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(figures), figsize=(max(4.0, 1.1 * len(labels) + 1.5) * len(figures), 4.2),
                             squeeze=False)
    xs = np.arange(len(labels))
    for ax, (name, values) in zip(axes[0], figures):
        mid = np.array([np.nan if v is None else v[0] for v in values], dtype=float)
        low = np.array([np.nan if v is None else v[0] - v[1] for v in values], dtype=float)
        high = np.array([np.nan if v is None else v[2] - v[0] for v in values], dtype=float)
        ax.bar(xs, np.nan_to_num(mid), color="#4c72b0", alpha=0.8)
        # clipped at 0: a value beside (not inside) its interval draws no bar on that side
        ax.errorbar(xs, mid, yerr=np.clip(np.nan_to_num(np.vstack([low, high])), 0, None), fmt="none",
                    ecolor="black", capsize=4, lw=1)
        for x, m, top in zip(xs, mid, np.nan_to_num(mid) + np.clip(np.nan_to_num(high), 0, None)):
            ax.annotate("n/a" if np.isnan(m) else f"{m:.3g}", (x, top), textcoords="offset points",
                        xytext=(0, 3), ha="center", fontsize=8)
        ax.set_xticks(xs, list(labels), rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{name} [95% CI]", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def rl_curve(train: Sequence[tuple[int, float]], heldout: dict[str, Sequence[tuple[int, float]]],
             path: str | Path) -> Path:
    """The RL run's accuracy over its steps: the training rollouts' accuracy reward per step
    (``train``: (step, value)) beside the held-out curve (``heldout``: name -> (step, value))."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], color="grey", alpha=0.7, lw=1,
                label="training rollouts (accuracy reward)")
    for name, points in heldout.items():
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=f"held-out: {name}")
    ax.set_xlabel("RL step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("RL: training reward and the held-out curve", fontsize=10)
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
