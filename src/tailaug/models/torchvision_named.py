"""Any torchvision classification model as a backbone: ``model: {arch: torchvision, name: resnet50}``.

The model's last linear layer is replaced by the identity, so it returns the features that
layer read. Its input size and normalisation come from the metadata of its default weights
(torchvision's ``get_model_weights``; ImageNet's at 224 px when it has none); nothing is
downloaded: ``model.weights: pretrained`` looks in the torch hub cache.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
import torchvision
from torch import nn

from ..registry import BACKBONES
from .pretrained import IMAGENET_MEAN, IMAGENET_STD, InputSpec


def _check(cfg) -> None:
    names = torchvision.models.list_models(module=torchvision.models)
    if cfg.name not in names:
        close = difflib.get_close_matches(cfg.name, names, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "torchvision.models.list_models() lists them"
        raise ValueError(f"is not a torchvision classification model; {hint}")


def _default_weights(name: str):
    try:
        return torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None


def _last_linear(net: nn.Module) -> tuple[str, nn.Linear]:
    linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no linear classifier to remove")
    return linears[-1]


@BACKBONES.register("torchvision", reads=("name",), check=_check)
def torchvision_backbone(in_channels: int, name: str) -> nn.Module:
    net = torchvision.models.get_model(name, weights=None)
    path, linear = _last_linear(net)
    parent = net.get_submodule(path.rpartition(".")[0]) if "." in path else net
    setattr(parent, path.rpartition(".")[2], nn.Identity())
    net.feature_dim = linear.in_features
    weights = _default_weights(name)
    if weights is not None:
        preset = weights.transforms()
        size = preset.crop_size[0] if isinstance(preset.crop_size, (list, tuple)) else preset.crop_size
        net.input_spec = InputSpec(int(size), 3, tuple(preset.mean), tuple(preset.std))
        url = weights.url
        net.hub_files = lambda: [Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]]
    else:
        net.input_spec = InputSpec(224, 3, IMAGENET_MEAN, IMAGENET_STD)
    return net
