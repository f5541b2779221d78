"""The three-stage pipeline of ``tailaug run``, each stage reused when its output exists.

    stage 1   backbone + classifier         run_dir/checkpoints, stage1.json
    stage 2a  feature cache                 run_dir/features/<key>.safetensors
    stage 2b  semantic transformation gen.  run_dir/generator/<key>.safetensors (+ .json)
    stage 3   classifier re-training        run_dir/retrain/<name>-<key>.json (+ .safetensors)

Every key hashes the config sections the output depends on, so changing a stage-3 option
re-runs stage 3 alone.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..augment.base import AugmentContext, build_augmenter
from ..augment.stg import STGAugmenterModule, head_classes, transformation_kl_matrix
from ..config import Config, NoAugmenter, STGAugmenter, short_hash
from ..engine.checkpoint import atomic_write_text
from ..engine.seed import torch_generator
from ..errors import TailaugError
from ..evaluation.plots import plot_results
from ..evaluation.report import format_table, markdown_table, read_json, write_json
from .classifier import retrain_classifier
from .features import extract_features, features_key
from .generator import load_generator, save_generator, train_generator
from .representation import (checkpoint_path, is_complete, load_stage1_checkpoint, score, stage1_key,
                             train_stage1)


def stage1_state(cfg: Config, run_dir: Path) -> str:
    """'complete', 'resume' (a stopped run of this config) or 'new'; raises when the run
    directory holds stage 1 of another config, before anything is written."""
    if is_complete(run_dir, cfg):
        return "complete"
    if not checkpoint_path(run_dir).is_file():
        return "new"
    if load_stage1_checkpoint(run_dir)["key"] != stage1_key(cfg):
        raise TailaugError(
            f"{run_dir} holds a stage-1 model trained with a different data/model/train config; "
            "choose another run.name for this config (nothing was changed)"
        )
    return "resume"


def ensure_stage1(cfg: Config, run_dir: Path, progress: bool) -> None:
    state = stage1_state(cfg, run_dir)
    if state == "complete":
        print(f"stage 1: reusing the finished model in {run_dir}")
        return
    print(f"stage 1: {'resuming' if state == 'resume' else 'training'} in {run_dir}")
    train_stage1(cfg, run_dir, resume=state == "resume", progress=progress)


def head_set(cfg: Config, counts) -> list[int]:
    return head_classes(counts, cfg.stg.head, many=cfg.data.shots.many)


def ensure_generator(cfg: Config, run_dir: Path, cache: dict, progress: bool):
    key = f"{features_key(cfg)}-{cfg.section_hash('stg', 'data.shots', 'run.seed')}"
    path = Path(run_dir) / "generator" / f"{key}.safetensors"
    if path.is_file():
        print(f"stage 2: reusing the generator {path.name}")
        return load_generator(path)[0]
    print("stage 2: training the semantic transformation generator on head-class features")
    model, losses = train_generator(
        cache["train_features"], cache["train_labels"], cache["train_index"],
        cache["class_counts"].tolist(), cfg.stg, seed=cfg.run.seed, many=cfg.data.shots.many,
        progress=progress,
    )
    print("stage 2: loss per epoch " + " ".join(f"{v:.4f}" for v in losses))
    save_generator(path, model, {"stg": cfg.stg.model_dump(mode="json"), "losses": losses})
    return model


def augmenter_label(aug) -> str:
    return {
        "none": "", "stg": f" + STG (lambda {getattr(aug, 'lam', '')})",
        "noise": f" + noise (std {getattr(aug, 'std', '')})",
        "dropout": f" + dropout (p {getattr(aug, 'p', '')})",
    }.get(aug.name, f" + {aug.name}")


def retrain(cfg: Config, run_dir: Path, cache: dict, augmenter_cfg, generator=None, *,
            progress: bool = True) -> tuple[str, dict]:
    """Stage 3 with one augmenter; returns (row label, test metrics), cached by config."""
    retrain_cfg = cfg.retrain.model_copy(update={"augmenter": augmenter_cfg})
    sections = {"retrain": retrain_cfg.model_dump(mode="json"), "eval": cfg.eval.model_dump(mode="json"),
                "shots": cfg.data.shots.model_dump(), "seed": cfg.run.seed,
                "stg": cfg.stg.model_dump(mode="json") if augmenter_cfg.name == "stg" else None}
    key = f"{features_key(cfg)}-{short_hash(sections)}"
    label = {"crt": "cRT", "lws": "LWS", "tau_norm": "tau-norm", "ncm": "NCM"}[retrain_cfg.method]
    label += augmenter_label(augmenter_cfg)
    path = Path(run_dir) / "retrain" / f"{retrain_cfg.method}-{augmenter_cfg.name}-{key}.json"
    if path.is_file():
        return label, read_json(path, fix="delete it to train this stage-3 classifier again", keys=("test",))["test"]
    counts = cache["class_counts"].tolist()
    augmenter = build_augmenter(augmenter_cfg, generator_module=generator)
    val = (cache["val_features"], cache["val_labels"]) if "val_features" in cache else None
    head = retrain_classifier(
        cache["train_features"], cache["train_labels"], counts, retrain_cfg,
        num_classes=len(counts), seed=cfg.retrain.seed if cfg.retrain.seed is not None else cfg.run.seed,
        augmenter=augmenter, init_weight=cache["head_weight"], init_bias=cache["head_bias"],
        val=val, progress=progress, head_classes=head_set(cfg, counts),
    )
    with torch.no_grad():
        logits = head(cache["test_features"])
    results = score(logits, cache["test_labels"], counts, cfg)
    plot_results(logits, cache["test_labels"], counts, results, Path(run_dir) / "plots", label,
                 many=cfg.data.shots.many, few=cfg.data.shots.few, bins=cfg.eval.ece_bins)
    write_json(path, {"label": label, "config": sections, "history": getattr(head, "history", []),
                      "test": results})
    return label, results


def run_pipeline(cfg: Config, run_dir: Path, *, progress: bool = True) -> dict:
    ensure_stage1(cfg, run_dir, progress)
    cache = extract_features(cfg, run_dir, progress=progress)
    counts = cache["class_counts"].tolist()
    rows = [("stage 1", score(cache["test_logits"], cache["test_labels"], counts, cfg))]
    rows.append(retrain(cfg, run_dir, cache, NoAugmenter(), progress=progress))
    aug = cfg.retrain.augmenter
    if aug.name != "none":
        generator = ensure_generator(cfg, run_dir, cache, progress) if aug.name == "stg" else None
        rows.append(retrain(cfg, run_dir, cache, aug, generator, progress=progress))
    print(format_table(rows))
    write_json(Path(run_dir) / "results.json", {label: r for label, r in rows})
    return dict(rows)


# --------------------------------------------------------------------------- analysis


def analyze_generator(cfg: Config, run_dir: Path, *, num_samples: int = 5) -> dict:
    """The paper's Table 5 (pairwise KL of five tail samples' transformation distributions,
    and each sample's most similar head class) and a t-SNE of real and augmented tail features."""
    from ..evaluation.plots import plot_tsne

    run_dir = Path(run_dir)
    cache = extract_features(cfg, run_dir, progress=False)
    generator = ensure_generator(cfg, run_dir, cache, progress=False)
    counts = cache["class_counts"].tolist()
    head = head_set(cfg, counts)
    aug_cfg = cfg.retrain.augmenter if cfg.retrain.augmenter.name == "stg" else STGAugmenter(name="stg")
    augmenter: STGAugmenterModule = build_augmenter(aug_cfg, generator_module=generator)
    feats, labels = cache["train_features"], cache["train_labels"]
    augmenter.fit(AugmentContext(features=feats, labels=labels, class_counts=torch.tensor(counts),
                                 head_classes=head, classifier_weight=cache["head_weight"],
                                 classifier_bias=cache["head_bias"]))
    original = torch.arange(len(labels)) < sum(counts)  # the cache lists un-augmented rows first
    tail = [c for c in range(len(counts)) if c not in head and counts[c] >= num_samples]
    if not tail:
        raise TailaugError(f"no tail class has {num_samples} training images to analyse")
    cls = min(tail, key=lambda c: (counts[c], c))
    gen = torch_generator(cfg.run.seed, 5)
    rows = torch.where(original & (labels == cls))[0]
    rows = rows[torch.randperm(len(rows), generator=gen)[:num_samples]]
    tokens = augmenter.token_classes(feats[rows], labels[rows])
    mu, sigma = augmenter.transformation(feats[rows], labels[rows])
    kl = transformation_kl_matrix(mu, sigma)
    names = [f"sample {i + 1}" for i in range(num_samples)]
    table = [(n, {m: float(kl[i, j]) for j, m in enumerate(names)}) for i, n in enumerate(names)]
    table.append(("most similar head class", {m: str(int(tokens[j])) for j, m in enumerate(names)}))
    text = markdown_table(table, columns=names)
    out = run_dir / "analysis"
    out.mkdir(exist_ok=True)
    report = {"tail_class": cls, "rows": rows.tolist(), "kl": kl.tolist(),
              "most_similar_head_class": tokens.tolist(), "head_classes": head}
    write_json(out / "stg_kl.json", report)
    atomic_write_text(out / "stg_kl.md", f"KL(N_i || N_j) between the transformation distributions of "
                                         f"{num_samples} samples of tail class {cls}\n\n{text}\n")
    print(f"tail class {cls} ({counts[cls]} training images); KL(row || column):\n{text}")

    # t-SNE: real features of the smallest tail classes and their STG augmentations
    shown = sorted(tail, key=lambda c: counts[c])[:3]
    real = original & torch.isin(labels, torch.tensor(shown))
    reps = 10
    base_f, base_y = feats[real].repeat(reps, 1), labels[real].repeat(reps)
    aug_f, _ = augmenter(base_f, base_y, generator=gen)
    points = torch.cat([feats[real], aug_f])
    point_labels = torch.cat([labels[real], base_y])
    markers = torch.cat([torch.zeros(int(real.sum()), dtype=torch.bool), torch.ones(len(aug_f), dtype=torch.bool)])
    png = plot_tsne(points.numpy(), point_labels.numpy(), out / "stg_tsne.png", markers=markers.numpy(),
                    seed=cfg.run.seed, title=f"real and STG-augmented features of tail classes {shown}")
    print(f"wrote {out / 'stg_kl.md'}, {out / 'stg_kl.json'} and {png}")
    return report
