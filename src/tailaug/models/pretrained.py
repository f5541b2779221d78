"""Pretrained backbones: what their input must look like, and where their weights come from.

- :class:`InputSpec`: the image size, channels and normalisation a backbone was trained with;
  a backbone that has one (``backbone.input_spec``) gets its batches resized, grayscale
  repeated to its channels and normalised with its mean and std (``data.transforms``).
- Known weight files (:data:`KNOWN_FILES`): ``model.weights: pretrained`` resolves, for a
  model name, to a file an installed package ships (EfficientNet-Lite0), else to the local
  torch / Hugging Face hub caches; nothing is downloaded.
- Key layouts (:data:`LAYOUTS`): a state dict in a known foreign layout (e.g. the
  EfficientNet-PyTorch names of the EfficientNet-Lite0 package) is renamed to the backbone's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from ..errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """Square images of ``size`` pixels with ``channels`` channels, normalised by mean and std."""

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class KnownFile:
    """A weight file a package ships: ``find()`` -> its path or None; ``install`` says how to
    get it; ``mean``/``std`` the normalisation the file's weights were trained with."""

    find: Callable[[], Path | None]
    install: str
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


KNOWN_FILES: dict[tuple[str, str], KnownFile] = {}  # (arch, model name) -> file
# (detect(state) -> bool, convert(state, target keys) -> state): foreign layouts of known weights
LAYOUTS: list[tuple[Callable[[dict], bool], Callable[[dict, list[str]], dict]]] = []


def known_file(arch: str, name: str | None) -> KnownFile | None:
    return KNOWN_FILES.get((arch, name or ""))


def resolve_weights(arch: str, name: str | None, weights: str, *, hub_files: Callable[[], list[Path]] = list) -> Path:
    """The local file ``model.weights`` means: a path as given, or for ``pretrained`` the known
    package file of the model, else the first existing file of ``hub_files()`` (hub caches)."""
    if weights != "pretrained":
        return Path(weights).expanduser()
    known = known_file(arch, name)
    if known is not None:
        path = known.find()
        if path is not None:
            return path
    looked = [p for p in hub_files()]
    for path in looked:
        if path.is_file():
            return path
    how = f"{known.install}, or " if known is not None else ""
    where = f" (looked in {', '.join(map(str, looked))})" if looked else ""
    raise ConfigError(
        f"model.weights: pretrained finds no local weights for {arch} model {name}{where}; {how}set "
        "model.weights to a local .safetensors/.pth file (nothing is downloaded)"
    )


def convert_layout(state: dict, target_keys: list[str]) -> dict:
    """``state`` renamed to the backbone's key names when it is in a known foreign layout."""
    for detect, convert in LAYOUTS:
        if detect(state):
            return convert(state, target_keys)
    return state
