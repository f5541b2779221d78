"""Analyses of a trained semantic transformation generator (paper Table 5 and a t-SNE)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..augment.base import AugmentContext, build_augmenter
from ..augment.stg import STGAugmenter, STGAugmenterModule, transformation_kl_matrix
from ..config import Config
from ..engine.checkpoint import atomic_write_text
from ..engine.seed import torch_generator
from ..errors import TailaugError
from .report import markdown_table, write_json


def analyze_generator(cfg: Config, cache: dict, generator, head: list[int], stage1_head, out: Path, *,
                      num_samples: int = 5) -> dict:
    """The paper's Table 5 (pairwise KL of five tail samples' transformation distributions,
    and each sample's most similar head class) and a t-SNE of real and augmented tail
    features, written to ``out``. ``cache`` is the run's feature cache, ``generator`` the
    trained generator, ``head`` the head classes it was trained on and ``stage1_head`` the
    stage-1 classifier (weight, bias, cosine_scale) for tokens chosen by the classifier."""
    from .plots import plot_tsne

    out = Path(out)
    counts = cache["class_counts"].tolist()
    aug_cfg = cfg.retrain.augmenter if isinstance(cfg.retrain.augmenter, STGAugmenter) else STGAugmenter(name="stg")
    augmenter: STGAugmenterModule = build_augmenter(aug_cfg, generator_module=generator)
    feats, labels = cache["train_features"], cache["train_labels"]
    augmenter.fit(AugmentContext(features=feats, labels=labels, class_counts=torch.tensor(counts),
                                 head_classes=head, classifier_weight=stage1_head.weight,
                                 classifier_bias=stage1_head.bias,
                                 classifier_cosine_scale=stage1_head.cosine_scale))
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
    out.mkdir(parents=True, exist_ok=True)
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
