"""Figures: per-class accuracy vs class size, confusion matrix, reliability diagram, t-SNE of
features, decision regions on a 2-D embedding.

Figures are drawn with matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``),
so plotting never touches pyplot's global state or needs a display. Each function writes
one image (format from the file suffix; no suffix -> ``.png``) and returns its Path.
"""

from __future__ import annotations

import os
import textwrap
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
    _class_size_axes(ax, many, few, percent, title or "Per-class accuracy vs class size")
    return _save(fig, path)


def _class_size_axes(ax, many: int, few: int, percent: bool, title: str) -> None:
    """Log x axis of training images per class with the shot-group thresholds dashed."""
    for x, label in ((few, f"few < {few}"), (many, f"many > {many}")):
        ax.axvline(x, color="grey", linestyle="--", linewidth=0.8)
        ax.annotate(label, (x, 1.0), xycoords=("data", "axes fraction"), ha="left", va="top",
                    fontsize=8, color="grey", xytext=(3, -3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("test accuracy (%)" if percent else "test accuracy")
    ax.set_ylim(-0.05 * (100 if percent else 1), 1.05 * (100 if percent else 1))
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)


def plot_per_class_lines(panels: Sequence[tuple], path: str | os.PathLike, *, many: int = 100, few: int = 20,
                         title: str | None = None) -> Path:
    """Test accuracy (%) of each class against its training images (log x), one line per method.

    ``panels``: (panel title or None, series) side by side (e.g. one per setting of a report);
    a series is (label, class_counts [C], accuracy [C] (%, nan/None for a class absent from
    the test set), std [C] or None); a std draws a band of ± std around the line. Each line
    joins its classes in order of class size; a label has the same colour in every panel.
    """
    panels = [(t, list(series)) for t, series in panels if series]
    if not panels:
        raise DataError("no method to plot: give at least one (label, counts, accuracy, std) series")
    labels = list(dict.fromkeys(label for _, series in panels for label, *_ in series))
    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    colour_of = {label: cmap(i % cmap.N) for i, label in enumerate(labels)}
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    longest = max(len(series) for _, series in panels)
    fig = Figure(figsize=(6.2 * cols, (4.2 + 0.2 * longest) * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (panel_title, series) in zip(axes, panels):
        for label, counts, acc, std in series:
            x = _array(counts, "class_counts").astype(np.float64)
            y = np.array([np.nan if a is None else float(a) for a in acc], dtype=np.float64)
            if x.shape != y.shape or np.any(x <= 0):
                raise DataError(f"{label}: class_counts ({x.size}) and accuracies ({y.size}) must be one positive "
                                "count and one accuracy per class")
            order = np.argsort(x, kind="stable")
            keep = order[~np.isnan(y[order])]
            ax.plot(x[keep], y[keep], marker="o", markersize=3.5, linewidth=1.4, color=colour_of[label], label=label)
            if std is not None:
                s = np.nan_to_num(np.array([np.nan if v is None else float(v) for v in std], dtype=np.float64)[keep])
                ax.fill_between(x[keep], y[keep] - s, y[keep] + s, color=colour_of[label], alpha=0.15, linewidth=0)
        _class_size_axes(ax, many, few, True, panel_title or "")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title or "Test accuracy per class against its training images", y=1.0 + 0.03 / rows)
    fig.subplots_adjust(hspace=0.3 + 0.08 * longest, wspace=0.25)
    return _save(fig, path)


def plot_confusion(confusion, path: str | os.PathLike, *, class_names: Sequence[str] | None = None,
                   title: str | None = None) -> Path:
    """Row-normalised confusion matrix (``confusion[true][pred]`` counts): each row shows where
    the test images of one true class went, in %; cells are annotated up to 20 classes."""
    cm = _array(confusion, "confusion").astype(np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise DataError(f"confusion must be a square [C, C] matrix of counts, got shape {cm.shape}")
    c = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(c)]
    if len(names) != c:
        raise DataError(f"class_names has {len(names)} names for {c} classes")
    support = cm.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rows = np.where(support > 0, 100.0 * cm / support, np.nan)
    size = min(12.0, 3.0 + 0.45 * c)
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.add_subplot()
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="% of the true class's test images")
    if c <= 20:
        for i in range(c):
            for j in range(c):
                if not np.isnan(rows[i, j]) and rows[i, j] >= 0.5:
                    ax.text(j, i, f"{rows[i, j]:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if rows[i, j] > 50 else "black")
        ax.set_xticks(range(c), names, rotation=45 if max(map(len, names)) > 2 else 0, ha="right"
                      if max(map(len, names)) > 2 else "center", fontsize=8)
        ax.set_yticks(range(c), names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or "Confusion matrix (rows normalised to 100%)")
    return _save(fig, path)


def plot_decision_regions(panels: Sequence[dict], path: str | os.PathLike, *, title: str,
                          class_names: Sequence[str], caption: str | None = None) -> Path:
    """Side-by-side decision regions of classifiers on a 2-D embedding.

    Each panel: ``title``, ``xs``/``ys`` (grid coordinates, [W] and [H]), ``regions`` ([H, W]
    index into ``class_names`` of the predicted class), ``points`` [N, 2] and ``labels`` [N]
    (indices into ``class_names``) of the training points, and optionally ``augmented`` [N]
    bool (drawn as crosses). ``caption`` is printed under the panels.
    """
    from matplotlib.colors import ListedColormap

    k = len(class_names)
    cmap = matplotlib.colormaps["tab10"]
    colours = [cmap(i % 10) for i in range(k)]
    fig = Figure(figsize=(4.2 * len(panels), 4.6))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    fig.subplots_adjust(wspace=0.3)
    for ax, panel in zip(axes, panels):
        xs, ys = np.asarray(panel["xs"]), np.asarray(panel["ys"])
        ax.contourf(xs, ys, np.asarray(panel["regions"]), levels=np.arange(k + 1) - 0.5,
                    cmap=ListedColormap(colours), alpha=0.25)
        ax.contour(xs, ys, np.asarray(panel["regions"]), levels=np.arange(k) + 0.5, colors="black",
                   linewidths=0.8)
        pts, lab = np.asarray(panel["points"]), np.asarray(panel["labels"])
        aug = np.asarray(panel.get("augmented", np.zeros(len(lab), dtype=bool)), dtype=bool)
        for i in range(k):  # augmented crosses first, so the real points stay visible on top
            if aug.any():
                ax.scatter(pts[(lab == i) & aug, 0], pts[(lab == i) & aug, 1], s=14, marker="x",
                           color=colours[i], linewidths=0.9, alpha=0.6)
        for i in range(k):
            real = (lab == i) & ~aug
            ax.scatter(pts[real, 0], pts[real, 1], s=12, color=colours[i], edgecolors="black", linewidths=0.4)
        ax.set_xlim(xs[0], xs[-1])
        ax.set_ylim(ys[0], ys[-1])
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel("component 1")
        ax.set_ylabel("component 2")
    handles = [Line2D([], [], marker="o", linestyle="", color=colours[i], label=class_names[i]) for i in range(k)]
    if any(np.asarray(p.get("augmented", [False])).any() for p in panels):
        handles.append(Line2D([], [], marker="x", linestyle="", color="black", label="augmented"))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(title)
    if caption:
        fig.text(0.5, -0.08, textwrap.fill(caption, 60 * len(panels)), ha="center", va="top", fontsize=7)
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
    class_names: Sequence[str] | None = None,
) -> Path:
    """2-D t-SNE of ``features`` [N, d], coloured by class (legend: ``class_names[c]`` when given).

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
    if m is not None and m.any():  # crosses first: the fewer real points stay visible on top
        ax.scatter(emb[m, 0], emb[m, 1], c=colours[m], s=22, marker="x", alpha=0.7, linewidths=1.0)
        ax.scatter(emb[plain, 0], emb[plain, 1], c=colours[plain], s=24, marker="o", edgecolors="black",
                   linewidths=0.6)
    else:
        ax.scatter(emb[plain, 0], emb[plain, 1], c=colours[plain], s=10, marker="o", alpha=0.8, linewidths=0)
    handles = []
    if len(classes) <= 20:
        handles += [Line2D([], [], marker="o", linestyle="", color=colour_of[c],
                           label=f"{c}: {class_names[c]}" if class_names is not None else f"class {c}")
                    for c in classes.tolist()]
    if m is not None:
        handles += [Line2D([], [], marker="o", linestyle="", color="black", label="original"),
                    Line2D([], [], marker="x", linestyle="", color="black", label="augmented")]
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="best", ncol=2 if len(handles) > 10 else 1)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
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
