"""ISDA: implicit semantic data augmentation (Wang et al. 2019; methods.md 5).

Each feature a of class y is treated as the mean of a Gaussian N(a, lambda * Sigma_y), Sigma_y
the covariance of class y's features; ISDA minimises the closed-form upper bound of the
expected cross-entropy over infinitely many such augmented features, which is the
cross-entropy of the logits

    z_j + (lambda / 2) (w_j - w_y)^T Sigma_y (w_j - w_y)    for every class j != y

(z_y unchanged), with lambda = lambda0 * epoch / E (epoch 0-based, E epochs: 0 in the first
epoch, lambda0 (E - 1) / E in the last, as the published code). Nothing is sampled.

- Statistics (:mod:`tailaug.augment.class_moments`): during representation learning
  (``train.feature_augmenter: {name: isda}``) the class means and covariances start empty and
  merge every batch's features (detached) before the batch's loss, exactly over all rows seen
  (as the published estimator, whose counts never reset); under DDP the batch sums of all
  ranks are merged, so every rank holds the same statistics; they are part of the stage-1
  checkpoint. In stage 3 (``retrain.augmenter: {name: isda}``) the features are fixed, so
  Sigma is that of all cached training rows, computed once.
- Cost: per batch, for the K = min(B, C) classes present (padded with absent ones), a [C]
  vector q_k(j) = (w_j - w_k)^T Sigma_k (w_j - w_k); each row takes the vector of its class.
  Nothing of shape batch x classes x features or batch x d x d is built: ``full`` forms
  (w_j - w_k) for blocks of classes (blocks x C x d), ``diagonal`` expands the square into
  three [K, C] products, ``lowrank`` adds |F_k^T (w_j - w_k)|^2 from [K, C, r] projections.
- Heads (:func:`tailaug.models.heads.linear_form`). A linear head: w_j as is. A cosine head
  (logits s * cos(w_j, a), e.g. for LDAM): the Gaussian variable is the normalised feature
  a / |a| (its statistics are kept on it) and w_j is s * w_j / |w_j|, so the term is exact for
  the head's logits, which are linear in a / |a|; the cosines the margin losses read get the
  same term divided by s. A loss that rescales cosines by its own s' thus sees lambda scaled
  by s / s'; left unset, ``model.cosine_scale`` is the margin loss's scale, so it is exact
  for LDAM too.
- Losses: the augmented logits (and cosines) go into the configured loss unchanged. The
  bound is exact for ce, balanced_softmax and logit_adjust (a per-class constant added to
  every logit does not change the Gaussian term) and ldam (its margin on z_y neither); for
  focal, label smoothing and the angular margins it is the same substitution of the logits,
  not a bound of their expectation. supcon reads the features, which are not changed.
- ``targets: tail`` adds the term to rows of non-head classes only (default ``all``, as ISDA).

Defaults: ``lambda0`` 0.5 is ISDA's published CIFAR value; ``covariance`` full is the
published estimator (C * d * d floats: 1 MiB for ResNet-32's 64-d features and 64 classes;
more than 2^28 floats, 1 GiB, is refused in favour of diagonal or lowrank); ``rank`` 8 for
lowrank is this implementation's choice (the paper keeps the full matrix).

For meta-learnt covariances (MetaSAug), :func:`class_quadratic` and :func:`implicit_shift`
are differentiable in the weights and in the Sigma tensors they are given.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from ..engine.indexing import pick
from ..errors import ConfigError
from ..registry import AUGMENTERS
from .base import AugmentContext, AugmenterOptions, FeatureAugmenter
from .class_moments import BLOCK, COVARIANCES, ClassMoments, Covariance, class_slots

# the config imports the augmenters (this one's subclass MetaSAug too, which imports this module), and the
# losses and models import the config: what needs them is imported where it is used
if TYPE_CHECKING:
    from ..losses.base import LossInputs

FULL_LIMIT = 2**28  # floats of a full covariance (C * d * d) above which it is refused
RANK = 8  # the default rank of the low-rank part: this implementation's choice


class ISDAOptions(AugmenterOptions):
    """``train.feature_augmenter`` / ``retrain.augmenter: {name: isda, ...}``."""

    stage1: ClassVar[bool] = True
    stage1_fit_reads_features: ClassVar[bool] = False  # online: the statistics come from the batches
    implicit: ClassVar[bool] = True
    name: Literal["isda"]
    lambda0: float = Field(0.5, ge=0)  # ISDA's published CIFAR value
    covariance: Literal["full", "diagonal", "lowrank"] = "full"
    rank: int = Field(RANK, ge=1)  # of the low-rank part (covariance: lowrank only)
    targets: Literal["tail", "all"] = "all"

    @model_validator(mode="after")
    def _rank_is_lowrank(self):
        if self.rank != RANK and self.covariance != "lowrank":  # the default is kept in saved configs
            raise ValueError(f"rank is read only with covariance: lowrank (this one is {self.covariance}); "
                             "remove rank or set covariance: lowrank")
        return self

    def label(self) -> str:
        return "ISDA"


def ramp(lambda0: float, epoch: int, total_epochs: int) -> float:
    """lambda of a 0-based ``epoch`` of ``total_epochs``: lambda0 * epoch / total_epochs."""
    return lambda0 * epoch / total_epochs


def class_quadratic(weight: torch.Tensor, classes: torch.Tensor, cov: Covariance) -> torch.Tensor:
    """q [K, C]: q[k, j] = (w_j - w_c)^T Sigma_k (w_j - w_c) with c = classes[k], for ``weight``
    [C, d] and the Sigma_k of ``cov`` (K of them); differentiable in both."""
    num_classes, dim = weight.shape
    own = pick(weight, classes)
    if cov.full is not None:
        step = max(1, BLOCK // (num_classes * dim))
        blocks = []
        for start in range(0, classes.numel(), step):
            diff = weight[None] - own[start : start + step, None]  # [k, C, d]
            blocks.append((diff @ cov.full[start : start + step] * diff).sum(-1))
        return torch.cat(blocks) if blocks else weight.new_zeros(0, num_classes)
    var = cov.diagonal
    q = var @ weight.square().t() - 2 * (var * own) @ weight.t() + (var * own.square()).sum(1, keepdim=True)
    q = q.clamp_min(0)
    if cov.factor is not None:
        step = max(1, BLOCK // (num_classes * cov.factor.shape[2]))
        blocks = []
        for start in range(0, classes.numel(), step):
            factor = cov.factor[start : start + step]  # [k, d, r]
            proj = torch.einsum("cd,kdr->kcr", weight, factor)
            mine = torch.einsum("kd,kdr->kr", own[start : start + step], factor)
            blocks.append((proj - mine[:, None]).square().sum(-1))
        if blocks:
            q = q + torch.cat(blocks)
    return q


def implicit_shift(weight: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor, slot: torch.Tensor,
                   cov: Covariance, lam: float) -> torch.Tensor:
    """[B, C]: (lambda / 2) (w_j - w_y)^T Sigma_y (w_j - w_y) for every row (label y) and class j,
    zero at j = y. ``classes`` [K] and ``slot`` [C] come from ``class_slots`` (row i's class is
    ``classes[slot[labels[i]]]``), ``cov`` holds Sigma of ``classes``."""
    q = pick(class_quadratic(weight, classes, cov), slot[labels])
    own = F.one_hot(labels, weight.shape[0]).bool()
    return torch.where(own, torch.zeros_like(q), 0.5 * lam * q)


@AUGMENTERS.register("isda", config=ISDAOptions, label="ISDA")
class ISDAAugmenter(FeatureAugmenter):
    """Implicit semantic data augmentation: the logits of every batch get ISDA's term (see the
    module); the features pass unchanged."""

    name = "isda"

    def __init__(self, lambda0: float = 0.5, covariance: str = "full", rank: int = RANK, targets: str = "all"):
        super().__init__(targets)
        if lambda0 < 0:
            raise ConfigError(f"isda lambda0 must be >= 0, got {lambda0}")
        if covariance not in COVARIANCES:
            raise ConfigError(f"isda covariance must be one of {', '.join(COVARIANCES)}, got {covariance!r}")
        if rank < 1:
            raise ConfigError(f"isda rank must be >= 1, got {rank}")
        self.lambda0, self.covariance, self.rank = float(lambda0), covariance, int(rank)
        self.moments = ClassMoments(covariance, self.rank if covariance == "lowrank" else None)
        self.lam, self.online = 0.0, False
        self.source: tuple[torch.Tensor, torch.Tensor] | None = None  # stage 3: the training rows
        self.fixed: tuple[bool, Covariance] | None = None  # stage 3: (normalised, Sigma of every class)

    def fit(self, ctx: AugmentContext) -> None:
        where = "train.feature_augmenter" if ctx.online else "retrain.augmenter"
        d, c = ctx.dim, ctx.num_classes
        if self.covariance == "lowrank" and self.rank >= d:
            raise ConfigError(f"{where} isda rank {self.rank} must be below the feature dimension {d}; lower "
                              f"{where}.rank, or use covariance: full")
        if self.covariance == "full" and c * d * d > FULL_LIMIT:
            raise ConfigError(f"{where} isda covariance: full would keep {c} x {d} x {d} floats "
                              f"({4 * c * d * d / 2**30:.1f} GiB); use covariance: diagonal or lowrank")
        super().fit(ctx)
        self.online = ctx.online
        self.moments.reset(c, d, ctx.features.device)
        self.source = None if self.online else (ctx.features, ctx.labels)
        self.fixed = None

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        self.lam = ramp(self.lambda0, epoch, total_epochs)

    def after_epoch(self, classifier, epoch: int, validation=None) -> dict:
        return {"isda_lambda": self.lam}

    def adjust_loss_inputs(self, inputs: LossInputs, head) -> LossInputs:
        if not self.fitted:
            raise RuntimeError("ISDAAugmenter.fit(ctx) must be called before augmenting")
        if self.lam == 0 and not self.online:
            return inputs
        from ..models.heads import linear_form

        form = linear_form(head)
        labels = inputs.targets.long()
        if self.online:
            phi = inputs.features.detach().float()
            classes, slot = self.moments.update(F.normalize(phi, dim=1) if form.normalised else phi, labels,
                                                reduce=True)
            if self.lam == 0:
                return inputs
        else:
            classes, slot = class_slots(labels, self.moments.num_classes)
        if inputs.cosine is not None and form.cosine_scale is None:
            raise ConfigError("the loss reads cosines but the head is not a cosine head; set model.head: cosine")

        def augment(cov: Covariance) -> LossInputs:
            shift = implicit_shift(form.weight.float(), labels, classes, slot, cov, self.lam)
            if self.targets != "all":
                shift = shift * self.target_rows(labels)[:, None]
            cosine = None if inputs.cosine is None else inputs.cosine + shift / form.cosine_scale
            return dataclasses.replace(inputs, logits=inputs.logits + shift, cosine=cosine)

        return augment(self.class_covariance(classes, form.normalised, augment))

    def class_covariance(self, classes: torch.Tensor, normalised: bool, augment=None) -> Covariance:
        """Sigma of ``classes`` for this batch's term (detached statistics). ``augment(cov)`` gives
        the batch's loss inputs with the term of a given Sigma (differentiable in it): a subclass
        that refines Sigma against the loss (MetaSAug's meta step) returns its own tensors here."""
        if self.online:
            return self.moments.covariance(classes)
        return self.fixed_covariance(normalised).select(classes)

    def fixed_covariance(self, normalised: bool) -> Covariance:
        """Stage 3: Sigma of every class over all training rows (of a / |a| for a cosine classifier)."""
        if self.fixed is None or self.fixed[0] != normalised:
            x, y = self.source
            self.moments.reset(self.moments.num_classes, x.shape[1], x.device)
            self.moments.fit(x, y, normalize=normalised)
            self.fixed = (normalised, self.moments.covariance())
        return self.fixed[1]

    def forward(self, features, labels, *, generator=None):
        return features, labels

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.moments.state_tensors() if self.online else {}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.moments.load_state_tensors(state)

    def extra_repr(self) -> str:
        rank = f", rank={self.rank}" if self.covariance == "lowrank" else ""
        return f"lambda0={self.lambda0}, covariance={self.covariance!r}{rank}, targets={self.targets!r}"
