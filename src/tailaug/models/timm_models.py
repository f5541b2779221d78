"""Any timm model as a backbone: ``model: {arch: timm, name: tf_efficientnet_lite0}``.

The model is built without its classifier (``num_classes=0``: pooled features), never
downloaded; its input size and normalisation come from timm's ``pretrained_cfg``, or from
the known file ``model.weights: pretrained`` resolves to (``models.pretrained``).
"""

from __future__ import annotations

import difflib
from pathlib import Path

from torch import nn

from ..registry import BACKBONES
from .pretrained import InputSpec, known_file


def _check(cfg) -> None:
    import timm

    if not timm.is_model(cfg.name):
        close = difflib.get_close_matches(cfg.name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "timm.list_models() lists them"
        raise ValueError(f"is not a timm model; {hint}")


def hub_files(name: str) -> list[Path]:
    """Where timm's own pretrained weights of ``name`` would be cached by Hugging Face (no download)."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    pretrained = timm.models.get_pretrained_cfg(name)
    hub_id = pretrained.hf_hub_id if pretrained is not None else None
    found = [try_to_load_from_cache(hub_id, f) for f in ("model.safetensors", "pytorch_model.bin")] if hub_id else []
    return [Path(p) for p in found if isinstance(p, str)]


@BACKBONES.register("timm", reads=("name", "weights"), check=_check)
def timm_backbone(in_channels: int, name: str, weights: str | None = None) -> nn.Module:
    import timm

    net = timm.create_model(name, pretrained=False, num_classes=0)
    cfg = net.pretrained_cfg
    known = known_file("timm", name) if weights == "pretrained" else None
    channels, _, size = cfg.get("input_size", (3, 224, 224))
    net.feature_dim = net.num_features
    net.input_spec = InputSpec(int(size), int(channels), tuple(known.mean if known else cfg["mean"]),
                               tuple(known.std if known else cfg["std"]))
    net.hub_files = lambda: hub_files(name)
    return net
