"""Training-time modules placed after a backbone stage (``train.stage_module``), removed at inference.

A stage module (registered in ``STAGE_MODULES``, e.g. ``models/rsg.py``) maps the backbone's
maps after its stage and the batch's labels to the maps with any generated rows appended, the
labels of those rows and an extra loss term. :class:`TrainingNetwork` runs it inside a
:class:`~tailaug.models.Network` in training mode only; the network it wraps is what is
evaluated, checkpointed as the model and read by later stages, so the module costs nothing
at inference and none of its parameters are in the exported model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import STAGE_MODULES

if TYPE_CHECKING:  # the package imports its modules while it initialises (the registries): no cycle at run time
    from . import Network, Output


class StageModule(nn.Module):
    """Base of a stage module: ``forward(maps, labels) -> (maps, new_labels | None, loss | None)``."""

    def __init__(self, stage: int):
        super().__init__()
        self.stage = stage
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class TrainingNetwork(nn.Module):
    """``network`` with ``module`` after its stage while training; in eval mode (or without
    labels) exactly ``network``. The output's ``labels`` and ``loss`` are the module's."""

    def __init__(self, network: Network, module: StageModule):
        super().__init__()
        self.network, self.module = network, module

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> Output:
        if not self.training or labels is None:
            return self.network(x, extra)
        found = []

        def at_stage(maps):
            maps, new_labels, loss = self.module(maps, labels)
            found.append((new_labels, loss))
            return maps

        out = self.network(x, extra, at_stage=(self.module.stage, at_stage))
        return out._replace(labels=found[0][0], loss=found[0][1])


def build_stage_module(section, network: Network, class_counts, arch: str = "") -> StageModule:
    """The stage module of ``section`` (``train.stage_module``) for ``network``'s backbone."""
    from . import stage_channels

    channels = stage_channels(network.backbone, arch)
    if not 1 <= section.stage <= len(channels):
        raise ConfigError(f"train.stage_module {section.name} sits after stage {section.stage}, and model.arch "
                          f"{arch or type(network.backbone).__name__} has stages 1..{len(channels)}; set "
                          f"train.stage_module.stage to one of them")
    return STAGE_MODULES.get(section.name).obj(section, channels[section.stage - 1], list(class_counts))
