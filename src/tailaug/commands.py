"""What each CLI command does, kept apart from argument parsing."""

from __future__ import annotations

from pathlib import Path

from .config import Config, load_config
from .engine.checkpoint import atomic_write_text
from .errors import TailaugError


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.run.output_dir) / cfg.run.name


def save_resolved_config(cfg: Config, run_dir: Path) -> None:
    atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())


def load_run_config(run_dir: Path, overrides: list[str] = ()) -> Config:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise TailaugError(f"{run_dir} is not a run directory (no config.yaml); give the directory a "
                           "'tailaug train' or 'tailaug run' wrote")
    return load_config(path, overrides)


def train(config: str, overrides: list[str], *, resume: bool, progress: bool) -> dict:
    from .engine.distributed import init_distributed
    from .stages.representation import checkpoint_path, train_stage1

    cfg = load_config(config, overrides)
    run_dir = run_dir_of(cfg)
    if not resume and checkpoint_path(run_dir).exists():
        raise TailaugError(
            f"{run_dir} already holds a training run; add --resume to continue it, or choose another "
            f"directory with run.name=NAME (nothing was changed)"
        )
    if init_distributed(cfg.run.device).is_main:
        save_resolved_config(cfg, run_dir)
    return train_stage1(cfg, run_dir, resume=resume, progress=progress)


def evaluate(run_dir: Path, overrides: list[str] = ()) -> dict:
    from .evaluation.report import format_table, write_json
    from .stages.representation import Trainer, load_stage1_model

    cfg = load_run_config(run_dir, overrides)
    trainer = Trainer(cfg, run_dir, progress=False)
    load_stage1_model(trainer.model, run_dir, trainer.device)
    results = trainer.report(trainer.data.test)
    write_json(run_dir / "results.json", {"stage1": results})
    print(format_table([("stage 1 (last epoch)", results)]))
    return results


def describe(config: str, overrides: list[str]) -> str:
    from .data.datasets import planned_counts
    from .evaluation.metrics import shot_groups

    cfg = load_config(config, overrides)
    counts = planned_counts(cfg.data)
    groups = shot_groups(counts, cfg.data.shots.many, cfg.data.shots.few)
    group_of = {c: g for g, members in groups.items() for c in members}
    d = cfg.data
    lines = [
        f"dataset {d.dataset}  profile {d.profile}  imbalance factor {d.imbalance_factor:g}  "
        f"classes {len(counts)}",
        f"{'class':>5}  {'images':>7}  group",
    ]
    lines += [f"{c:>5}  {n:>7,}  {group_of[c]}" for c, n in enumerate(counts)]
    lines.append(f"total {sum(counts):,} training images; max {max(counts):,}, min {min(counts):,}, "
                 f"ratio {max(counts) / min(counts):.1f}")
    lines.append("shot groups (many > {}, few < {}): ".format(d.shots.many, d.shots.few)
                 + ", ".join(f"{g} {len(groups[g])} classes" for g in ("many", "medium", "few")))
    if d.val_per_class:
        lines.append(f"validation: {d.val_per_class} images per class held out of training")
    text = "\n".join(lines)
    print(text)
    return text


def run(config: str, overrides: list[str], *, progress: bool) -> dict:
    from .stages.pipeline import run_pipeline, stage1_state

    cfg = load_config(config, overrides)
    run_dir = run_dir_of(cfg)
    stage1_state(cfg, run_dir)  # refuses a run directory of another config before writing
    save_resolved_config(cfg, run_dir)
    return run_pipeline(cfg, run_dir, progress=progress)


def analyze_stg(run_dir: Path) -> dict:
    from .stages.pipeline import analyze_generator

    return analyze_generator(load_run_config(run_dir), run_dir)
