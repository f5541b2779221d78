"""Losses for long-tailed classification.

``build_loss(train_cfg, class_counts)`` turns ``train.loss`` (a list of weighted terms) and
``train.reweight`` into one :class:`LossFunction`, called with a :class:`LossInputs`.
Each term registers itself in ``tailaug.registry.LOSSES`` with its config model (the options
of its ``train.loss`` entry), in its own module; one module per family: ``ce`` (ce, focal), ``reweight`` (class weights), ``ldam``, ``prior`` (balanced
softmax, logit adjustment, post-hoc ``adjust_logits``), ``smoothing`` (MiSLAS label-aware
smoothing), ``supcon``, ``margins`` (ArcFace, CosFace, SphereFace).
"""

from .base import BaseLossTerm, LossInputs, LossTermConfig, weighted_mean
from .ce import CrossEntropyTerm, FocalTerm
from .combined import LossFunction, build_loss
from .ldam import LDAMTerm, ldam_margins
from .margins import ArcFaceTerm, CosFaceTerm, SphereFaceTerm, arcface_psi, sphereface_psi
from .prior import BalancedSoftmaxTerm, LogitAdjustTerm, adjust_logits
from .reweight import class_weights
from .smoothing import LabelAwareSmoothingTerm, label_aware_smoothing
from .supcon import SupConTerm, supcon_loss

__all__ = [
    "ArcFaceTerm",
    "BalancedSoftmaxTerm",
    "BaseLossTerm",
    "CosFaceTerm",
    "CrossEntropyTerm",
    "FocalTerm",
    "LDAMTerm",
    "LabelAwareSmoothingTerm",
    "LogitAdjustTerm",
    "LossFunction",
    "LossInputs",
    "LossTermConfig",
    "SphereFaceTerm",
    "SupConTerm",
    "adjust_logits",
    "arcface_psi",
    "build_loss",
    "class_weights",
    "label_aware_smoothing",
    "ldam_margins",
    "sphereface_psi",
    "supcon_loss",
    "weighted_mean",
]
