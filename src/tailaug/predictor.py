"""A finished run as one module: ``tailaug.load(RUN_DIR)`` and ``tailaug predict``.

:func:`load` returns a :class:`Predictor`: the stage-1 backbone followed by the chosen
classifier, mapping a batch of preprocessed images to logits. Two paths lead to logits:

    images (uint8) --read/preprocess--> backbone --features--> head --> logits
                                                  features_to_logits(features) --> logits

so inputs that are already features (embeddings) enter at ``features_to_logits``.

Classifiers (``classifier=``): ``stage1`` (the head trained with the backbone), ``crt``
(the stage-3 row of ``retrain.method`` without augmenter), ``augmented`` (the stage-3 row
with ``retrain.augmenter``) and ``final``: the augmented row if the run has one, else the
plain stage-3 row, else stage 1. Stage-3 classifiers are read from their stored tensors
(``stages.stored_head``); nothing of the training data is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .errors import DataError, TailaugError

CHOICES = ("final", "crt", "augmented", "stage1")


class Predictor(nn.Module):
    """backbone + head: preprocessed images [N, C, S, S] -> logits [N, classes].

    ``transform`` turns a uint8 batch into the backbone's input, :meth:`read` reads image
    files into such a batch; ``class_names`` name the logits; ``classifier`` says which
    classifier the head is (a row label of results.json, e.g. ``cRT + STG (lambda 1.5)``).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, transform, class_names: Sequence[str],
                 classifier: str, image_size: int, in_channels: int):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.transform = transform
        self.class_names = list(class_names)
        self.classifier = classifier
        self.image_size, self.in_channels = image_size, in_channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def features_to_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of backbone features [N, d] (the path of inputs that are embeddings already)."""
        return self.head(features)

    def read(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """uint8 [N, C, S, S] of image files, as the run's data was read (size, channels)."""
        from .data.sources import read_image

        fix = "give image files (jpg, png, ...) or folders of them"
        return torch.stack([read_image(Path(p), self.image_size, self.in_channels, fix=fix) for p in paths])

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """A uint8 batch -> the backbone's input (resized and normalised like the test images)."""
        return self.transform(images.to(self.device))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def predict_files(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """Class probabilities [N, classes] of image files."""
        self.eval()
        return self(self.preprocess(self.read(paths))).float().softmax(1).cpu()


def load(run_dir: str | Path, classifier: str = "final", device: str | torch.device = "cpu") -> Predictor:
    """The finished run in ``run_dir`` as a :class:`Predictor` (eval mode, on ``device``)."""
    from .commands import load_run_config
    from .data.datasets import MEAN_STD, class_names_of
    from .data.sources import dataset_spec
    from .engine.checkpoint import load_state
    from .evaluation.report import read_json
    from .models import build_model, input_spec
    from .stages.keys import stage1_key
    from .stages.stage1_model import (checkpoint_fix, checkpoint_path, classes_path, finished_key,
                                      load_stage1_checkpoint, preprocessing)

    if classifier not in CHOICES:
        raise TailaugError(f"unknown classifier {classifier!r}; choose one of {', '.join(CHOICES)}")
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if finished_key(run_dir) != stage1_key(cfg):
        raise TailaugError(f"stage 1 in {run_dir} has not finished with its config.yaml; finish the run with "
                           f"'tailaug run {run_dir / 'config.yaml'}' first")
    ckpt = load_stage1_checkpoint(run_dir)
    num_classes = int(ckpt["model"]["head.weight"].shape[0])
    d = cfg.data
    builtin = d.dataset != "image_folder"
    classes = read_json(classes_path(run_dir), fix="delete it; predictions then name classes by label") \
        if classes_path(run_dir).is_file() else {}
    names = classes.get("names") or class_names_of(d) or [str(c) for c in range(num_classes)]
    in_channels = int(classes.get("in_channels") or (dataset_spec(d.dataset)[1] if builtin else 3))
    image_size = dataset_spec(d.dataset)[2] if builtin else d.image_size
    model = build_model(cfg.model.model_copy(update={"weights": None}), num_classes, in_channels)
    load_state(model, ckpt["model"], checkpoint_path(run_dir), checkpoint_fix(run_dir))
    head, label = _classifier(cfg, run_dir, classifier, model.head)
    mean, std = MEAN_STD[d.dataset]
    transform = preprocessing(cfg, mean, std, input_spec(model))
    return Predictor(model.backbone, head, transform, names, label, image_size, in_channels).to(device).eval()


def _classifier(cfg, run_dir: Path, choice: str, stage1_head: nn.Module) -> tuple[nn.Module, str]:
    """(head, its label) of ``choice`` in ``run_dir``."""
    from .augment.base import NoAugmenter
    from .engine.checkpoint import load_tensors
    from .stages.pipeline import retrain_files
    from .stages.stored_head import load_head

    def stored(augmenter):
        _, _, label, _, path = retrain_files(cfg, run_dir, augmenter)
        return (path, label) if path.is_file() else (None, label)

    augmenter = cfg.retrain.augmenter
    rows = {"crt": stored(NoAugmenter())}
    if augmenter.name != "none":
        rows["augmented"] = stored(augmenter)
    if choice == "stage1":
        return stage1_head, "stage 1"
    if choice == "final":
        found = [name for name in ("augmented", "crt") if name in rows and rows[name][0] is not None]
        if not found:
            return stage1_head, "stage 1 (the run has no stage-3 classifier)"
        choice = found[0]
    if choice not in rows:
        raise TailaugError(f"{run_dir} has no augmented classifier (retrain.augmenter is none); use --classifier "
                           "crt or stage1")
    path, label = rows[choice]
    if path is None:
        raise TailaugError(f"{run_dir} holds no stage-3 classifier '{label}' of its config.yaml; finish the run "
                           f"with 'tailaug run {run_dir / 'config.yaml'}' first")
    return load_head(load_tensors(path), path), label


EMBEDDING_SUFFIXES = (".npz", ".npy", ".parquet", ".safetensors")


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files and the image files in folders (any depth, sorted), in the order given."""
    from .data.image_folders import image_files

    out: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = image_files(item)
            if not found:
                raise DataError(f"folder {item} holds no image files (jpg, png, ...); give image files or folders")
            out += found
        elif item.is_file():
            if item.suffix.lower() in EMBEDDING_SUFFIXES:
                raise DataError(f"{item} is an embeddings file; predicting on embeddings needs a run of data.dataset "
                                "embeddings (its features go through Predictor.features_to_logits); give images here")
            out.append(item)
        else:
            raise DataError(f"input {item} does not exist; give image files or folders of them")
    return out
