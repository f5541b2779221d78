"""What each CLI command does, kept apart from argument parsing.

Every command checks what it can before it writes: a command that fails leaves the run
directory as it found it (config.yaml is written only once the config has been accepted).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from .config import Config, load_config
from .engine.device import resolve_device
from .engine.rundir import open_run_dir, run_dir_path
from .engine.threads import apply_threads
from .errors import TailaugError


def run_dir_of(cfg: Config) -> Path:
    return run_dir_path(cfg.run.output_dir, cfg.run.name)


def load_run_config(run_dir: Path, overrides: list[str] = ()) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise TailaugError(f"{run_dir} is not a run directory (no config.yaml); give the directory a "
                           "'tailaug train' or 'tailaug run' wrote")
    return load_config(path, overrides, saved=True)


def _is_main(cfg: Config) -> bool:
    from .engine.distributed import init_distributed

    return init_distributed(cfg.run.device).is_main


def train(config: str, overrides: list[str], *, resume: bool, progress: bool) -> dict:
    from .evaluation.results import read_results
    from .stages.representation import train_stage1
    from .stages.stage1_model import checkpoint_path, has_checkpoint, is_complete, resume_checkpoint

    cfg = load_config(config, overrides)
    if cfg.data.dataset == "embeddings":
        raise TailaugError("dataset 'embeddings' has no backbone to train: 'tailaug run CONFIG' trains its linear "
                           "head (stage 1, seconds) and runs stages 2 and 3")
    apply_threads(cfg.run.threads)
    run_dir = run_dir_of(cfg)
    resolve_device(cfg.run.device)
    main = _is_main(cfg)
    with open_run_dir(run_dir, create=main, lock=main):
        found = has_checkpoint(run_dir)  # last.pt or mid_epoch.pt
        if not resume and found:
            raise TailaugError(
                f"{run_dir} already holds a training run; add --resume to continue it, or choose another "
                f"directory with run.name=NAME (nothing was changed)"
            )
        if resume and not found:
            raise TailaugError(f"{run_dir} holds no checkpoint to resume ({checkpoint_path(run_dir)} does not "
                               "exist); start the run without --resume (nothing was changed)")
        if resume:
            resume_checkpoint(run_dir, cfg)
            if is_complete(run_dir, cfg):
                raise TailaugError(
                    f"stage 1 in {run_dir} has finished all {cfg.train.epochs} epochs: nothing to resume; its "
                    f"numbers are in {run_dir / 'results.json'} ('tailaug evaluate {run_dir}' scores it again)"
                )
        read_results(run_dir)  # a results.json that cannot be merged fails now, not after training
        return train_stage1(cfg, run_dir, resume=resume, progress=progress)


# Fields of the stage-1 model an override on `evaluate` may not change (they are in its key);
# the rest (data.shots, data.test_per_class, eval.*, run.device, ...) only change the report.
def _check_report_overrides(saved: Config, cfg: Config, overrides: list[str]) -> None:
    from .stages.keys import changed_fields

    changed = changed_fields(saved, cfg)
    if changed:
        raise TailaugError(
            f"the override(s) {' '.join(overrides)} change the stage-1 model ({', '.join(changed)}), which "
            "evaluate cannot retrain; give only overrides that change the report (data.shots.*, "
            "data.test_per_class, eval.*, run.device, train.eval_batch_size)"
        )


def evaluate(run_dir: Path, overrides: list[str] = ()) -> dict:
    """Score the finished stage 1 of ``run_dir`` on the test set again (e.g. with other shot
    thresholds or eval settings); its row of results.json is replaced, the others kept."""
    from .engine.device import precision_name
    from .evaluation.report import format_table
    from .evaluation.results import STAGE1, read_results, record_results
    from .evaluation.scoring import score
    from .stages.representation import stage1_row
    from .stages.stage1_model import load_finished

    run_dir = Path(run_dir)
    saved = load_run_config(run_dir)
    cfg = load_run_config(run_dir, overrides)
    _check_report_overrides(saved, cfg, list(overrides))
    apply_threads(cfg.run.threads)
    with open_run_dir(run_dir, create=False):
        read_results(run_dir)
        if cfg.data.dataset == "embeddings":  # the linear head's test logits are in the feature cache
            from .engine.shards import dense
            from .stages.features import extract_features

            cache = extract_features(cfg, run_dir, progress=False)
            logits, labels, counts, choices = dense(cache["test_logits"]), cache["test_labels"], \
                cache["class_counts"].tolist(), {}
        else:
            stage1 = load_finished(cfg, run_dir)
            test = stage1.data.test
            logits = stage1.outputs(test, cfg.train.eval_batch_size)["logits"]
            labels, counts, choices = test.labels, stage1.data.class_counts, {"precision": precision_name(stage1.dtype)}
        results = score(logits, labels, counts, cfg, plots_dir=run_dir / "plots", name=STAGE1)
        record_results(run_dir, {STAGE1: stage1_row(cfg, results, **choices)})
    print(format_table([("stage 1 (last epoch)", results)]))
    return results


def describe(config: str, overrides: list[str]) -> str:
    from .data.classes import shot_groups
    from .data.datasets import planned_classes

    cfg = load_config(config, overrides)
    counts, names, notes = planned_classes(cfg.data)
    groups = shot_groups(counts, cfg.data.shots.many, cfg.data.shots.few)
    group_of = {c: g for g, members in groups.items() for c in members}
    d = cfg.data
    width = max(map(len, names)) if names else 0
    lines = [
        f"dataset {d.dataset}  profile {d.profile}  "
        + ("" if d.profile == "as_is" else f"imbalance factor {d.imbalance_factor:g}  ") + f"classes {len(counts)}",
    ]
    if d.class_order is not None:
        lines.append(f"class order {d.class_order} (profile count i goes to class class_order[i])")
    lines.append(f"{'class':>5}  {'name':<{width}}  {'images':>7}  group" if names else
                 f"{'class':>5}  {'images':>7}  group")
    lines += [f"{c:>5}  {names[c]:<{width}}  {n:>7,}  {group_of[c]}" if names else
              f"{c:>5}  {n:>7,}  {group_of[c]}" for c, n in enumerate(counts)]
    lines.append(f"total {sum(counts):,} training images; max {max(counts):,}, min {min(counts):,}, "
                 f"ratio {max(counts) / min(counts):.1f}")
    lines.append("shot groups (many > {}, few < {}): ".format(d.shots.many, d.shots.few)
                 + ", ".join(f"{g} {len(groups[g])} classes" for g in ("many", "medium", "few")))
    if d.val_per_class:
        lines.append(f"validation: {d.val_per_class} images per class held out of training")
    lines += notes
    text = "\n".join(lines)
    print(text)
    return text


def run(config: str, overrides: list[str], *, resume: bool = False, progress: bool) -> dict:
    """All three stages, reusing finished ones; a stopped stage 1 of the same config is
    continued. With ``resume`` the run must exist already (a guard against a mistyped name)."""
    from .evaluation.results import read_results
    from .stages.pipeline import run_pipeline, stage1_state

    cfg = load_config(config, overrides)
    apply_threads(cfg.run.threads)
    run_dir = run_dir_of(cfg)
    resolve_device(cfg.run.device)  # a device this machine lacks fails before anything is written
    main = _is_main(cfg)
    with open_run_dir(run_dir, create=main, lock=main):
        state = stage1_state(cfg, run_dir)  # refuses a run directory of another config
        if resume and state == "new":
            raise TailaugError(f"{run_dir} holds no stage 1 of this config to resume; check run.name, or "
                               "drop --resume to start the run (nothing was changed)")
        read_results(run_dir)
        return run_pipeline(cfg, run_dir, progress=progress)


@contextlib.contextmanager
def finished_run(run_dir: Path):
    """(run dir, its config, its feature cache, its head classes) for an analysis, with the
    run's thread setting and the run directory held."""
    from .stages.feature_cache import dense_cache
    from .stages.features import extract_features
    from .stages.pipeline import head_set

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    apply_threads(cfg.run.threads)
    with open_run_dir(run_dir, create=False):
        cache = dense_cache(extract_features(cfg, run_dir, progress=False))  # analyses read it whole
        yield run_dir, cfg, cache, head_set(cfg, cache["class_counts"].tolist())


