"""A finished run as one module: ``tailaug.load(RUN_DIR)`` and ``tailaug predict``.

:func:`load` returns a :class:`Predictor`: the stage-1 backbone followed by the chosen
classifier, mapping a batch of preprocessed images to logits. Two paths lead to logits:

    images (uint8) --read/preprocess--> backbone --features--> head --> logits
                                                  features_to_logits(features) --> logits

so inputs that are already features of the run's backbone enter at ``features_to_logits``.

A run of ``data.dataset: embeddings`` has no backbone: :func:`load` returns an
:class:`EmbeddingsPredictor`, features [N, d] -> (L2 normalisation when
``data.embeddings.normalize``) -> head -> logits, reading feature files with the dataset's
own reader (labels optional). Decision: an image run given an embeddings file is an error
(the run takes images), not its head applied to the features: features of the right
dimension need not come from the run's backbone (a fine-tuned one never matches
``tailaug embed``), so the predictions would look right and be wrong.

Classifiers (``classifier=``): ``stage1`` (the head trained with the backbone), ``crt``
(the stage-3 row of ``retrain.method`` without augmenter), ``augmented`` (the stage-3 row
with ``retrain.augmenter``) and ``final``: the augmented row if the run has one, else the
plain stage-3 row, else stage 1. Stage-3 classifiers are read from their stored tensors
(``stages.stored_head``); nothing of the training data is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .data.embeddings import EXTENSIONS as EMBEDDING_SUFFIXES
from .errors import DataError, TailaugError

CHOICES = ("final", "crt", "augmented", "stage1")


class Predictor(nn.Module):
    """backbone + head: preprocessed images [N, C, S, S] -> logits [N, classes].

    ``transform`` turns a uint8 batch into the backbone's input, :meth:`read` reads image
    files into such a batch; ``class_names`` name the logits; ``classifier`` says which
    classifier the head is (a row label of results.json, e.g. ``cRT + STG (lambda 1.5)``).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, transform, class_names: Sequence[str],
                 classifier: str, image_size: int, in_channels: int, resize: int | None = None):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.transform = transform
        self.class_names = list(class_names)
        self.classifier = classifier
        self.image_size, self.in_channels = image_size, in_channels
        self.resize = resize  # the shorter side before the centre crop (None: image_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise DataError(f"this run takes images [N, C, S, S] (preprocess(read(paths))), not a tensor of shape "
                            f"{tuple(images.shape)}; features of its own backbone go through features_to_logits")
        return self.head(self.backbone(images))

    def features_to_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of backbone features [N, d] (the path of inputs that are embeddings already)."""
        return self.head(features)

    def read(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """uint8 [N, C, S, S] of image files, as the run's test images were read (size, channels, the
        natural pipeline's evaluation resize)."""
        from .data.sources import read_image

        fix = "give image files (jpg, png, ...) or folders of them"
        for path in map(Path, paths):
            if path.suffix.lower() in EMBEDDING_SUFFIXES:
                raise DataError(_embeddings_to_image_run(path))
        return torch.stack([read_image(Path(p), self.image_size, self.in_channels, fix=fix, resize=self.resize)
                            for p in paths])

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


