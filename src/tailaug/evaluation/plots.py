"""Figures: per-class accuracy vs class size, reliability diagram, t-SNE of features.

Figures are drawn with matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``),
so plotting never touches pyplot's global state or needs a display. Each function writes
one image (format from the file suffix; no suffix -> ``.png``) and returns its Path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from ..errors import DataError


def _array(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x)


def _save(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def plot_per_class_accuracy(
    per_class_acc: Sequence[float | None],
    class_counts: Sequence[int],
    path: str | os.PathLike,
    *,
    many: int = 100,
    few: int = 20,
    percent: bool = True,
    title: str | None = None,
) -> Path:
    """Test accuracy of each class against its training-set size (log x axis).

    ``per_class_acc`` as in ``evaluate_logits(...)["per_class"]`` (percent; None/nan for a
    class absent from the test set, which is left out). Dashed lines mark the shot-group
    thresholds ``few`` and ``many``.
    """
    acc = np.array([np.nan if a is None else float(a) for a in per_class_acc], dtype=np.float64)
    counts = _array(class_counts, "class_counts").astype(np.float64)
    if acc.ndim != 1 or acc.shape != counts.shape:
        raise DataError(
            f"per_class_acc ({acc.size} values) and class_counts ({counts.size}) must have one "
            "entry per class"
        )
    if np.any(counts <= 0):
        raise DataError("class_counts must be positive to plot on a log axis")
    keep = ~np.isnan(acc)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.scatter(counts[keep], acc[keep], s=18, alpha=0.8)
    for x, label in ((few, f"few < {few}"), (many, f"many > {many}")):
        ax.axvline(x, color="grey", linestyle="--", linewidth=0.8)
        ax.annotate(label, (x, 1.0), xycoords=("data", "axes fraction"), ha="left", va="top",
                    fontsize=8, color="grey", xytext=(3, -3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class")
    ax.set_ylabel("test accuracy (%)" if percent else "test accuracy")
    ax.set_ylim(-0.05 * (100 if percent else 1), 1.05 * (100 if percent else 1))
    ax.set_title(title or "Per-class accuracy vs class size")
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def plot_reliability(bins_dict: dict, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Reliability diagram from :func:`~tailaug.evaluation.metrics.reliability_bins`.

    Bars: accuracy per confidence bin (empty bins left blank); red: the gap to the bin's
    mean confidence; diagonal: perfect calibration. A lower panel shows the bin counts.
    """
    try:
        edges = np.asarray(bins_dict["edges"], dtype=np.float64)
        counts = np.asarray(bins_dict["counts"], dtype=np.float64)
        acc = np.array([np.nan if a is None else a for a in bins_dict["accuracy"]], dtype=np.float64)
        conf = np.array([np.nan if c is None else c for c in bins_dict["confidence"]], dtype=np.float64)
    except KeyError as exc:
        raise DataError(
            f"bins_dict lacks {exc}; pass the output of tailaug.evaluation.metrics.reliability_bins"
        ) from None
    if not (len(edges) == len(counts) + 1 == len(acc) + 1 == len(conf) + 1):
        raise DataError("bins_dict is inconsistent: edges must have one entry more than counts/accuracy")
    left, width = edges[:-1], np.diff(edges)
    full = counts > 0
    fig = Figure(figsize=(5, 6))
    ax, axc = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(left[full], acc[full], width=width[full], align="edge", edgecolor="black",
           linewidth=0.6, label="accuracy")
    ax.bar(left[full], conf[full] - acc[full], bottom=acc[full], width=width[full], align="edge",
           color="red", alpha=0.3, edgecolor="red", linewidth=0.6, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ece = bins_dict.get("ece")
    head = title or "Reliability diagram"
    ax.set_title(f"{head} (ECE {100 * ece:.2f}%)" if ece is not None else head)
    ax.legend(loc="upper left", fontsize=8)
    axc.bar(left, counts, width=width, align="edge", color="grey", edgecolor="black", linewidth=0.4)
    axc.set_xlabel("confidence (max probability)")
    axc.set_ylabel("samples")
    return _save(fig, path)


def plot_tsne(
    features,
    labels,
    path: str | os.PathLike,
    *,
    markers=None,
    seed: int = 0,
    max_points: int = 3000,
    perplexity: float = 30.0,
    num_threads: int | None = 1,
    title: str | None = None,
) -> Path:
    """2-D t-SNE of ``features`` [N, d], coloured by class.

    ``markers``: optional bool array [N]; True points (e.g. augmented features) are drawn
    as crosses, the rest as dots. With more than ``max_points`` points a random subset of
    that size is drawn (numpy Generator seeded with ``seed``). t-SNE uses
    ``random_state=seed`` and PCA initialisation, so a fixed seed gives the same figure.
    The perplexity is lowered to (n - 1) / 3 for small n.

    ``num_threads`` caps the OpenMP/BLAS threads of t-SNE (None: no cap). The default 1
    keeps the result reproducible and avoids the large slow-down of oversubscribed
    threads on a busy machine (measured 25x for 60 points on 2 loaded cores).
    """
    from sklearn.manifold import TSNE  # imported here: slow to import, only needed here
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    x = _array(features, "features").astype(np.float32)
    y = _array(labels, "labels").astype(np.int64)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise DataError(
            f"features must be [N, d] and labels [N]; got shapes {x.shape} and {y.shape}"
        )
    m = None
    if markers is not None:
        m = _array(markers, "markers").astype(bool)
        if m.shape != y.shape:
            raise DataError(f"markers must be a bool array of shape {y.shape}, got {m.shape}")
    if max_points < 4:
        raise DataError(f"max_points must be at least 4, got {max_points}")
    if len(x) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(x), size=max_points, replace=False))
        x, y = x[keep], y[keep]
        m = m[keep] if m is not None else None
    n = len(x)
    if n < 4:
        raise DataError(f"t-SNE needs at least 4 points, got {n}")
    perp = float(min(perplexity, max(1.0, (n - 1) / 3)))
    with threadpool_limits(limits=num_threads):
        emb = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed).fit_transform(x)

    classes = np.unique(y)
    cmap_name = "tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "turbo"
    fig = Figure(figsize=(6, 6))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps[cmap_name]
    colour_of = {c: cmap(i / max(len(classes) - 1, 1) if cmap_name == "turbo" else i)
                 for i, c in enumerate(classes.tolist())}
    colours = np.array([colour_of[c] for c in y.tolist()])
    plain = np.ones(n, dtype=bool) if m is None else ~m
    ax.scatter(emb[plain, 0], emb[plain, 1], c=colours[plain], s=10, marker="o", alpha=0.8, linewidths=0)
    if m is not None and m.any():
        ax.scatter(emb[m, 0], emb[m, 1], c=colours[m], s=22, marker="x", alpha=0.9, linewidths=1.0)
    handles = []
    if len(classes) <= 20:
        handles += [Line2D([], [], marker="o", linestyle="", color=colour_of[c], label=f"class {c}")
                    for c in classes.tolist()]
    if m is not None:
        handles += [Line2D([], [], marker="o", linestyle="", color="black", label="original"),
                    Line2D([], [], marker="x", linestyle="", color="black", label="augmented")]
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="best", ncol=2 if len(handles) > 10 else 1)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"t-SNE of {n} features")
    return _save(fig, path)


