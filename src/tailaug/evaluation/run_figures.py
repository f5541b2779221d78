"""Every figure of one finished run (``tailaug analyze figures RUN_DIR``), in ``RUN_DIR/plots``.

    per_class_methods.png          test accuracy per class against training images, one line per row
    <row>_confusion.png            row-normalised confusion matrix of each row of results.json
    <row>_reliability.png          reliability diagram of each row (and <row>_per_class.png)
    tsne_test_features.png         t-SNE of the test features, coloured by class
    tsne_<augmenter>.png           real and augmented features of tail classes, per augmenter the run used
    decision_boundary.png          CE, cRT and cRT + augmenter re-fitted on a 2-D plane (decision_boundary.py)
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from ..data.datasets import CLASS_NAMES
from ..errors import TailaugError
from .across_runs import retrain_record_path
from .results import STAGE1, read_results


def _stem(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")


def _row_cfg(cfg: Config, row: dict) -> Config:
    """``cfg`` with the evaluation settings the row was scored with (tailaug evaluate may differ)."""
    scored = dict(row.get("eval") or {})
    shots = scored.pop("shots", None)
    update = {"eval": cfg.eval.model_copy(update={k: v for k, v in scored.items() if k in type(cfg.eval).model_fields})}
    data = cfg.data.model_copy(update={"shots": cfg.data.shots.model_copy(update=shots)}) if shots else cfg.data
    return cfg.model_copy(update={**update, "data": data})


def _test_logits(run_dir: Path, cache: dict, name: str, row: dict) -> torch.Tensor | None:
    if name == STAGE1:
        return cache["test_logits"]
    record = retrain_record_path(run_dir, row.get("key"))
    if record is None or not record.with_suffix(".safetensors").is_file():
        return None
    from ..engine.checkpoint import load_tensors

    return load_tensors(record.with_suffix(".safetensors"))["test_logits"]


def _augmenters(run_dir: Path, rows: dict) -> list[tuple[str, dict]]:
    """(row name, augmenter options) of every stage-3 row that used an augmenter, once per options."""
    from .report import read_json

    found: list[tuple[str, dict]] = []
    for name, row in rows.items():
        path = retrain_record_path(run_dir, row.get("key")) if name != STAGE1 else None
        if path is None:
            continue
        options = read_json(path, fix="delete it and its .safetensors and run the run again").get("config", {}).get("augmenter")
        if isinstance(options, dict) and options.get("name", "none") != "none" and options not in [o for _, o in found]:
            found.append((name, options))
    return found


def write_run_figures(cfg: Config, run_dir: Path, cache: dict, *, progress: bool = False) -> list[Path]:
    """Draw every figure of the run (module docstring); returns the paths written."""
    from ..augment.base import build_augmenter
    from ..registry import AUGMENTERS
    from ..stages.features import stage1_classifier
    from ..stages.pipeline import ensure_generator, head_set
    from .augmented import augmented_tsne, fit_on_cache, smallest_tail_classes
    from .decision_boundary import decision_boundary_figure
    from .plots import plot_confusion, plot_per_class_lines, plot_results, plot_tsne
    from .scoring import evaluated_logits

    run_dir = Path(run_dir)
    out = run_dir / "plots"
    rows = read_results(run_dir)
    if not rows:
        raise TailaugError(f"{run_dir / 'results.json'} holds no rows; finish the run first ('tailaug run')")
    names = CLASS_NAMES.get(cfg.data.dataset)
    counts = cache["class_counts"].tolist()
    labels = cache["test_labels"]
    written: list[Path] = []

    series = [(name, row["metrics"].get("class_counts") or counts, row["metrics"]["per_class"], None)
              for name, row in rows.items() if row.get("metrics", {}).get("per_class") is not None]
    if series:
        written.append(plot_per_class_lines([(None, series)], out / "per_class_methods.png", many=cfg.data.shots.many,
                                            few=cfg.data.shots.few, title="Test accuracy per class, by method"))
    for name, row in rows.items():
        metrics = row.get("metrics", {})
        if metrics.get("confusion") is not None:
            written.append(plot_confusion(metrics["confusion"], out / f"{_stem(name)}_confusion.png",
                                          class_names=names, title=f"{name}: confusion matrix (rows sum to 100%)"))
        logits = _test_logits(run_dir, cache, name, row)
        if logits is not None:
            scored = _row_cfg(cfg, row)
            shots = scored.data.shots
            written += plot_results(evaluated_logits(logits, counts, scored), labels, counts, metrics, out, name,
                                    many=shots.many, few=shots.few, bins=scored.eval.ece_bins)
    written.append(plot_tsne(cache["test_features"].float().numpy(), labels.numpy(), out / "tsne_test_features.png",
                             seed=cfg.run.seed, class_names=names,
                             title="t-SNE of the test features of the stage-1 backbone, by class"))

    head = head_set(cfg, counts)
    try:
        tail_classes = smallest_tail_classes(counts, head, 3)
    except TailaugError as exc:
        print(f"no figures of tail classes (augmented t-SNE, decision boundary): {exc}")
        return written
    stage1_head = stage1_classifier(cache, cfg)
    fitted = None
    for name, options in _augmenters(run_dir, rows):
        entry = AUGMENTERS.get(options["name"])
        generator = None
        if entry.config.uses_generator:
            generator = ensure_generator(cfg, run_dir, cache, progress)
        augmenter = fit_on_cache(build_augmenter(options, generator_module=generator), cache, head, stage1_head)
        label = entry.label or options["name"]
        written.append(augmented_tsne(augmenter, cache, sorted(tail_classes),
                                      out / f"tsne_{_stem(name)}.png", seed=cfg.run.seed, label=label,
                                      class_names=names))
        if fitted is None or options == cfg.retrain.augmenter.model_dump(mode="json"):
            fitted = (augmenter, label)  # the decision-boundary figure prefers the configured augmenter
    augmenter, label = fitted if fitted is not None else (None, None)
    written.append(decision_boundary_figure(cache, augmenter, label, tail_classes[0], cfg.retrain,
                                            out / "decision_boundary.png",
                                            seed=cfg.run.seed, class_names=names))
    return written
