"""The feature-augmenter interface that stage 3 calls on every mini-batch.

Stage 3 (classifier re-training on cached features, ``tailaug.stages.classifier``) drives an
augmenter through these hooks and knows nothing else about it:

1. :meth:`FeatureAugmenter.fit` once before re-training, with an :class:`AugmentContext`
   (all training features and labels, class counts, the head classes, the stage-1
   classifier; the validation features and the backbone's spatial maps when the options
   ask for them). Explicit augmenters build their statistics here (class prototypes, class
   means and covariances, ...).
2. :meth:`FeatureAugmenter.set_epoch` at the start of every epoch (for schedules such as
   ISDA's ramp of lambda, or augmenters that switch on late like RSG).
3. :meth:`FeatureAugmenter.forward` on every batch: ``(features, labels) -> (features,
   labels)``. It may replace rows, append rows (then it appends their labels too), or do
   nothing. All randomness comes from the ``generator`` argument, so that a seeded stage 3
   is reproducible.
4. :meth:`FeatureAugmenter.adjust_loss_inputs` on every batch after the classifier's forward
   pass: the batch's :class:`~tailaug.losses.LossInputs` (logits, labels, the features the
   classifier read, the cosines of a cosine head) and the classifier; it returns what the
   loss sees. The default changes nothing; an implicit augmenter (ISDA) adds its term to the
   logits here instead of producing rows.
5. :meth:`FeatureAugmenter.after_epoch` at the end of every epoch with the classifier being
   trained (e.g. to score it on the validation split); what it returns is added to that
   epoch's record of the stage-3 history.

During representation learning (``train.feature_augmenter``, options with ``stage1``) the
stage-1 trainer calls the same ``fit`` (with ``ctx.online``: the features change every step),
``set_epoch``, ``adjust_loss_inputs`` (with the network's head) and ``after_epoch``, and two
more: :meth:`FeatureAugmenter.virtual` (extra feature rows to send through the head with the
batch; default none) and :meth:`FeatureAugmenter.observe` (the batch's features after the
step's loss; default nothing). Its ``state_tensors`` join the stage-1 checkpoint. An
augmenter that learns from a meta batch (MetaSAug) asks for one with :meth:`FeatureAugmenter.meta_rows`
and gets it, with the module and the loss, through :meth:`FeatureAugmenter.set_meta_step`
(:mod:`tailaug.augment.meta`; stages 1 and 3).

What an augmenter needs beyond the cached features its options declare, and the pipeline
provides it without knowing the augmenter: ``uses_generator`` (the stage-2 generator),
``needs_validation`` (the validation features; a config without a validation split is an
error) and :meth:`AugmenterOptions.spatial_request` (the last convolutional maps of the
training images, cached or recomputed: :class:`SpatialMaps`). ``implicit`` says that it
changes the loss and produces no rows (an over-sampler cannot use it).

The ``targets`` option of every augmenter: ``"tail"`` augments only samples of non-head
classes, ``"all"`` every sample.

A new augmenter is one file in this package: its options model (a subclass of
:class:`AugmenterOptions` with ``name: Literal["..."]``, the keys of ``retrain.augmenter``)
and its module class, registered together with ``@AUGMENTERS.register(name,
config=Options)``. :func:`build_augmenter` turns a config section into a module through
the class's ``from_config`` (by default: the options other than ``name`` as keyword
arguments).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Literal, Mapping

import torch
from pydantic import ValidationError
from torch import nn

from ..data.classes import check_labels, class_means
from ..engine.shards import CHUNK_ROWS, ShardedArray, dense
from ..errors import ConfigError
from ..registry import AUGMENTERS, Section

if TYPE_CHECKING:  # the config imports the augmenters, and the losses import the config
    from ..losses.base import LossInputs

TARGETS = ("tail", "all")


@dataclasses.dataclass(frozen=True)
class SpatialRequest:
    """How an augmenter wants the spatial maps: ``online`` recomputed from the frozen backbone
    whenever asked (nothing stored), else cached once in ``dtype`` ("bfloat16" or "float32")."""

    online: bool = False
    dtype: str = "bfloat16"


class AugmenterOptions(Section):
    """Base of the options of every augmenter (``retrain.augmenter``).

    ``uses_generator``: the augmenter needs the stage-2 generator (the pipeline trains it).
    ``needs_validation``: it reads the validation features (``AugmentContext.validation``).
    ``stage1``: it also works on the backbone's features in stage 1 (``train.feature_augmenter``;
    such a module implements ``observe`` and ``virtual``, see :mod:`tailaug.augment.fasa`).
    ``stage1_fit_reads_features``: its stage-1 ``fit`` reads the values of the training (and
    validation) features; when False the trainer skips the forward pass over the training set
    and passes :func:`sizes_only` features (an augmenter that keeps its statistics from the
    batches, like ISDA, needs only N and d).
    ``implicit``: it acts on the loss (``adjust_loss_inputs``) and produces no feature rows.
    ``spatial_request()``: a :class:`SpatialRequest` when it reads the backbone's spatial maps.
    ``label()``: how result tables name the augmenter.
    """

    uses_generator: ClassVar[bool] = False
    needs_validation: ClassVar[bool] = False
    stage1: ClassVar[bool] = False  # also usable during representation learning (train.feature_augmenter)
    stage1_fit_reads_features: ClassVar[bool] = True  # its stage-1 fit reads the features' values
    implicit: ClassVar[bool] = False  # changes the loss's inputs instead of producing rows

    def spatial_request(self) -> SpatialRequest | None:
        return None

    def label(self) -> str:
        return self.name


class SpatialMaps:
    """The maps of the stage-1 backbone's last convolutional stage for the (un-augmented)
    training images, whose spatial mean is the cached feature: what class activation maps
    are computed on. ``index`` [N] (dataset indices) and ``labels`` [N] list the images;
    :meth:`maps` returns the float32 maps [B, d, h, w] of some of them on ``device``.
    ``tailaug.stages.spatial`` has the two sources: a cache (offline) and the frozen backbone
    (online); both round to the same dtype, so they give the same maps."""

    index: torch.Tensor
    labels: torch.Tensor

    def maps(self, index: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        raise NotImplementedError


class NoAugmenter(AugmenterOptions):
    name: Literal["none"] = "none"


def sizes_only(rows: int, dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A [rows, dim] float32 placeholder of NaN holding one element (an expanded view): the
    features of a context whose augmenter reads only their sizes (``stage1_fit_reads_features``)."""
    return torch.full((1, 1), float("nan"), device=device).expand(rows, dim)


