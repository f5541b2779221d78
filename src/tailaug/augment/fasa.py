"""FASA: feature augmentation and sampling adaptation (Zang et al. 2021; methods.md 5).

- Class means with momentum m: after every batch, mu_c <- m * mu_c + (1 - m) * (mean of the
  batch's real rows of class c), for the classes in the batch; they start at the class
  means of the training features.
- One shared variance (per dimension): var <- m * var + (1 - m) * mean over the batch's real
  rows of (a - mu_y)^2, with the class means before the batch's update; it starts at the
  mean squared deviation of the training features from their class means.
- Virtual features: every batch of B real rows gets round(ratio * B) virtual rows appended,
  their classes drawn from the target classes with probability proportional to the
  per-class sampling rate r_c, their features from N(mu_c, diag(var)).
- Sampling adaptation: after every epoch the current classifier is scored on the balanced
  validation split (never the test set) and each class's mean cross-entropy L_c is kept;
  from the second epoch on r_c <- clip(r_c * exp(adapt * (L_c - L_c_previous)), min_rate,
  max_rate): a class whose validation loss rose is sampled more, one whose loss fell less.
  Rates start at 1 for the target classes (0 for the others). The rates and losses of
  every epoch join the stage-3 history (``tailaug analyze fasa`` plots them).

During representation learning (``train.feature_augmenter: {name: fasa}``, as the original)
the same module works on the backbone's features of every stage-1 batch: the virtual rows
are drawn from the means before the batch and go through the classifier in the same forward
pass (their cross-entropy joins the loss, weighted by their share of the rows), the means are
then updated with the batch's features (detached), and the rates adapt on the validation
split after every epoch; its state is part of the stage-1 checkpoint.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from ..errors import ConfigError
from ..registry import AUGMENTERS
from .base import AugmentContext, AugmenterOptions, FeatureAugmenter

STATE = ("means", "variance", "rates", "last_loss")  # what a stage-1 checkpoint keeps


class FASAOptions(AugmenterOptions):
    """``retrain.augmenter: {name: fasa, ...}``; needs a validation split (data.val_per_class)."""

    needs_validation: ClassVar[bool] = True
    stage1: ClassVar[bool] = True
    name: Literal["fasa"]
    momentum: float = Field(0.9, ge=0, lt=1)  # of the class means and the shared variance
    ratio: float = Field(0.5, gt=0)  # virtual rows per real row of a batch
    adapt: float = Field(1.0, gt=0)  # step of the sampling-rate update
    min_rate: float = Field(0.1, gt=0)
    max_rate: float = Field(10.0, gt=0)
    targets: Literal["tail", "all"] = "all"

    @model_validator(mode="after")
    def _rates(self):
        if self.min_rate > self.max_rate:
            raise ValueError(f"min_rate ({self.min_rate}) must not exceed max_rate ({self.max_rate})")
        return self

    def label(self) -> str:
        return "FASA"


def momentum_update(means: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, momentum: float):
    """Class means [C, d] after one batch: m * mu_c + (1 - m) * batch mean, for the classes present."""
    num_classes = means.shape[0]
    sums = torch.zeros_like(means).index_add_(0, labels, features.to(means.dtype))
    counts = torch.bincount(labels, minlength=num_classes)
    present = (counts > 0)[:, None]
    batch = sums / counts.clamp_min(1)[:, None].to(means.dtype)
    return torch.where(present, momentum * means + (1 - momentum) * batch, means)


def adapt_rates(rates: torch.Tensor, loss: torch.Tensor, previous: torch.Tensor, step: float,
                low: float, high: float) -> torch.Tensor:
    """r_c * exp(step * (L_c - L_c_previous)), clipped to [low, high]; zero rates stay zero."""
    new = (rates * torch.exp(step * (loss - previous))).clamp(low, high)
    return torch.where(rates > 0, new, rates)


def per_class_loss(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean cross-entropy of each class's rows [C] (zero for a class without rows)."""
    loss = F.cross_entropy(logits.float(), labels, reduction="none")
    sums = torch.zeros(num_classes, device=loss.device).index_add_(0, labels, loss)
    return sums / torch.bincount(labels, minlength=num_classes).clamp_min(1)