def analyze_stg(run_dir: Path) -> dict:
    from .evaluation.stg_analysis import analyze_generator
    from .stages.features import stage1_classifier
    from .stages.pipeline import ensure_generator

    with finished_run(run_dir) as (run_dir, cfg, cache, head):
        generator = ensure_generator(cfg, run_dir, cache, progress=False)
        return analyze_generator(cfg, cache, generator, head, stage1_classifier(cache, cfg), run_dir / "analysis")


def run_seeds(config: str, overrides: list[str], seeds: list[int], *, resume: bool = False, progress: bool,
              out: str | None = None):
    """``run`` once per seed (``run.seed`` set, ``-s<seed>`` appended to ``run.name``, as the
    benchmarks name their runs), then the report of those runs, printed and written to
    ``out`` (default ``<run.output_dir>/<run.name>-report``)."""
    if len(set(seeds)) != len(seeds):
        raise TailaugError(f"--seeds lists a seed twice ({' '.join(map(str, seeds))}); give each seed once")
    given = [o for o in overrides if o.split("=", 1)[0].strip() in ("run.seed", "run")]
    if given:
        raise TailaugError(f"--seeds sets run.seed of each run; drop the override {given[0]}")
    cfg = load_config(config, overrides)
    for seed in seeds:
        run(config, [*overrides, f"run.seed={seed}", f"run.name={cfg.run.name}-s{seed}"], resume=resume,
            progress=progress)
    if not _is_main(cfg):
        return None
    run_dirs = [run_dir_path(cfg.run.output_dir, f"{cfg.run.name}-s{seed}") for seed in seeds]
    return report([str(p) for p in run_dirs], out or str(run_dir_path(cfg.run.output_dir, f"{cfg.run.name}-report")))