@dataclasses.dataclass(kw_only=True)
class AugmentContext:
    """What an augmenter may look at before re-training (all on one device).

    ``features`` [N, d] and ``labels`` [N] are the stage-3 training set; ``class_counts``
    [C] the number of training images per class (for beta_y of STG, the count of images,
    not of rows when several views are cached); ``head_classes`` the classes that count as
    head (their samples are not augmented with ``targets="tail"``); ``classifier_weight``
    [C, d] and ``classifier_bias`` [C] the stage-1 classifier, or None when unknown;
    ``classifier_cosine_scale`` is set when that classifier is a cosine head (its logits are
    ``scale * cos(w_c, a)``, see :func:`tailaug.models.heads.head_logits`), None for a linear one.
    ``online`` is True during representation learning (``train.feature_augmenter``): the
    features change with every step, so statistics are kept from the batches rather than
    fitted once on ``features`` (which then only give the sizes and a starting point; with
    ``stage1_fit_reads_features`` False in the options, :func:`sizes_only` placeholders).

    In stage 3 ``features`` may be a :class:`~tailaug.engine.shards.ShardedArray` (the
    memory-mapped cache, float32 rows on ``device`` by slice or index): statistics go through
    :meth:`class_means` and :meth:`row_mean`, which read it ``CHUNK_ROWS`` rows at a time;
    :meth:`dense_features` holds it in memory.
    """

    features: torch.Tensor
    labels: torch.Tensor
    class_counts: torch.Tensor
    head_classes: list[int]
    classifier_weight: torch.Tensor | None = None
    classifier_bias: torch.Tensor | None = None
    classifier_cosine_scale: float | None = None
    num_classes: int | None = None
    index: torch.Tensor | None = None  # dataset index per row (several views share one)
    validation: tuple[torch.Tensor, torch.Tensor] | None = None  # (features, labels) of the validation split
    spatial: SpatialMaps | None = None  # the training images' spatial maps, when the options ask for them
    online: bool = False  # stage 1: the features change every step

    def __post_init__(self):
        if not isinstance(self.features, ShardedArray):
            self.features = torch.as_tensor(self.features)
        if self.features.ndim != 2:
            raise ValueError(f"features must be [N, d], got shape {tuple(self.features.shape)}")
        self.labels = torch.as_tensor(self.labels, device=self.features.device).long()
        if self.labels.shape != (self.features.shape[0],):
            raise ValueError(
                f"labels must be [N] with N={self.features.shape[0]}, got shape {tuple(self.labels.shape)}"
            )
        self.class_counts = torch.as_tensor(self.class_counts, device=self.features.device).long()
        if self.num_classes is None:
            self.num_classes = int(self.class_counts.numel())
        if self.class_counts.shape != (self.num_classes,):
            raise ValueError(
                f"class_counts must have one entry per class ({self.num_classes}), "
                f"got shape {tuple(self.class_counts.shape)}"
            )
        check_labels(self.labels, self.num_classes)
        self.head_classes = sorted(int(c) for c in self.head_classes)
        bad = [c for c in self.head_classes if not 0 <= c < self.num_classes]
        if bad:
            raise ValueError(f"head classes {bad} are not in 0..{self.num_classes - 1}")
        d = self.features.shape[1]
        if self.classifier_weight is not None:
            self.classifier_weight = torch.as_tensor(self.classifier_weight, device=self.features.device)
            if self.classifier_weight.shape != (self.num_classes, d):
                raise ValueError(
                    f"classifier_weight must be [C, d] = [{self.num_classes}, {d}], "
                    f"got {tuple(self.classifier_weight.shape)}"
                )
        if self.classifier_bias is not None:
            self.classifier_bias = torch.as_tensor(self.classifier_bias, device=self.features.device)
            if self.classifier_bias.shape != (self.num_classes,):
                raise ValueError(f"classifier_bias must be [C], got {tuple(self.classifier_bias.shape)}")
            if self.classifier_cosine_scale is not None:
                raise ValueError(
                    "a cosine classifier has no bias; pass classifier_bias=None with classifier_cosine_scale"
                )

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def head_mask(self) -> torch.Tensor:
        """Bool [C], True for head classes."""
        mask = torch.zeros(self.num_classes, dtype=torch.bool, device=self.features.device)
        if self.head_classes:
            mask[torch.tensor(self.head_classes, device=mask.device)] = True
        return mask

    def class_means(self, classes: Iterable[int] | None = None) -> torch.Tensor:
        """Mean feature of each listed class (default: all), [len(classes), d]; zero if empty."""
        means = class_means(self.features, self.labels, self.num_classes)
        if classes is None:
            return means
        return means[torch.tensor([int(c) for c in classes], dtype=torch.long, device=means.device)]

    def row_mean(self, fn) -> torch.Tensor:
        """The mean over all rows of ``fn(features [n, d] float32, labels [n])`` ([n, ...] per row):
        at once up to ``CHUNK_ROWS`` rows, else the sum of per-chunk sums over N (the same for a
        tensor and a ShardedArray)."""
        n = self.features.shape[0]
        if n <= CHUNK_ROWS:
            return fn(self.features[0:n].float(), self.labels).mean(0)
        total = sum(fn(self.features[s : s + CHUNK_ROWS].float(), self.labels[s : s + CHUNK_ROWS]).sum(0)
                    for s in range(0, n, CHUNK_ROWS))
        return total / n

    def feature_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(min [d], max [d]) of every coordinate over the training rows, ``CHUNK_ROWS`` at a time."""
        low = high = None
        for s in range(0, self.features.shape[0], CHUNK_ROWS):
            chunk = self.features[s : s + CHUNK_ROWS].float()
            low = chunk.amin(0) if low is None else torch.minimum(low, chunk.amin(0))
            high = chunk.amax(0) if high is None else torch.maximum(high, chunk.amax(0))
        return low, high

    def dense_features(self) -> torch.Tensor:
        """All training features in memory (float32), for an augmenter that needs them at once."""
        return dense(self.features).float()


@AUGMENTERS.register("none", config=NoAugmenter)
class FeatureAugmenter(nn.Module):
    """Base class: the identity augmenter. Subclasses override what they need."""

    name = "none"

    def __init__(self, targets: str = "tail"):
        super().__init__()
        if targets not in TARGETS:
            raise ConfigError(f"augmenter targets must be one of {', '.join(TARGETS)}, got {targets!r}")
        self.targets = targets
        self.register_buffer("target_classes", None, persistent=False)  # bool [C] after fit
        self.fitted = False

    @classmethod
    def from_config(cls, cfg: AugmenterOptions, generator_module: nn.Module | None = None) -> "FeatureAugmenter":
        """The augmenter of a ``retrain.augmenter`` section: its options as keyword arguments."""
        return cls(**cfg.model_dump(exclude={"name"}))

    # ------------------------------------------------------------------ hooks

    def fit(self, ctx: AugmentContext) -> None:
        """Called once before re-training. Subclasses call ``super().fit(ctx)`` first."""
        if self.targets == "all":
            self.target_classes = torch.ones(ctx.num_classes, dtype=torch.bool, device=ctx.features.device)
        else:
            if type(self) is not FeatureAugmenter and len(ctx.head_classes) == ctx.num_classes:
                raise ConfigError(
                    f"all {ctx.num_classes} classes are head classes, so the {self.name} augmenter with "
                    "targets: tail would augment nothing; shrink the head set (stg.head) or set "
                    "retrain.augmenter.targets: all"
                )
            self.target_classes = ~ctx.head_mask
        self.fitted = True

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        """Called at the start of every stage-3 epoch (0-based)."""

    def after_epoch(self, classifier: nn.Module, epoch: int, validation=None) -> dict:
        """Called at the end of every epoch with the classifier being trained (and in stage 1
        with this epoch's validation features and labels); the entries returned join that
        epoch's history record (JSON values)."""
        return {}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The state a stage-1 checkpoint keeps so that a resumed run continues it exactly."""
        return {}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_tensors` (after :meth:`fit`)."""

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One training batch in, the batch to train on out (rows may be replaced or appended)."""
        return features, labels

    def adjust_loss_inputs(self, inputs: LossInputs, head: nn.Module) -> LossInputs:
        """What the loss sees of a batch, given what ``head`` (the classifier being trained)
        computed from ``inputs.features``; by default ``inputs`` unchanged."""
        return inputs

    def virtual(self, rows: int, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Stage 1: extra (features, labels) to send through the head with a batch of ``rows``
        images, or None (the default)."""
        return None

    def observe(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Stage 1: the batch's features (after the step's loss); by default ignored."""

    def meta_rows(self) -> int:
        """Rows of the meta batch this step's meta step needs (0, the default: no meta step);
        the same on every step of an epoch (stage 1 decodes an epoch's meta images ahead). When
        positive, the trainer passes a :class:`~tailaug.augment.meta.MetaStep` to :meth:`set_meta_step`
        before :meth:`adjust_loss_inputs` (see :mod:`tailaug.augment.meta`)."""
        return 0

    def set_meta_step(self, meta) -> None:
        """Receive this step's :class:`~tailaug.augment.meta.MetaStep` (when ``meta_rows() > 0``)."""

    # ------------------------------------------------------------------ helpers

    def target_rows(self, labels: torch.Tensor) -> torch.Tensor:
        """Bool [B]: which rows of a batch this augmenter augments."""
        if not self.fitted or self.target_classes is None:
            raise RuntimeError(f"{type(self).__name__}.fit(ctx) must be called before augmenting")
        return self.target_classes.to(labels.device)[labels]

    def extra_repr(self) -> str:
        return f"targets={self.targets!r}"


# --------------------------------------------------------------------------- registry


def build_augmenter(cfg: Any, generator_module: nn.Module | None = None) -> FeatureAugmenter:
    """A :class:`FeatureAugmenter` from a ``retrain.augmenter`` config section (or a mapping).

    ``generator_module`` is the trained stage-2 generator, for augmenters whose options say
    ``uses_generator``.
    """
    if cfg is None:
        cfg = {"name": "none"}
    if isinstance(cfg, Mapping):
        entry = AUGMENTERS.get(cfg.get("name"))
        try:
            cfg = entry.config.model_validate(dict(cfg))
        except ValidationError as exc:
            raise ConfigError(f"retrain.augmenter is not valid: {exc}") from None
    return AUGMENTERS.get(cfg.name).obj.from_config(cfg, generator_module=generator_module)
