"""What each CLI command does, kept apart from argument parsing.

Every command checks what it can before it writes: a command that fails leaves the run
directory as it found it (config.yaml is written only once the config has been accepted).
"""

from __future__ import annotations

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
    return load_config(path, overrides)


def _is_main(cfg: Config) -> bool:
    from .engine.distributed import init_distributed

    return init_distributed(cfg.run.device).is_main


def train(config: str, overrides: list[str], *, resume: bool, progress: bool) -> dict:
    from .evaluation.results import read_results
    from .stages.representation import train_stage1
    from .stages.stage1_model import check_checkpoint, checkpoint_path, is_complete

    cfg = load_config(config, overrides)
    apply_threads(cfg.run.threads)
    run_dir = run_dir_of(cfg)
    resolve_device(cfg.run.device)
    main = _is_main(cfg)
    with open_run_dir(run_dir, create=main, lock=main):
        has_checkpoint = checkpoint_path(run_dir).is_file()
        if not resume and has_checkpoint:
            raise TailaugError(
                f"{run_dir} already holds a training run; add --resume to continue it, or choose another "
                f"directory with run.name=NAME (nothing was changed)"
            )
        if resume and not has_checkpoint:
            raise TailaugError(f"{run_dir} holds no checkpoint to resume ({checkpoint_path(run_dir)} does not "
                               "exist); start the run without --resume (nothing was changed)")
        if resume:
            check_checkpoint(run_dir, cfg)
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
        stage1 = load_finished(cfg, run_dir)
        test = stage1.data.test
        logits = stage1.outputs(test, cfg.train.eval_batch_size)["logits"]
        results = score(logits, test.labels, stage1.data.class_counts, cfg, plots_dir=run_dir / "plots", name=STAGE1)
        record_results(run_dir, {STAGE1: stage1_row(cfg, results, precision=precision_name(stage1.dtype))})
    print(format_table([("stage 1 (last epoch)", results)]))
    return results


def describe(config: str, overrides: list[str]) -> str:
    from .data.classes import shot_groups
    from .data.datasets import CLASS_NAMES, planned_counts

    cfg = load_config(config, overrides)
    counts = planned_counts(cfg.data)
    groups = shot_groups(counts, cfg.data.shots.many, cfg.data.shots.few)
    group_of = {c: g for g, members in groups.items() for c in members}
    d = cfg.data
    names = CLASS_NAMES.get(d.dataset)
    width = max(map(len, names)) if names else 0
    lines = [
        f"dataset {d.dataset}  profile {d.profile}  imbalance factor {d.imbalance_factor:g}  "
        f"classes {len(counts)}",
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


def analyze_stg(run_dir: Path) -> dict:
    from .evaluation.stg_analysis import analyze_generator
    from .stages.features import extract_features, stage1_classifier
    from .stages.pipeline import ensure_generator, head_set

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    apply_threads(cfg.run.threads)
    with open_run_dir(run_dir, create=False):
        cache = extract_features(cfg, run_dir, progress=False)
        generator = ensure_generator(cfg, run_dir, cache, progress=False)
        head = head_set(cfg, cache["class_counts"].tolist())
        return analyze_generator(cfg, cache, generator, head, stage1_classifier(cache, cfg), run_dir / "analysis")


def analyze_fsa(run_dir: Path) -> dict:
    from .evaluation.fsa_analysis import analyze_fsa as analyze
    from .stages.features import extract_features, stage1_classifier
    from .stages.pipeline import head_set
    from .stages.stage1_model import load_finished

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    apply_threads(cfg.run.threads)
    with open_run_dir(run_dir, create=False):
        cache = extract_features(cfg, run_dir, progress=False)
        head = head_set(cfg, cache["class_counts"].tolist())
        return analyze(cfg, load_finished(cfg, run_dir), cache, head, stage1_classifier(cache, cfg),
                       run_dir / "analysis")


def analyze_fasa(run_dir: Path) -> dict:
    from .evaluation.fasa_analysis import analyze_fasa as analyze

    run_dir = Path(run_dir)
    load_run_config(run_dir)  # a run directory, or a one-line error
    with open_run_dir(run_dir, create=False):
        return analyze(run_dir, run_dir / "analysis")