def report(run_dirs: list[str], out: str | None = None):
    """Mean and sample std over seeds of every method of the runs (globs expanded), grouped
    so that runs differing in anything but the seed are never averaged; printed, and written
    to ``out`` (default: ``report`` beside the runs) as report.md, .csv, .json and a figure."""
    from .evaluation.across_runs import build_report, expand_run_dirs, write_report

    paths, skipped = expand_run_dirs(run_dirs)
    result = build_report(paths)
    if out is None:
        parents = {p.resolve().parent for p in paths}
        out = str(parents.pop() / "report") if len(parents) == 1 else "report"
    written = write_report(result, Path(out))
    print(result.text())
    if skipped:
        print(f"skipped (no results.json): {', '.join(map(str, skipped))}")
    print(f"wrote {', '.join(str(p) for p in written)}")
    return result


def analyze_figures(run_dir: Path) -> list[Path]:
    """Every figure of a finished run in RUN_DIR/plots (evaluation/run_figures.py)."""
    from .evaluation.run_figures import write_run_figures

    with finished_run(run_dir) as (run_dir, cfg, cache, _):
        written = write_run_figures(cfg, run_dir, cache)
    print(f"wrote {len(written)} figures to {run_dir / 'plots'}: " + ", ".join(p.name for p in written))
    return written