@AUGMENTERS.register("fasa", config=FASAOptions, label="FASA")
class FASAAugmenter(FeatureAugmenter):
    """Virtual features from momentum class means and a shared variance, with per-class
    sampling rates adapted on the validation loss (see the module)."""

    name = "fasa"

    def __init__(self, momentum: float = 0.9, ratio: float = 0.5, adapt: float = 1.0, min_rate: float = 0.1,
                 max_rate: float = 10.0, targets: str = "all"):
        super().__init__(targets)
        if not 0 <= momentum < 1:
            raise ConfigError(f"fasa momentum must lie in [0, 1), got {momentum}")
        self.momentum, self.ratio, self.adapt = float(momentum), float(ratio), float(adapt)
        self.min_rate, self.max_rate = float(min_rate), float(max_rate)
        for name in STATE:
            self.register_buffer(name, None, persistent=False)

    def fit(self, ctx: AugmentContext) -> None:
        if ctx.validation is None:
            raise ConfigError("the fasa augmenter adapts its sampling rates on the validation split, and stage 3 "
                              "has none: set data.val_per_class (e.g. 20: a balanced split held out of training)")
        super().fit(ctx)
        self.val_x, self.val_y = ctx.validation[0].float(), ctx.validation[1].long()
        self.means = ctx.class_means()
        self.variance = ctx.row_mean(lambda x, y: (x - self.means[y]).square())
        self.rates = self.target_classes.float()
        self.last_loss = None
        self.active = bool(self.target_classes.any())  # rates never reach 0 once positive: no sync per batch

    @torch.no_grad()
    def observe(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Update the class means and the shared variance with a batch of real rows."""
        x = features.detach().float()
        old = self.means
        self.means = momentum_update(old, x, labels, self.momentum)
        deviation = (x - old[labels]).square().mean(0)
        self.variance = self.momentum * self.variance + (1 - self.momentum) * deviation

    @torch.no_grad()
    def virtual(self, rows: int, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The virtual features [round(ratio * rows), d] of a batch of ``rows`` real rows, and
        their classes, drawn with the sampling rates."""
        count = round(self.ratio * rows)
        if count == 0 or not self.active:
            return self.means[:0], torch.zeros(0, dtype=torch.long, device=self.means.device)
        classes = torch.multinomial(self.rates, count, replacement=True, generator=generator)
        eps = torch.randn((count, self.means.shape[1]), generator=generator, device=self.means.device)
        return self.means[classes] + self.variance.sqrt() * eps, classes

    def forward(self, features, labels, *, generator=None):
        self.observe(features, labels)
        virtual, classes = self.virtual(features.shape[0], generator)
        return torch.cat([features, virtual.to(features.dtype)]), torch.cat([labels, classes])

    @torch.no_grad()
    def after_epoch(self, classifier, epoch: int, validation=None) -> dict:
        val_x, val_y = validation if validation is not None else (self.val_x, self.val_y)
        device = self.means.device
        logits = classifier(val_x.to(device).float())
        loss = per_class_loss(logits, val_y.to(device).long(), self.means.shape[0])
        if self.last_loss is not None:
            self.rates = adapt_rates(self.rates, loss, self.last_loss, self.adapt, self.min_rate, self.max_rate)
        self.last_loss = loss
        return {"fasa_rates": self.rates.tolist(), "fasa_val_loss": loss.tolist()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).detach().cpu() for k in STATE if getattr(self, k) is not None}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        for key in STATE:
            setattr(self, key, state[key].to(self.means.device) if key in state else None)

    def extra_repr(self) -> str:
        return (f"momentum={self.momentum}, ratio={self.ratio}, adapt={self.adapt}, "
                f"rates=[{self.min_rate}, {self.max_rate}], targets={self.targets!r}")
