"""MetaSAug: ISDA with meta-learnt covariances (Li et al. 2021; methods.md 5).

The loss is ISDA's (:mod:`tailaug.augment.isda`: the logit of every class j != y gets
(lambda / 2) (w_j - w_y)^T Sigma_y (w_j - w_y)), but on every step from ``start_epoch`` on,
Sigma of the classes in the batch is first refined by one meta step on a balanced meta set:

1. the training loss L(theta, Sigma) of the batch with ISDA's term (the configured loss:
   CE, or LDAM with its DRW weights, ...), at the current parameters theta;
2. a virtual SGD step theta' = theta - lr * dL/dtheta (the current learning rate), theta' a
   function of Sigma;
3. the cross-entropy of the module at theta' on a meta batch (a functional call of the same
   module, :class:`tailaug.augment.meta.MetaStep`; no copy of the model);
4. Sigma <- Sigma - meta_lr * d(meta loss)/d(Sigma), exact, and without differentiating
   through the network's backward pass: by the chain rule d(meta loss)/dSigma =
   -lr d/dSigma <dL/dtheta, v>, v the meta loss's gradient at theta'; Sigma enters L after the
   features f, so <dL/dtheta, v> = <dL/df, J v> + (the classifier's terms), where J v, the
   features' derivative along v, comes from one forward-mode pass of the training batch
   (:meth:`~tailaug.augment.meta.MetaStep.feature_tangent`, the random layers replaying the
   real pass's draws). Only the classifier is differentiated twice;

then the real step uses the refined Sigma. The meta set is the balanced validation split
(``data.val_per_class``; 10 per class in the configs, as methods.md's meta set), never the test
set; its images are held out of the training set (``tailaug.data.datasets``); its counts are
printed when the augmenter is fitted. A config without a validation split is an error.

Decisions (the paper and issue leave them open):

- Parameters of the virtual step (``meta_params``): ``all`` trainable ones of the module being
  trained (backbone and head in stage 1; the classifier in stage 3), the default, as the
  paper; or only the classifier's (``head``): then no backward or forward-mode pass of the
  training batch goes through the backbone, and a step costs about one extra forward pass of
  the meta batch (``benchmarks/isda_speed.py``). The step is plain SGD on the loss's
  gradient (no momentum, no weight decay: the plainest reading of "a virtual SGD step"; in
  stage 3 at ``retrain.lr``, the lr of its Adam, so the refinement is small there). The
  virtual gradient reuses the real forward pass's graph (the same parameters and batch give
  the same outputs), which the real backward pass then uses again. The meta pass
  runs in training mode (BatchNorm uses the meta batch's statistics) on clones of the buffers:
  no running statistic changes.
- The refined Sigma serves the step only; the running statistics stay the exact moments of the
  features seen (as ISDA's). The published code writes the refined matrix back into its
  estimator, where later batches merge into it with weight n_batch / n_class, so refinements
  accumulate nearly undamped over the thousands of steps of the last 40 epochs; here each
  step's refinement is one gradient step from the current estimate, which keeps the statistics
  an estimator (testable, identical across resumes, never drifting from the data), at the
  price of no memory of past meta gradients. With ``covariance: lowrank`` the step is taken on
  its parameters (the diagonal and the factor); refined matrices are not clamped.
- ``meta_lr`` 0.1: the value of the seed's published (ImageNet-LT) training command.
  ``meta_batch`` 100 rows, drawn uniformly without replacement from the meta set by a
  generator seeded by (seed, epoch, step) (the whole set when it is smaller): this
  implementation's choice.
- ``lambda0`` 0.75: the published CIFAR command's value. ``start_epoch`` (0-based): the first
  epoch with the meta step; before it, plain ISDA (the published CIFAR recipe: 160 of 200).
- DDP: the statistics are summed over the processes (as ISDA's); every process draws the
  same meta batch (seeded by (seed, epoch, step)), takes the virtual step on its own share
  of the batch, and the Sigma-gradients are averaged, so all refine Sigma alike. The virtual
  gradient is taken with ``torch.autograd.grad`` on the graph of the DDP forward pass; it
  fires none of DDP's gradient hooks (they sit on the parameters' accumulation), so the real
  backward pass alone all-reduces.

Each epoch's history records ``metasaug_meta_loss``, the mean cross-entropy of the virtually
updated model on its meta batches (absent before ``start_epoch``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..engine import distributed
from ..errors import ConfigError
from ..registry import AUGMENTERS
from .base import AugmentContext
from .class_moments import Covariance
from .isda import RANK, ISDAAugmenter, ISDAOptions
from .meta import MetaStep

META_LR = 0.1  # the published training command's value
META_BATCH = 100  # rows of the meta batch: this implementation's choice
LAMBDA0 = 0.75  # the published CIFAR command's value
META_PARAMS = ("all", "head")  # the parameters that take the virtual step


class MetaSAugOptions(ISDAOptions):
    """``train.feature_augmenter`` / ``retrain.augmenter: {name: metasaug, ...}``."""

    needs_validation: ClassVar[bool] = True
    name: Literal["metasaug"]
    lambda0: float = Field(LAMBDA0, ge=0)
    meta_lr: float = Field(META_LR, ge=0)
    meta_batch: int = Field(META_BATCH, ge=1)
    start_epoch: int = Field(0, ge=0)
    meta_params: Literal["all", "head"] = "all"

    def label(self) -> str:
        return "MetaSAug"


@AUGMENTERS.register("metasaug", config=MetaSAugOptions, label="MetaSAug")
class MetaSAugAugmenter(ISDAAugmenter):
    """ISDA whose Sigma is refined by one meta step per batch (see the module)."""

    name = "metasaug"

    def __init__(self, lambda0: float = LAMBDA0, covariance: str = "full", rank: int = RANK, targets: str = "all",
                 meta_lr: float = META_LR, meta_batch: int = META_BATCH, start_epoch: int = 0,
                 meta_params: str = "all"):
        super().__init__(lambda0, covariance, rank, targets)
        if meta_lr < 0 or meta_batch < 1 or start_epoch < 0:
            raise ConfigError(f"metasaug needs meta_lr >= 0, meta_batch >= 1 and start_epoch >= 0, got {meta_lr}, "
                              f"{meta_batch} and {start_epoch}")
        if meta_params not in META_PARAMS:
            raise ConfigError(f"metasaug meta_params must be one of {', '.join(META_PARAMS)}, got {meta_params!r}")
        self.meta_lr, self.meta_batch, self.start_epoch = float(meta_lr), int(meta_batch), int(start_epoch)
        self.meta_params = meta_params
        self.epoch, self.pending = 0, None
        self.meta_loss_sum: torch.Tensor | None = None
        self.meta_steps = 0

    def fit(self, ctx: AugmentContext) -> None:
        where = "train.feature_augmenter" if ctx.online else "retrain.augmenter"
        if ctx.validation is None:
            raise ConfigError(f"{where} metasaug takes its meta step on the validation split (never the test set), "
                              "and there is none: set data.val_per_class (e.g. 10), or data.val_split for split files")
        super().fit(ctx)
        labels = ctx.validation[1]
        counts = torch.bincount(labels.cpu(), minlength=ctx.num_classes).tolist()
        per = f"{counts[0]} per class" if len(set(counts)) == 1 else f"per class {counts}"
        if not distributed.is_active() or torch.distributed.get_rank() == 0:
            print(f"metasaug: meta set = the validation split, {len(labels)} images ({per}, {ctx.num_classes} "
                  f"classes), held out of the {ctx.features.shape[0]} training rows; meta batches of "
                  f"{min(self.meta_batch, len(labels))}")

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        if self.start_epoch >= total_epochs:
            raise ConfigError(f"metasaug start_epoch {self.start_epoch} is not below the {total_epochs} epochs, so no "
                              f"meta step would run; lower start_epoch (e.g. {total_epochs - 1}) or use isda")
        super().set_epoch(epoch, total_epochs)
        self.epoch, self.meta_loss_sum, self.meta_steps = epoch, None, 0

    def after_epoch(self, classifier, epoch: int, validation=None) -> dict:
        record = super().after_epoch(classifier, epoch, validation)
        if self.meta_steps:
            record["metasaug_meta_loss"] = float(self.meta_loss_sum) / self.meta_steps
        return record

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """ISDA's statistics and the epoch's running meta loss (a mid-epoch checkpoint resumes it)."""
        state = super().state_tensors()
        if self.meta_steps:
            state.update(meta_loss_sum=self.meta_loss_sum.detach().cpu(), meta_steps=torch.tensor(self.meta_steps))
        return state

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(state)
        if "meta_steps" in state:
            self.meta_loss_sum = state["meta_loss_sum"].to(self.moments.count.device)
            self.meta_steps = int(state["meta_steps"])

    def meta_rows(self) -> int:
        return self.meta_batch if self.epoch >= self.start_epoch else 0

    def set_meta_step(self, meta: MetaStep) -> None:
        self.pending = meta

    def class_covariance(self, classes: torch.Tensor, normalised: bool, augment=None) -> Covariance:
        cov = super().class_covariance(classes, normalised)
        meta, self.pending = self.pending, None
        if meta is None or augment is None or self.meta_lr == 0:
            return cov
        return self.refine(cov, augment, meta)

    def refine(self, cov: Covariance, augment, meta: MetaStep) -> Covariance:
        """Sigma - meta_lr * d/dSigma CE(module at theta - lr dL(theta, Sigma)/dtheta, meta batch).

        Without a second-order pass through the network: with v = dCE/dtheta' at the virtually
        stepped parameters theta', the chain rule gives dCE/dSigma = -lr d/dSigma <dL/dtheta, v>,
        and Sigma enters L only after the features f, so <dL/dtheta, v> = <dL/df, J v> +
        <dL/dtheta_head, v_head> with J v the features' forward-mode derivative along v
        (:meth:`MetaStep.feature_tangent`). Only the classifier's part is differentiated twice."""
        leaves = {f.name: getattr(cov, f.name).detach().clone().requires_grad_()
                  for f in dataclasses.fields(cov) if getattr(cov, f.name) is not None}
        chosen = meta.params if self.meta_params == "all" else meta.head_params()
        head = {n: p for n, p in chosen.items() if n.startswith(meta.head_prefix)}
        body = {n: p for n, p in chosen.items() if n not in head}
        if body and meta.features is None:
            raise ValueError("metasaug: MetaStep.features (the classifier's input in the real pass) is needed to "
                             "step the parameters before the classifier")
        with torch.enable_grad():
            loss = meta.loss(augment(Covariance(**leaves)))
            wrt = [*head.values(), *([meta.features] if body else [])]
            inner = torch.autograd.grad(loss, wrt, create_graph=True, allow_unused=True)  # the classifier's part
            grads, d_features = dict(zip(head, inner[: len(head)])), inner[-1] if body else None
            if d_features is not None:  # the rest by one backward pass through the network, on the real step's graph
                grads.update(zip(body, torch.autograd.grad(meta.features, list(body.values()), d_features.detach(),
                                                           retain_graph=True, allow_unused=True)))
            stepped = {n: (chosen[n] - meta.lr * g).detach().requires_grad_() for n, g in grads.items() if g is not None}
            meta_loss = F.cross_entropy(meta.meta_logits({**meta.params, **stepped}), meta.meta_labels)
            meta_grad = dict(zip(stepped, torch.autograd.grad(meta_loss, list(stepped.values()))))
            # <dL/dtheta, v>, differentiable in Sigma: the classifier's terms, and the features' along J v
            terms = [(grads[n] * meta_grad[n]).sum() for n in head if n in meta_grad]
            if moved := {n: meta_grad[n] for n in body if n in meta_grad}:
                terms.append((d_features.float() * meta.feature_tangent(moved)).sum())
            found = torch.autograd.grad(-meta.lr * sum(terms), list(leaves.values()), allow_unused=True) if terms \
                else [None] * len(leaves)
        found = [torch.zeros_like(v) if g is None else g for v, g in zip(leaves.values(), found)]
        if distributed.is_active():  # the mean over the processes: every one refines Sigma alike
            flat = distributed.all_reduce_sum(torch.cat([g.flatten() for g in found]))
            flat = flat / torch.distributed.get_world_size()
            found = [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in found]), found)]
        total = meta_loss.detach()
        self.meta_loss_sum = total if self.meta_loss_sum is None else self.meta_loss_sum + total
        self.meta_steps += 1
        return Covariance(**{k: (v - self.meta_lr * g).detach() for (k, v), g in zip(leaves.items(), found)})

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, meta_lr={self.meta_lr}, meta_batch={self.meta_batch}, "
                f"start_epoch={self.start_epoch}, meta_params={self.meta_params!r}")
