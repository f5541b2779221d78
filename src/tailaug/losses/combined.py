"""The weighted sum of the configured loss terms (``LossFunction``) and ``build_loss``."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Sequence

import torch
from torch import nn

from ..config import ReweightConfig, TrainConfig
from ..errors import ConfigError, TailaugError
from ..registry import LOSSES
from .base import BaseLossTerm, LossInputs, check_counts
from .reweight import class_weights


class LossFunction(nn.Module):
    """The weighted sum ``sum_k weight_k * term_k(inputs)`` of the configured terms.

    Per-class weights (``reweight``) are held as a buffer and handed to every term while
    re-weighting is on, i.e. from ``set_epoch(reweight.start_epoch)`` on (DRW when
    start_epoch > 0); before that, and always with scheme ``none``, terms get no weights
    (equivalent to all ones). A fresh LossFunction is at epoch 0.

    ``needs_cosine``: some term (ldam, arcface, cosface, sphereface) fails without
    ``inputs.cosine``. ``uses_cosine``: some term reads ``inputs.cosine`` when it is given;
    pass the head's cosines whenever this is True and the head is cosine.
    ``takes_sample_weight``: every term honours ``inputs.sample_weight`` (Remix's per-sample
    label weights, see ``losses/base.py``); a weighted batch is refused otherwise.

    After each ``forward``, ``last_terms`` maps each term's name (``ce``, ``ldam``, ... with
    ``_1``, ``_2`` appended to repeated names) to its detached, unweighted value, for
    logging.
    """

    def __init__(
        self,
        terms: Sequence[tuple[BaseLossTerm, float]],
        class_counts: Sequence[int],
        reweight: ReweightConfig | None = None,
    ):
        super().__init__()
        if not terms:
            raise ConfigError("train.loss is empty; give at least one loss term, e.g. [{name: ce}]")
        reweight = reweight or ReweightConfig()
        self.class_counts = check_counts(class_counts)
        self.num_classes = len(self.class_counts)
        self.terms = nn.ModuleList([t for t, _ in terms])
        self.term_weights = [float(w) for _, w in terms]
        self.term_names = _unique_names([t.name for t, _ in terms])
        self.needs_two_views = any(t.needs_two_views for t in self.terms)
        self.needs_cosine = any(t.needs_cosine for t in self.terms)
        self.uses_cosine = any(t.uses_cosine for t in self.terms)
        self.takes_sample_weight = all(t.takes_sample_weight for t in self.terms)
        self.reweight_scheme = reweight.scheme
        self.reweight_start_epoch = reweight.start_epoch
        self.register_buffer("class_weight", class_weights(reweight.scheme, self.class_counts, reweight.beta))
        self.epoch = 0
        self.last_terms: dict[str, torch.Tensor] = {}

    @property
    def reweighting(self) -> bool:
        """True when per-class weights are applied at the current epoch."""
        return self.reweight_scheme != "none" and self.epoch >= self.reweight_start_epoch

    def current_class_weights(self) -> torch.Tensor:
        """The [C] weights in force now (all ones while re-weighting is off)."""
        if self.reweighting:
            return self.class_weight.clone()
        return torch.ones_like(self.class_weight)

    def set_epoch(self, epoch: int) -> None:
        """Tell the loss the current 0-based epoch; re-weighting starts at ``start_epoch``."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        self._check(inputs)
        if inputs.targets.dtype != torch.int64:
            inputs = dataclasses.replace(inputs, targets=inputs.targets.long())
        weight = self.class_weight if self.reweighting else None
        total = None
        parts = {}
        for name, term, k in zip(self.term_names, self.terms, self.term_weights):
            value = term(inputs, weight if term.uses_class_weights else None)
            parts[name] = value.detach()
            total = k * value if total is None else total + k * value
        self.last_terms = parts
        return total

    def _check(self, inputs: LossInputs) -> None:
        logits, targets = inputs.logits, inputs.targets
        if logits.ndim != 2 or targets.ndim != 1 or logits.shape[0] != targets.shape[0]:
            raise TailaugError(
                f"the loss expects logits [N, C] and targets [N]; got logits {tuple(logits.shape)} "
                f"and targets {tuple(targets.shape)}"
            )
        if logits.shape[1] != self.num_classes:
            raise TailaugError(
                f"the model outputs {logits.shape[1]} classes but the training set has "
                f"{self.num_classes} class counts; make data.num_classes match the data"
            )
        if inputs.cosine is not None and inputs.cosine.shape != logits.shape:
            raise TailaugError(
                f"cosine has shape {tuple(inputs.cosine.shape)} but logits {tuple(logits.shape)}; "
                "they must both be [N, C]"
            )
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise TailaugError(
                f"targets must be integer class indices, got dtype {targets.dtype}; mixup should "
                "call the loss once per label set and mix the two losses"
            )
        if inputs.sample_weight is not None:
            if inputs.sample_weight.shape != targets.shape:
                raise TailaugError(
                    f"sample_weight has shape {tuple(inputs.sample_weight.shape)} but targets "
                    f"{tuple(targets.shape)}; give one weight per sample"
                )
            if not self.takes_sample_weight:
                names = ", ".join(sorted({t.name for t in self.terms if not t.takes_sample_weight}))
                raise TailaugError(
                    f"the loss term(s) {names} cannot weight single samples (sample_weight, as Remix "
                    "gives); drop them from train.loss or train without per-sample weights"
                )

    def extra_repr(self) -> str:
        weights = ", ".join(f"{n}={w:g}" for n, w in zip(self.term_names, self.term_weights))
        return (
            f"weights=({weights}), reweight={self.reweight_scheme}@epoch{self.reweight_start_epoch}, "
            f"needs_two_views={self.needs_two_views}, needs_cosine={self.needs_cosine}"
        )


