"""What a trainer hands an augmenter that takes a meta step (e.g. MetaSAug) on every batch.

A feature augmenter whose ``meta_rows()`` is positive for the current epoch gets, before the
trainer calls its ``adjust_loss_inputs``, a :class:`MetaStep` through ``set_meta_step``: the
module being trained (its trainable parameters by name, the real ones, not a copy), the
training loss, the current learning rate, and a meta batch of that many rows drawn from the
validation split (never the test set) by :func:`meta_indices`. The augmenter may take a
virtual step of the parameters and evaluate the module at them with :meth:`MetaStep.meta_logits`,
a functional call (``torch.func.functional_call``) of the same module: no copy is built, and
the module's buffers (BatchNorm running statistics) are replaced by clones for the call, so
the virtual pass leaves the real parameters and buffers as they were. When the step also moves
parameters before the classifier, :meth:`MetaStep.feature_tangent` gives the directional
derivative of the training batch's features along a direction in those parameters (forward
mode, the same functional call, the random layers replaying the real pass's draws).

Stage 1 (``tailaug.stages.representation``) draws the meta images from ``data.val`` (the
evaluation transform, no augmentation; image files decoded ahead by loader workers); stage 3
(``tailaug.stages.classifier``) draws rows of the validation features. Both seed the draw by (seed, epoch, step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Callable

import torch
import torch.autograd.forward_ad as fwad
from torch import nn
from torch.func import functional_call

from ..engine.seed import torch_generator

META_STREAM = 29  # the last key of the meta batches' generator (distinct from the other draws)


@dataclasses.dataclass(kw_only=True)
class MetaStep:
    """One step's meta-learning inputs (see the module).

    ``module`` the module being trained; ``params`` its trainable parameters by name (the real
    tensors: a loss of them is differentiable in them); ``loss(inputs)`` the training loss of a
    batch's :class:`~tailaug.losses.LossInputs`; ``lr`` the learning rate of this step;
    ``meta_images``/``meta_labels`` the meta batch; ``logits_of(output)`` the logits in what the
    module returns; ``autocast()`` the precision context of the trainer's forward pass;
    ``head_prefix`` what the names of the classifier's parameters start with. When the module has
    parameters before the classifier: ``batch`` the training batch as the module took it,
    ``features`` the features the classifier took in that real pass (the tensor in its graph),
    ``features_of(output)`` the features in what the module returns, and ``rng`` the random
    generators' states before the real pass (:func:`rng_snapshot`).
    """

    module: nn.Module
    params: dict[str, torch.Tensor]
    loss: Callable
    lr: float
    meta_images: torch.Tensor
    meta_labels: torch.Tensor
    logits_of: Callable = lambda out: out  # noqa: E731
    autocast: Callable = contextlib.nullcontext
    head_prefix: str = ""  # the names of the classifier's parameters start with it ("" : the module is one)
    batch: torch.Tensor | None = None
    features: torch.Tensor | None = None
    features_of: Callable = lambda out: out.features  # noqa: E731
    rng: tuple | None = None

    def head_params(self) -> dict[str, torch.Tensor]:
        """The classifier's share of ``params``."""
        return {n: p for n, p in self.params.items() if n.startswith(self.head_prefix)}

    def meta_logits(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of the meta batch (at least float32) by ``module`` with ``params`` in place of its own
        (a functional call; its buffers are cloned for the call, so BatchNorm in training mode
        normalises with the meta batch's statistics and updates nothing)."""
        with self.autocast():
            out = functional_call(self.module, {**self._buffers(), **params}, (self.meta_images,))
        logits = self.logits_of(out)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def feature_tangent(self, tangents: dict[str, torch.Tensor]) -> torch.Tensor:
        """d/de features(batch; params + e * tangents) at e = 0 (at least float32): forward mode
        through a functional call of ``module`` at its own parameters on the training batch, on
        clones of its buffers, with the random generators set as they were before the real pass
        (so dropout draws the same masks and the call reproduces ``features``)."""
        if self.batch is None:
            raise ValueError("MetaStep.feature_tangent needs the training batch (MetaStep.batch)")
        params = {name: p.detach() for name, p in self.params.items()}
        with fwad.dual_level(), replay(self.rng), self.autocast(), warnings.catch_warnings():
            # forward mode through BatchNorm scripts a decomposition on first use; torch warns that
            # torch.jit.script is deprecated, which is torch's own business, not the user's
            warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning)
            params.update({name: fwad.make_dual(params[name], t.to(params[name].dtype))
                           for name, t in tangents.items()})
            out = functional_call(self.module, {**self._buffers(), **params}, (self.batch,))
            tangent = fwad.unpack_dual(self.features_of(out)).tangent
        if tangent is None:  # the features do not depend on these parameters
            return torch.zeros_like(self.features, dtype=torch.promote_types(self.features.dtype, torch.float32))
        return tangent.to(torch.promote_types(tangent.dtype, torch.float32))

    def _buffers(self) -> dict[str, torch.Tensor]:
        return {name: b.clone() for name, b in self.module.named_buffers()}


def trainable(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of ``module`` that train (requires_grad), by name."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def rng_snapshot(device: torch.device | str) -> tuple:
    """The states of the CPU generator and, on a CUDA device, of its generator (host-side
    state: no synchronisation), for :func:`replay`."""
    device = torch.device(device)
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), device, cuda


@contextlib.contextmanager
def replay(snapshot: tuple | None):
    """Run the block with the generators set to ``snapshot`` (:func:`rng_snapshot`; None: as
    they are), and give them back their states afterwards."""
    if snapshot is None:
        yield
        return
    cpu, device, cuda = snapshot
    with torch.random.fork_rng(devices=[device] if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


def meta_indices(size: int, rows: int, seed: int, epoch: int, step: int) -> torch.Tensor:
    """``min(rows, size)`` distinct indices of a meta set of ``size`` rows (CPU), drawn uniformly
    without replacement by a generator seeded by (seed, epoch, step): the same draw whether or
    not the run was interrupted before it."""
    gen = torch_generator(seed, epoch, step, META_STREAM)
    return torch.randperm(size, generator=gen)[: min(rows, size)]
