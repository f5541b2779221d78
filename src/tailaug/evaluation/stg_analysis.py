"""Analyses of a trained semantic transformation generator (paper Table 5 and a t-SNE)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..augment.base import build_augmenter
from ..augment.stg import STGAugmenter, STGAugmenterModule, transformation_kl_matrix
from ..config import Config
from ..engine.checkpoint import atomic_write_text
from ..engine.seed import torch_generator
from ..data.datasets import CLASS_NAMES
from .report import markdown_table, write_json


def analyze_generator(cfg: Config, cache: dict, generator, head: list[int], stage1_head, out: Path, *,
                      num_samples: int = 5) -> dict:
    """The paper's Table 5 (pairwise KL of five tail samples' transformation distributions,
    and each sample's most similar head class) and a t-SNE of real and augmented tail
    features, written to ``out``. ``cache`` is the run's feature cache, ``generator`` the
    trained generator, ``head`` the head classes it was trained on and ``stage1_head`` the
    stage-1 classifier (weight, bias, cosine_scale) for tokens chosen by the classifier."""
    from .augmented import augmented_tsne, fit_on_cache, original_rows, smallest_tail_classes

    out = Path(out)
    counts = cache["class_counts"].tolist()
    aug_cfg = cfg.retrain.augmenter if isinstance(cfg.retrain.augmenter, STGAugmenter) else STGAugmenter(name="stg")
    augmenter: STGAugmenterModule = fit_on_cache(build_augmenter(aug_cfg, generator_module=generator), cache, head,
                                                 stage1_head)
    feats, labels = cache["train_features"], cache["train_labels"]
    original = original_rows(cache)
    cls = smallest_tail_classes(counts, head, 1, min_count=num_samples)[0]
    gen = torch_generator(cfg.run.seed, 5)
    rows = torch.where(original & (labels == cls))[0]
    rows = rows[torch.randperm(len(rows), generator=gen)[:num_samples]]
    tokens = augmenter.token_classes(feats[rows], labels[rows])
    mu, sigma, _ = augmenter.transformation(feats[rows], labels[rows])
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
    png = augmented_tsne(augmenter, cache, sorted(smallest_tail_classes(counts, head, 3)), out / "stg_tsne.png",
                         seed=cfg.run.seed, label="STG", class_names=CLASS_NAMES.get(cfg.data.dataset))
    print(f"wrote {out / 'stg_kl.md'}, {out / 'stg_kl.json'} and {png}")
    return report