def plot_results(logits, labels, class_counts, results: dict, out_dir: str | os.PathLike, name: str, *,
                 many: int = 100, few: int = 20, bins: int = 15) -> list[Path]:
    """Per-class accuracy against class size and a reliability diagram for one evaluated model.

    ``logits`` must be the ones ``results`` was computed from (after any post-hoc
    adjustment), so that the diagram's ECE is the reported one.
    """
    from .metrics import log_probabilities, reliability_bins

    out = Path(out_dir)
    stem = "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")
    probs = log_probabilities(logits).exp().numpy()
    return [
        plot_per_class_accuracy(results["per_class"], class_counts, out / f"{stem}_per_class.png",
                                many=many, few=few, title=f"{name}: accuracy per class"),
        plot_reliability(reliability_bins(probs, np.asarray(labels), bins), out / f"{stem}_reliability.png",
                         title=f"{name}: reliability"),
    ]


def plot_map_grid(rows: Sequence[Sequence[np.ndarray]], columns: Sequence[str], path: str | os.PathLike, *,
                  row_labels: Sequence[str] = (), title: str | None = None) -> Path:
    """A grid of images: ``rows`` of 2-D arrays (or [H, W, 3] colour images), the panels
    titled by ``columns`` on top and labelled by ``row_labels`` on the left; the first
    column in grey, the others in viridis."""
    fig = Figure(figsize=(1.9 * len(columns), 2.0 * len(rows) + 0.4))
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            ax = fig.add_subplot(len(rows), len(columns), r * len(columns) + c + 1)
            image = _array(panel, columns[c])
            ax.imshow(image, cmap=None if image.ndim == 3 else ("gray" if c == 0 else "viridis"))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=8)
            if c == 0 and r < len(row_labels):
                ax.set_ylabel(row_labels[r], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_class_curves(values, path: str | os.PathLike, *, ylabel: str, title: str | None = None,
                      second=None, second_label: str | None = None) -> Path:
    """One line per class of ``values`` [epochs, C] over the epochs (and, when given, of
    ``second`` [epochs, C] in a second panel below)."""
    values = _array(values, ylabel)
    panels = [(values, ylabel)] + ([(_array(second, second_label), second_label)] if second is not None else [])
    fig = Figure(figsize=(7, 3.2 * len(panels)))
    epochs = np.arange(1, values.shape[0] + 1)
    cmap = matplotlib.colormaps["tab10" if values.shape[1] <= 10 else "tab20"]
    for i, (data, label) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        for c in range(data.shape[1]):
            ax.plot(epochs, data[:, c], color=cmap(c % cmap.N), label=str(c), marker="." if len(epochs) < 40 else None)
        ax.set_ylabel(label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(title="class", fontsize=7, ncol=2 if data.shape[1] > 10 else 1, loc="center left",
                      bbox_to_anchor=(1.0, 0.5))
            if title:
                ax.set_title(title, fontsize=9)
    return _save(fig, path)