def build_loss(train_cfg: TrainConfig, class_counts: Sequence[int]) -> LossFunction:
    """The loss of ``train_cfg.loss`` (weighted sum) with ``train_cfg.reweight``.

    Raises ConfigError when ``reweight.scheme`` is set but no configured term uses class
    weights (balanced_softmax, logit_adjust and supcon ignore them), since the setting would
    silently do nothing. Warns when re-weighting would start at or after the last epoch.
    """
    counts = check_counts(class_counts)
    terms = loss_terms(train_cfg.loss, counts)
    reweight = train_cfg.reweight
    if reweight.scheme != "none":
        if not any(t.uses_class_weights for t, _ in terms):
            names = ", ".join(t.name for t, _ in terms)
            raise ConfigError(
                f"train.reweight.scheme is {reweight.scheme!r} but none of the loss terms ({names}) "
                "uses class weights (balanced_softmax, logit_adjust and supcon ignore them); set "
                "train.reweight.scheme: none, or add a weighted term such as ce, focal or ldam"
            )
        if reweight.start_epoch >= train_cfg.epochs:
            warnings.warn(
                f"train.reweight.start_epoch = {reweight.start_epoch} is not below train.epochs = "
                f"{train_cfg.epochs}, so the {reweight.scheme} class weights are never applied; "
                "lower start_epoch (DRW usually starts at 80% of the epochs)",
                stacklevel=2,
            )
    return LossFunction(terms, counts, reweight)


def loss_terms(configs, class_counts: Sequence[int]) -> list[tuple[BaseLossTerm, float]]:
    """(term, weight) of each configured loss term (a ``train.loss`` or ``retrain.loss`` list)."""
    counts = check_counts(class_counts)
    return [(LOSSES.get(term_cfg.name).obj(term_cfg, counts), term_cfg.weight) for term_cfg in configs]


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        count = seen.get(name, 0)
        out.append(name if count == 0 else f"{name}_{count}")
        seen[name] = count + 1
    return out
