"""What Feature Space Augmentation does to a few tail samples: the class activation map, the
class-specific / class-generic split, a donor of a confusing class and the synthesised map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..augment.base import AugmentContext, build_augmenter
from ..augment.fsa import FSAAugmenter, FSAOptions, split_features, synthesise
from ..config import Config
from ..engine.seed import torch_generator
from ..errors import TailaugError
from .report import write_json


def analyze_fsa(cfg: Config, stage1, cache: dict, head: list[int], stage1_head, out: Path, *,
                num_samples: int = 4) -> dict:
    """A PNG with one row per tail sample (image, normalised CAM, the positions above the
    threshold, specific part, generic part, a donor's generic part and the synthesised map;
    the parts as the channel norm per position) and a JSON summary, written to ``out``.
    ``stage1`` is the finished stage-1 model (its backbone gives the maps, online), ``cache``
    the feature cache, ``head`` the head classes and ``stage1_head`` the stage-1 classifier.
    The options are the run's ``retrain.augmenter`` when it is fsa, else the defaults."""
    from ..stages.spatial import BackboneSpatialMaps
    from .plots import plot_map_grid

    options = cfg.retrain.augmenter if isinstance(cfg.retrain.augmenter, FSAOptions) else FSAOptions(name="fsa")
    spatial = BackboneSpatialMaps(stage1, cfg.features.batch_size, torch.float32)
    augmenter: FSAAugmenter = build_augmenter(options)
    counts = cache["class_counts"].tolist()
    augmenter.fit(AugmentContext(features=cache["train_features"], labels=cache["train_labels"],
                                 class_counts=torch.tensor(counts), head_classes=head,
                                 classifier_weight=stage1_head.weight, classifier_bias=stage1_head.bias,
                                 classifier_cosine_scale=stage1_head.cosine_scale, spatial=spatial))
    gen = torch_generator(cfg.run.seed, 11)
    tail_index, donor_index, classes = augmenter.draw(gen)
    picked = [int(i) for c in sorted(augmenter.tail, key=lambda c: (counts[c], c))[:num_samples]
              for i in torch.where(classes == c)[0][:1]]
    if not picked:
        raise TailaugError("no tail class to analyse; check stg.head or retrain.augmenter.tail_max")
    t, g = tail_index[picked], donor_index[picked]
    maps_t, cam_t, mask_t = augmenter.decompose(t, "cpu")
    maps_g, cam_g, _ = augmenter.decompose(g, "cpu")
    specific, generic, _ = split_features(maps_t, cam_t, augmenter.threshold)
    _, donor_generic, _ = split_features(maps_g, cam_g, augmenter.threshold)
    new = synthesise(maps_t, mask_t, donor_generic)
    train = stage1.data.train
    columns = ["tail sample", "CAM (normalised)", f"CAM > {augmenter.threshold:g}", "class-specific",
               "class-generic", "donor's generic part", "synthesised"]
    rows, labels, summary = [], [], []
    for i in range(len(picked)):
        image = _image(train, int(t[i]))
        size = image.shape[:2]
        donor_class = int(augmenter._label_of[g[i]])
        rows.append([image, _up(cam_t[i], size), _up(mask_t[i].float(), size), _up(specific[i].norm(dim=0), size),
                     _up(generic[i].norm(dim=0), size), _up(donor_generic[i].norm(dim=0), size),
                     _up(new[i].norm(dim=0), size)])
        labels.append(f"class {int(classes[picked[i]])}, donor {donor_class}")
        summary.append({"tail_index": int(t[i]), "class": int(classes[picked[i]]), "donor_index": int(g[i]),
                        "donor_class": donor_class, "specific_fraction": float(mask_t[i].float().mean())})
    out = Path(out)
    png = plot_map_grid(rows, columns, out / "fsa_split.png", row_labels=labels,
                        title="FSA: class activation map and class-specific / class-generic split (channel norm)")
    confusing = {int(c): augmenter.confusers[k].tolist() for k, c in enumerate(augmenter.tail)}
    report = {"threshold": augmenter.threshold, "tail_classes": augmenter.tail, "confusing_classes": confusing,
              "samples": summary}
    write_json(out / "fsa_split.json", report)
    for s in summary:
        print(f"tail class {s['class']} image {s['tail_index']}: {100 * s['specific_fraction']:.0f}% of positions "
              f"class-specific; donor image {s['donor_index']} of confusing class {s['donor_class']}")
    print("confusing classes: " + ", ".join(f"{c} -> {v}" for c, v in confusing.items()))
    print(f"wrote {png} and {out / 'fsa_split.json'}")
    return report


def _image(split, index: int) -> np.ndarray:
    """[H, W] (grey) or [H, W, 3] uint8 image ``index`` of an in-memory split."""
    if split.images is None:
        image, _ = split.dataset[index]
        image = torch.as_tensor(np.asarray(image))
        if image.ndim == 3 and image.shape[-1] in (1, 3):
            image = image.permute(2, 0, 1)
    else:
        image = split.images[index]
    image = image.cpu()
    return image[0].numpy() if image.shape[0] == 1 else image[:3].permute(1, 2, 0).numpy()


def _up(grid: torch.Tensor, size) -> np.ndarray:
    """A [h, w] map resized to the image (nearest: the cells of the last stage stay visible)."""
    return F.interpolate(grid[None, None].float(), size=tuple(size), mode="nearest")[0, 0].numpy()
