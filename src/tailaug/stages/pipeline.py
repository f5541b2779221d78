"""The three-stage pipeline of ``tailaug run``, each stage reused when its output exists.

    stage 1   backbone + classifier         run_dir/checkpoints, stage1.json
    stage 2a  feature cache                 run_dir/features/<key>/ (index.json, .npy shards)
    stage 2b  semantic transformation gen.  run_dir/generator/<key>.safetensors (+ .json)
              spatial maps (augmenters that    run_dir/spatial/<key>.safetensors
              read them, offline)
    stage 3   classifier re-training        run_dir/retrain/<method>-<augmenter>-<key>.json
                                            (+ .safetensors: its test logits); with
                                            retrain.select, the best of a grid on validation

Every key hashes exactly the config fields its output depends on (``stages.keys``), so
changing a stage-3 option re-runs stage 3 alone, and changing ``eval.*`` or the shot
thresholds only scores the stored logits again. The rows go to results.json, merged.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..augment.base import NoAugmenter, build_augmenter
from ..augment.stg import head_classes
from ..config import Config
from ..engine import distributed
from ..engine.checkpoint import atomic_write, load_tensors
from ..engine.device import resolve_device, resolve_precision
from ..engine.shards import dense
from ..evaluation.report import format_table, read_json, write_json
from ..evaluation.results import STAGE1, record_results, result_row
from ..evaluation.scoring import eval_settings, score
from ..errors import ConfigError
from .classifier import predict, retrain_classifier
from .feature_cache import training_features
from .features import extract_features, stage1_classifier
from .generator import load_generator, save_generator, train_generator
from .keys import features_key, generator_key, retrain_fields, retrain_key, retrain_seed
from .representation import stage1_row, train_stage1
from .spatial import spatial_source
from .select import row_label, row_select, select_on_validation
from .stored_head import head_tensors
from .stage1_model import (finished_key, has_checkpoint, is_complete, other_model_error, resume_checkpoint,
                           write_run_config)

CPU = torch.device("cpu")


def stage1_state(cfg: Config, run_dir: Path) -> str:
    """'complete', 'resume' (a stopped run of this config) or 'new'; raises when the run
    directory holds stage 1 of another config, before anything is written."""
    if is_complete(run_dir, cfg):
        return "complete"
    if cfg.data.dataset == "embeddings":  # no checkpoint: stage 1 is retrained in seconds
        if finished_key(run_dir) is not None:
            raise other_model_error(f"stage 1 in {run_dir}", run_dir, cfg)
        return "new"
    if not has_checkpoint(run_dir):
        return "new"
    resume_checkpoint(run_dir, cfg)
    return "resume"


def ensure_stage1(cfg: Config, run_dir: Path, progress: bool) -> None:
    state = stage1_state(cfg, run_dir)
    if state == "complete":
        print(f"stage 1: reusing the finished model in {run_dir}")
        return
    print(f"stage 1: {'resuming' if state == 'resume' else 'training'} in {run_dir}")
    if cfg.data.dataset == "embeddings":
        extract_features(cfg, run_dir, progress=progress)  # the linear head; the cache is the embeddings
        return
    train_stage1(cfg, run_dir, resume=state == "resume", progress=progress)


def head_set(cfg: Config, counts) -> list[int]:
    return head_classes(counts, cfg.stg.head, many=cfg.data.shots.many)


def ensure_generator(cfg: Config, run_dir: Path, cache: dict, progress: bool, device=CPU, dtype=None):
    """The stage-2 generator of this config (trained now or loaded), on ``device``."""
    path = Path(run_dir) / "generator" / f"{generator_key(cfg)}.safetensors"
    if path.is_file():
        print(f"stage 2: reusing the generator {path.name}")
        return load_generator(path, device=device)[0]
    print("stage 2: training the semantic transformation generator on head-class features")
    model, losses = train_generator(
        cache["train_features"], cache["train_labels"], cache["train_index"],
        cache["class_counts"].tolist(), cfg.stg, seed=cfg.run.seed, many=cfg.data.shots.many,
        progress=progress, device=device, dtype=dtype,
    )
    print("stage 2: loss per epoch " + " ".join(f"{v:.4f}" for v in losses))
    save_generator(path, model, {"stg": cfg.stg.model_dump(mode="json"), "losses": losses})
    return model


def retrain_files(cfg: Config, run_dir: Path, augmenter_cfg) -> tuple:
    """(the stage-3 config of the row with ``augmenter_cfg``, its key, its label, its .json
    and its .safetensors: the test logits and the classifier, ``head.*``)."""
    retrain_cfg = cfg.retrain.model_copy(
        update={"augmenter": augmenter_cfg, "select": row_select(cfg.retrain, augmenter_cfg)})
    key = retrain_key(cfg, retrain_cfg)
    path = Path(run_dir) / "retrain" / f"{retrain_cfg.method}-{augmenter_cfg.name}-{key}.json"
    return retrain_cfg, key, row_label(retrain_cfg), path, path.with_suffix(".safetensors")


def retrain(cfg: Config, run_dir: Path, cache: dict, augmenter_cfg, generator=None, *,
            progress: bool = True, device=CPU, dtype=None, spatial=None) -> tuple[str, dict]:
    """Stage 3 with one augmenter on ``device``; returns (row label, results.json row).
    ``generator`` and ``spatial`` are the stage-2 generator and the spatial maps, for an
    augmenter whose options ask for them.

    The trained classifier's test logits are stored under its key, with the classifier
    itself (``stages.stored_head``), and scored with the current ``eval`` and shot settings
    every time."""
    retrain_cfg, key, label, path, logits_path = retrain_files(cfg, run_dir, augmenter_cfg)
    counts = cache["class_counts"].tolist()
    if path.is_file() and logits_path.is_file():
        choices = read_json(path, fix="delete it and its .safetensors to train this stage-3 classifier again",
                            keys=("choices",))["choices"]
        logits = load_tensors(logits_path)["test_logits"]
    else:
        # the validation features in memory; the training features streamed from a large cache
        val = (dense(cache["val_features"]), cache["val_labels"]) if "val_features" in cache else None
        head1 = stage1_classifier(cache, cfg)
        train_x = training_features(cache, cfg)

        def fit(point):  # the classifier of one setting (a fresh augmenter each time)
            return retrain_classifier(
                train_x, cache["train_labels"], counts, point,
                num_classes=len(counts), seed=retrain_seed(cfg, point),
                augmenter=build_augmenter(point.augmenter, generator_module=generator),
                init_weight=head1.weight, init_bias=head1.bias, init_cosine_scale=head1.cosine_scale,
                val=val, progress=progress, head_classes=head_set(cfg, counts), device=device, dtype=dtype,
                spatial=spatial,
            )

        if retrain_cfg.select is None:
            head = fit(retrain_cfg)
        elif val is None:
            raise ConfigError("retrain.select needs the validation features, and the feature cache has none; "
                              "set data.val_per_class (or data.val_split for an image folder)")
        else:
            # the grid is trained and scored on train and validation features only; the test
            # features below meet the chosen classifier alone
            head = select_on_validation(fit, retrain_cfg, *val, counts, cfg.data.shots)
            chosen = head.choices["select"]
            values = ", ".join(f"{k}={v}" for k, v in chosen["chosen"].items())
            print(f"stage 3: {label}: {values} chosen on validation ({chosen['metric']} {chosen['score']:.2f}, "
                  f"best of {len(chosen['scores'])})")
        logits = predict(head, cache["test_features"], device)
        choices = head.choices
        from safetensors.torch import save_file

        tensors = {"test_logits": logits, **head_tensors(head)}
        atomic_write(logits_path, lambda tmp: save_file(tensors, tmp))
        write_json(path, {"label": label, "config": retrain_fields(cfg, retrain_cfg), "choices": choices,
                          "history": head.history})
    results = score(logits, cache["test_labels"], counts, cfg, plots_dir=Path(run_dir) / "plots", name=label)
    return label, result_row(results, key=key, settings=eval_settings(cfg), choices=choices)


def run_device(cfg: Config) -> tuple[torch.device, torch.dtype | None]:
    """The device and autocast dtype of the run (run.device, train.precision) for stages 2 and 3."""
    device = resolve_device(cfg.run.device, distributed.local_rank())
    return device, resolve_precision(cfg.train.precision, device)


def run_pipeline(cfg: Config, run_dir: Path, *, progress: bool = True) -> dict:
    """All three stages; writes their rows to results.json (merged) and config.yaml, and
    returns {row label: test metrics}. Under torchrun every rank trains stage 1; stages 2-3
    (on cached features, seconds to minutes) run on rank 0 alone, and the others return {}."""
    ensure_stage1(cfg, run_dir, progress)
    if not distributed.init_distributed(cfg.run.device).is_main:
        return {}
    cache = extract_features(cfg, run_dir, progress=progress)
    counts = cache["class_counts"].tolist()
    stage1 = score(dense(cache["test_logits"]), cache["test_labels"], counts, cfg)
    rows = {STAGE1: stage1_row(cfg, stage1, features=features_key(cfg))}
    device, dtype = run_device(cfg)
    rows.update([retrain(cfg, run_dir, cache, NoAugmenter(), progress=progress, device=device, dtype=dtype)])
    aug = cfg.retrain.augmenter
    if aug.name != "none":
        generator = ensure_generator(cfg, run_dir, cache, progress, device, dtype) if aug.uses_generator else None
        request = aug.spatial_request()
        spatial = spatial_source(cfg, run_dir, request, progress=progress) if request is not None else None
        rows.update([retrain(cfg, run_dir, cache, aug, generator, progress=progress, device=device, dtype=dtype,
                             spatial=spatial)])
    metrics = {label: row["metrics"] for label, row in rows.items()}
    print(format_table(list(metrics.items())))
    record_results(run_dir, rows)
    write_run_config(cfg, run_dir)
    return metrics