class EmbeddingsPredictor(nn.Module):
    """A run of ``data.dataset: embeddings``: features [N, d] -> logits [N, classes], with the
    run's L2 normalisation (``normalize``) before the head. :meth:`read` reads a feature file
    as the dataset does; ``features_to_logits`` is ``forward`` (the inputs are features)."""

    def __init__(self, head: nn.Module, dim: int, normalize: bool, class_names: Sequence[str], classifier: str,
                 features_name: str | None = None, labels_name: str | None = None):
        super().__init__()
        self.head, self.dim, self.normalize = head, dim, normalize
        self.class_names = list(class_names)
        self.classifier = classifier
        self.features_name, self.labels_name = features_name, labels_name

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise DataError(f"this run takes embeddings [N, {self.dim}] (data.dataset embeddings), not a tensor of "
                            f"shape {tuple(features.shape)}; give features from the model that made its training "
                            "embeddings")
        features = features.float()
        if self.normalize:
            features = nn.functional.normalize(features, dim=1, eps=1e-12)
        return self.head(features)

    features_to_logits = forward

    def read(self, path: str | Path) -> tuple[torch.Tensor, np.ndarray | None]:
        """(features [N, d] float32, the file's labels or None) of one .npz/.npy/.parquet/.safetensors
        file, read and checked like the run's data (features/labels named by data.embeddings)."""
        from .data.embeddings import as_tensor, read_embeddings

        path = Path(path)
        if path.suffix.lower() not in EMBEDDING_SUFFIXES:
            raise DataError(_images_to_embeddings_run(path))
        x, labels = read_embeddings(path, features_name=self.features_name, labels_name=self.labels_name,
                                    labels_optional=True)
        if x.shape[1] != self.dim:
            raise DataError(f"{path} holds {x.shape[1]}-d features but the run was trained on {self.dim}-d ones; "
                            "give features from the model that made its training embeddings")
        return as_tensor(x), labels

    @property
    def device(self) -> torch.device:
        return next(self.head.buffers()).device

    @torch.no_grad()
    def predict_features(self, features: torch.Tensor) -> torch.Tensor:
        """Class probabilities [N, classes] of a feature batch."""
        self.eval()
        return self(features.to(self.device)).float().softmax(1).cpu()

    def predict_files(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """Class probabilities [N, classes] of every row of the feature files, in order."""
        return torch.cat([self.predict_features(self.read(p)[0]) for p in paths])


def _embeddings_to_image_run(path: Path) -> str:
    return (f"{path} is an embeddings file, and this run takes images (its data.dataset is not embeddings): give "
            "image files or folders of them (features of the run's own backbone: tailaug.load(RUN_DIR)"
            ".features_to_logits in Python)")


def _images_to_embeddings_run(path: Path) -> str:
    return (f"{path} is not an embeddings file, and this run takes embeddings (data.dataset embeddings): give "
            f"{', '.join(EMBEDDING_SUFFIXES)} files of features from the model that made its training embeddings")


def load(run_dir: str | Path, classifier: str = "final",
         device: str | torch.device = "cpu") -> Predictor | EmbeddingsPredictor:
    """The finished run in ``run_dir`` as a :class:`Predictor` (an :class:`EmbeddingsPredictor`
    for a run of ``data.dataset: embeddings``), in eval mode on ``device``."""
    from .commands import load_run_config
    from .data.datasets import NUM_CLASSES, class_names_of, normalisation
    from .data.natural import NaturalTransform, pipeline
    from .data.sources import dataset_spec
    from .engine.checkpoint import load_state
    from .models import build_model, input_spec
    from .stages.keys import stage1_key
    from .stages.stage1_model import (checkpoint_fix, checkpoint_path, finished_key, load_stage1_checkpoint,
                                      preprocessing)

    if classifier not in CHOICES:
        raise TailaugError(f"unknown classifier {classifier!r}; choose one of {', '.join(CHOICES)}")
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if finished_key(run_dir) != stage1_key(cfg):
        raise TailaugError(f"stage 1 in {run_dir} has not finished with its config.yaml; finish the run with "
                           f"'tailaug run {run_dir / 'config.yaml'}' first")
    if cfg.data.dataset == "embeddings":
        return _load_embeddings(cfg, run_dir, classifier).to(device).eval()
    ckpt = load_stage1_checkpoint(run_dir)
    num_classes = int(ckpt["model"]["head.weight"].shape[0])
    d = cfg.data
    builtin = d.dataset in NUM_CLASSES  # else images from files: RGB at data.image_size
    classes = _classes(run_dir)
    names = classes.get("names") or class_names_of(d) or [str(c) for c in range(num_classes)]
    in_channels = int(classes.get("in_channels") or (dataset_spec(d.dataset)[1] if builtin else 3))
    image_size = dataset_spec(d.dataset)[2] if builtin else d.image_size
    model = build_model(cfg.model.model_copy(update={"weights": None}), num_classes, in_channels)
    load_state(model, ckpt["model"], checkpoint_path(run_dir), checkpoint_fix(run_dir))
    head, label = _classifier(cfg, run_dir, classifier, model.head)
    mean, std = normalisation(d.dataset)
    transform = preprocessing(cfg, mean, std, input_spec(model))
    resize = NaturalTransform.from_config(d).eval_resize if pipeline(d) == "natural" else None  # the test view
    return Predictor(model.backbone, head, transform, names, label, image_size, in_channels,
                     resize).to(device).eval()


def _classes(run_dir: Path) -> dict:
    """classes.json of the run ({} without one)."""
    from .evaluation.report import read_json
    from .stages.stage1_model import classes_path

    path = classes_path(run_dir)
    return read_json(path, fix="delete it; predictions then name classes by label") if path.is_file() else {}


def _load_embeddings(cfg, run_dir: Path, classifier: str) -> EmbeddingsPredictor:
    """The predictor of an embeddings run: the stage-1 linear head is read from the feature cache."""
    from .stages.feature_cache import stage1_head_tensors
    from .stages.features import stage1_classifier
    from .stages.stored_head import StoredHead

    fix = f"rerun 'tailaug run {run_dir / 'config.yaml'}' (stage 1 trains its linear head again in seconds)"
    cache = stage1_head_tensors(run_dir, cfg, fix)
    stage1 = StoredHead(*stage1_classifier(cache, cfg)).eval()
    head, label = _classifier(cfg, run_dir, classifier, stage1)
    num_classes = int(cache["head_weight"].shape[0])
    classes = _classes(run_dir)
    names = classes.get("names") or classes.get("class_names") or [str(c) for c in range(num_classes)]
    e = cfg.data.embeddings
    return EmbeddingsPredictor(head, int(cache["head_weight"].shape[1]), e.normalize, names, label,
                               e.features_name, e.labels_name)


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


def expand_inputs(inputs: Sequence[str | Path], embeddings: bool = False) -> list[Path]:
    """Image files and the image files in folders (any depth, sorted), in the order given;
    with ``embeddings`` (a run of data.dataset embeddings) feature files."""
    from .data.image_folders import image_files

    out: list[Path] = []
    for item in map(Path, inputs):
        if embeddings:
            if item.suffix.lower() not in EMBEDDING_SUFFIXES:
                raise DataError(_images_to_embeddings_run(item))
            if not item.is_file():
                raise DataError(f"input {item} does not exist; give {', '.join(EMBEDDING_SUFFIXES)} files of features")
            out.append(item)
        elif item.is_dir():
            found = image_files(item)
            if not found:
                raise DataError(f"folder {item} holds no image files (jpg, png, ...); give image files or folders")
            out += found
        elif item.is_file():
            if item.suffix.lower() in EMBEDDING_SUFFIXES:
                raise DataError(_embeddings_to_image_run(item))
            out.append(item)
        else:
            raise DataError(f"input {item} does not exist; give image files or folders of them")
    return out