def predict(run_dir: Path, inputs: list[str], *, classifier: str = "final", top_k: int = 5,
            out: str | None = None, batch_size: int = 64, progress: bool = True) -> list[dict]:
    """Classify image files (and the images in folders) with the finished run in ``run_dir``,
    or, for a run of ``data.dataset: embeddings``, every row of feature files (input
    ``FILE:ROW``); writes a CSV (``out``, or standard output) of the predicted class, its
    probability and the top-k classes with their probabilities. Decision: a feature file with
    labels adds a ``true_class`` column (a class id of the run as its name, else the label as
    given) and the accuracy against it is printed; prediction never needs labels."""
    import csv
    import io
    import sys

    from tqdm import tqdm

    from .engine.checkpoint import atomic_write_text
    from .predictor import expand_inputs, load

    if top_k < 1:
        raise TailaugError(f"--top-k is {top_k}; give 1 or more")
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    apply_threads(cfg.run.threads)
    embeddings = cfg.data.dataset == "embeddings"
    paths = expand_inputs(inputs, embeddings=embeddings)
    model = load(run_dir, classifier, device=resolve_device(cfg.run.device))  # reads only: no lock
    names = model.class_names
    k = min(top_k, len(names))
    batches = []  # (input names, the true classes or None, a function giving their probabilities)
    if embeddings:
        for path in paths:
            x, labels = model.read(path)
            ids = labels is not None and labels.dtype.kind in "iu"
            truth = None if labels is None else [names[v] if ids and 0 <= v < len(names) else str(v)
                                                 for v in labels.tolist()]
            for start in range(0, len(x), batch_size):
                stop = min(start + batch_size, len(x))
                batches.append(([f"{path}:{i}" for i in range(start, stop)], truth and truth[start:stop],
                                lambda part=x[start:stop]: model.predict_features(part)))
        what = f"{sum(len(b[0]) for b in batches)} row(s) of {len(paths)} embeddings file(s)"
    else:
        batches = [(paths[start : start + batch_size], None,
                    lambda batch=paths[start : start + batch_size]: model.predict_files(batch))
                   for start in range(0, len(paths), batch_size)]
        what = f"{len(paths)} image(s)"
    print(f"classifier: {model.classifier} ({classifier}); {what}", file=sys.stderr)
    rows = []
    for items, truth, probabilities in tqdm(batches, desc="predict", disable=not progress, leave=False):
        values, indices = probabilities().topk(k, dim=1)
        for n, (item, p, i) in enumerate(zip(items, values.tolist(), indices.tolist())):
            row = {"input": str(item), "class": names[i[0]], "probability": f"{p[0]:.6f}",
                   "classifier": model.classifier}
            for rank in range(k):
                row[f"top{rank + 1}_class"] = names[i[rank]]
                row[f"top{rank + 1}_probability"] = f"{p[rank]:.6f}"
            if truth is not None:
                row["true_class"] = truth[n]
            rows.append(row)
    labelled = [row for row in rows if "true_class" in row]
    if labelled:
        right = sum(row["class"] == row["true_class"] for row in labelled)
        print(f"accuracy against the files' labels: {100 * right / len(labelled):.2f}% ({right} of "
              f"{len(labelled)} labelled rows)", file=sys.stderr)
    text = io.StringIO()
    fields = list(rows[0]) + (["true_class"] if labelled and "true_class" not in rows[0] else [])
    writer = csv.DictWriter(text, fieldnames=fields, lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows(rows)
    if out is None:
        sys.stdout.write(text.getvalue())
    else:
        atomic_write_text(out, text.getvalue())
        print(f"wrote {len(rows)} prediction(s) to {out}", file=sys.stderr)
    return rows


def embed(config: str, overrides: list[str], *, out: str, progress: bool = True) -> dict[str, Path]:
    """Features of the config's backbone (as loaded: pretrained weights, no training) for the
    train, validation and test splits, as .npz files with ``features``, ``labels`` and
    ``class_names``: ``out`` (train), ``<out>_val.npz``, ``<out>_test.npz``."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from .data.datasets import build_data
    from .data.loaders import Batches
    from .engine.checkpoint import atomic_write
    from .engine.device import autocast, resolve_precision
    from .stages.stage1_model import batch_transform, build_network

    cfg = load_config(config, overrides)
    if cfg.model.weights is None:
        raise TailaugError("embed writes the features of a pretrained backbone, and model.weights is not set (the "
                           "features would be random): set model.weights to a file, or pretrained")
    target = Path(out)
    if target.suffix != ".npz":
        raise TailaugError(f"--out {out}: give a file name ending in .npz")
    apply_threads(cfg.run.threads)
    device = resolve_device(cfg.run.device)
    dtype = resolve_precision(cfg.train.precision, device)
    data = build_data(cfg.data)
    for note in data.notes:
        print(f"data: {note}")
    model = build_network(cfg, data, device).eval()
    transform = batch_transform(cfg, data, model)
    names = np.array(data.class_names or [str(c) for c in range(data.num_classes)])
    written = {}
    for split_name, split, path in (("train", data.train, target),
                                    ("val", data.val, target.with_name(f"{target.stem}_val.npz")),
                                    ("test", data.test, target.with_name(f"{target.stem}_test.npz"))):
        if split is None:
            continue
        batches = Batches(split, cfg.features.batch_size, transform, device, num_workers=cfg.data.num_workers,
                          prefetch_factor=cfg.data.prefetch_factor)
        feats, labels = [], []
        with torch.no_grad():
            for x, y, _ in tqdm(batches, desc=f"embed {split_name}", disable=not progress, leave=False):
                with autocast(device, dtype):
                    feats.append(model.backbone(x).float().cpu())
                labels.append(y.cpu())
        arrays = {"features": torch.cat(feats).numpy().astype(np.float32),
                  "labels": torch.cat(labels).numpy().astype(np.int64), "class_names": names}

        def write(tmp, arrays=arrays):
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)

        atomic_write(path, write)
        written[split_name] = path
        print(f"{split_name}: {len(arrays['labels']):,} x {arrays['features'].shape[1]} features -> {path}")
    return written


def analyze_fsa(run_dir: Path) -> dict:
    from .evaluation.fsa_analysis import analyze_fsa as analyze
    from .stages.features import stage1_classifier
    from .stages.stage1_model import load_finished

    with finished_run(run_dir) as (run_dir, cfg, cache, head):
        return analyze(cfg, load_finished(cfg, run_dir), cache, head, stage1_classifier(cache, cfg),
                       run_dir / "analysis")


def analyze_fasa(run_dir: Path) -> dict:
    from .evaluation.fasa_analysis import analyze_fasa as analyze

    run_dir = Path(run_dir)
    load_run_config(run_dir)  # a run directory, or a one-line error
    with open_run_dir(run_dir, create=False):
        return analyze(run_dir, run_dir / "analysis")
