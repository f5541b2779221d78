"""The input pipeline of natural images (image files): per-image augmentation in the loader.

``data.transforms`` picks the pipeline (:func:`pipeline`): ``small`` is the built-in
in-memory sets' pad-crop + flip of a whole batch on the device (``data.transforms.BatchTransform``);
``natural`` is the published recipe of ImageNet-LT, Places-LT and iNaturalist:

- training: a random crop of ``data.crop_scale`` of the image's area and an aspect ratio
  in [3/4, 4/3] (log-uniform), resized to ``data.image_size`` (RandomResizedCrop: ten
  tries, then the centre crop with the ratio clamped into the range), a horizontal flip
  (``data.flip``), then brightness, contrast and saturation factors drawn uniformly from
  [max(0, 1 - j), 1 + j] (``data.color_jitter`` = j; hue 0), applied in a random order;
- evaluation: the shorter side resized to ``image_size / data.eval_crop_ratio`` (256 for 224
  at 0.875), then the centre ``image_size`` square.

Every draw of a training view comes from :func:`draws` of (seed, epoch, rank, dataset
index), so the view of a sample is the same whichever worker makes it, with any number of
workers, and after a resume. The loader workers decode and augment on the CPU (PIL) and
return uint8 crops; with ``data.gpu_decode`` they return the JPEG bytes and the draws, and
:func:`decode_on_device` decodes (nvjpeg), crops, flips and jitters the batch on the GPU.
Normalisation stays in the batch transform (``data.transforms.BatchTransform``) on the device.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError
from .sources import BUILT_IN

RATIO = (3 / 4, 4 / 3)  # aspect ratios (width / height) of the training crops
ATTEMPTS = 10  # RandomResizedCrop's tries before the centre crop
_STREAM = 0x6E6174  # keeps these draws apart from other streams seeded by (seed, epoch, rank, ...)
# the uniforms of a sample, by position: two per crop try, the crop's position (2), the flip,
# the three jitter factors, three whose ranks give the order of the jitter ops
_U_TOP, _U_LEFT, _U_FLIP = 2 * ATTEMPTS, 2 * ATTEMPTS + 1, 2 * ATTEMPTS + 2
_U_FACTORS, _U_ORDER = 2 * ATTEMPTS + 3, 2 * ATTEMPTS + 6
_DRAWS = 2 * ATTEMPTS + 9


# the data keys only one pipeline reads (flip and image_size: both)
PIPELINE_KEYS = {"small": ("crop_padding",), "natural": ("crop_scale", "color_jitter", "eval_crop_ratio")}


def pipeline(cfg) -> str | None:
    """The pipeline of a DataConfig: ``small`` or ``natural`` (None for embeddings, which have no images).
    ``auto`` is small for the built-in in-memory sets and natural for image files."""
    if cfg.dataset == "embeddings":
        return None
    if cfg.transforms != "auto":
        return cfg.transforms
    return "small" if cfg.dataset in BUILT_IN else "natural"


def check_gpu_decode(gpu_decode: bool, device) -> None:
    """data.gpu_decode needs a CUDA device: a ConfigError at start on any other."""
    kind = torch.device(device).type
    if gpu_decode and kind != "cuda":
        raise ConfigError(f"data.gpu_decode decodes the JPEGs on a CUDA device, and this run uses {kind}: set "
                          "data.gpu_decode: false (or run.device: cuda on a machine with a GPU)")


class DrawKey(NamedTuple):
    """What, besides the dataset index, a training view's draws depend on."""

    seed: int
    epoch: int
    rank: int


def draws(key: DrawKey, index: int) -> np.ndarray:
    """The uniforms in [0, 1) of sample ``index``'s training view (float64 [_DRAWS])."""
    return np.random.default_rng([key.seed, key.epoch, key.rank, index, _STREAM]).random(_DRAWS)


def crop_box(h: int, w: int, u: np.ndarray, scale, ratio=RATIO) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a RandomResizedCrop of an h x w image from the uniforms ``u``."""
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for k in range(ATTEMPTS):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[2 * k])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[2 * k + 1])
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = min(int(u[_U_TOP] * (h - ch + 1)), h - ch)
            left = min(int(u[_U_LEFT] * (w - cw + 1)), w - cw)
            return top, left, ch, cw
    if w / h < ratio[0]:  # too tall: full width
        cw, ch = w, min(h, round(w / ratio[0]))
    elif w / h > ratio[1]:  # too wide: full height
        cw, ch = min(w, round(h * ratio[1])), h
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


# ---------------------------------------------------------------------- colour jitter

def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma (ITU-R 601-2) of float images [N, 3, H, W] -> [N, 1, H, W]."""
    return x[:, 0:1] * 0.299 + x[:, 1:2] * 0.587 + x[:, 2:3] * 0.114


def _brightness(x, f):
    return x * f


def _contrast(x, f):
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * f + mean


def _saturation(x, f):
    gray = _gray(x)
    return (x - gray) * f + gray


JITTER_OPS = (_brightness, _contrast, _saturation)  # the order of the factors in the draws


def jitter_in_order(x: torch.Tensor, factors, order) -> torch.Tensor:
    """Float images [N, 3, H, W] in [0, 255] with the same factors and order for every image."""
    for op in order:
        x = JITTER_OPS[int(op)](x, float(factors[int(op)])).clamp_(0, 255)
    return x


def jitter_batch(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Float images [N, 3, H, W] in [0, 255], each with its own factors [N, 3] and order [N, 3]
    (both on x's device): step k applies the op ``order[:, k]`` of every image."""
    f = factors.to(x.dtype).view(len(x), len(JITTER_OPS), 1, 1, 1)
    for step in range(len(JITTER_OPS)):
        out = x
        for op_id, op in enumerate(JITTER_OPS):
            chosen = (order[:, step] == op_id).view(-1, 1, 1, 1)
            out = torch.where(chosen, op(x, f[:, op_id]).clamp_(0, 255), out)
        x = out
    return x


# ---------------------------------------------------------------------- the views

class ViewDraws(NamedTuple):
    """A training view: the crop box, the flip, the jitter factors and their order."""

    box: tuple[int, int, int, int]
    flip: bool
    factors: tuple[float, float, float]
    order: tuple[int, int, int]

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([*self.box, float(self.flip), *self.factors, *self.order], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "ViewDraws":
        v = t.tolist()  # a CPU tensor from a loader worker
        return cls(tuple(int(a) for a in v[:4]), bool(v[4]), tuple(v[5:8]), tuple(int(a) for a in v[8:11]))


@dataclass(frozen=True)
class NaturalTransform:
    """The natural pipeline's settings (see the module); ``size`` is data.image_size."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    jitter: float = 0.4
    eval_ratio: float = 0.875
    ratio: tuple[float, float] = RATIO

    @classmethod
    def from_config(cls, cfg) -> "NaturalTransform":
        return cls(cfg.image_size, tuple(cfg.crop_scale), cfg.flip, cfg.color_jitter, cfg.eval_crop_ratio)

    @property
    def eval_resize(self) -> int:
        """The shorter side before the evaluation centre crop (256 for 224 at 0.875)."""
        return round(self.size / self.eval_ratio)

    def draw(self, h: int, w: int, key: DrawKey, index: int) -> ViewDraws:
        u = draws(key, index)
        lo = max(0.0, 1 - self.jitter)
        factors = tuple(float(lo + (1 + self.jitter - lo) * a) for a in u[_U_FACTORS:_U_FACTORS + 3])
        order = tuple(int(a) for a in np.argsort(u[_U_ORDER:_U_ORDER + 3], kind="stable"))
        return ViewDraws(crop_box(h, w, u, self.scale, self.ratio), bool(u[_U_FLIP] < 0.5), factors, order)

    def train_view(self, img: Image.Image, d: ViewDraws) -> torch.Tensor:
        """uint8 [3, S, S] of an RGB PIL image: crop + resize (bilinear), flip, colour jitter."""
        top, left, ch, cw = d.box
        # crop, then resize (not resize(box=...), whose filter reaches past the box's edges)
        img = img.crop((left, top, left + cw, top + ch)).resize((self.size, self.size), Image.BILINEAR)
        if self.flip and d.flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        if self.jitter > 0:
            x = jitter_in_order(x[None].float(), d.factors, d.order)[0].round_().to(torch.uint8)
        return x

    def eval_size(self, h: int, w: int) -> tuple[int, int]:
        """(height, width) after resizing the shorter side to :attr:`eval_resize` (as
        ``sources.read_image`` does)."""
        r = self.eval_resize
        s = r / min(h, w)
        return max(r, round(h * s)), max(r, round(w * s))


# ---------------------------------------------------------------------- decoding on the GPU

class Encoded(NamedTuple):
    """A loader worker's item with data.gpu_decode: ``data`` is a JPEG file's bytes (uint8,
    1-D) to decode on the device, or a view finished in the worker (uint8 [3, S, S], for files
    nvjpeg cannot read); ``draws`` the training view's :meth:`ViewDraws.as_tensor` (None:
    the evaluation view)."""

    data: torch.Tensor
    draws: torch.Tensor | None


def collate_encoded(samples):
    """Batches of (Encoded, label, index) stay lists of variable-length items."""
    items, labels, index = zip(*samples)
    return list(items), torch.tensor(labels, dtype=torch.int64), torch.tensor(index, dtype=torch.int64)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [3, H, W] -> float [3, h, w] (bilinear, antialiased when shrinking), rounded like a uint8 image."""
    out = torch.nn.functional.interpolate(x[None].float(), size=size, mode="bilinear", align_corners=False,
                                          antialias=True)
    return out[0].round_().clamp_(0, 255)


def _device_view(image: torch.Tensor, d: ViewDraws | None, t: NaturalTransform) -> torch.Tensor:
    """The crop of a decoded image (on its device) as float [3, S, S]: the training box
    resized, or the evaluation resize + centre crop."""
    if d is not None:
        top, left, ch, cw = d.box
        return _resize(image[:, top:top + ch, left:left + cw], (t.size, t.size))
    nh, nw = t.eval_size(image.shape[-2], image.shape[-1])
    top, left = (nh - t.size) // 2, (nw - t.size) // 2
    return _resize(image, (nh, nw))[:, top:top + t.size, left:left + t.size]


def decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """RGB uint8 [3, H, W] images on ``device`` of JPEG bytes (CPU), decoded together with nvjpeg."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for TorchCodec's
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def decode_on_device(items: list[Encoded], t: NaturalTransform, device: torch.device) -> torch.Tensor:
    """uint8 [N, 3, S, S] on ``device`` of a batch of :class:`Encoded` items: the JPEGs are
    decoded on the device and cropped, flipped and jittered there with their draws (the
    same as the workers' views but for the decoder's and the resampler's rounding)."""
    rows: list[torch.Tensor | None] = [None] * len(items)
    jpeg = [i for i, e in enumerate(items) if e.data.ndim == 1]
    if jpeg:
        decoded = decode_jpegs([items[i].data for i in jpeg], device)
        view_draws = [None if items[i].draws is None else ViewDraws.from_tensor(items[i].draws) for i in jpeg]
        x = torch.stack([_device_view(img, d, t) for img, d in zip(decoded, view_draws)])
        if view_draws[0] is not None:  # training views (a batch is all training or all evaluation)
            table = torch.stack([items[i].draws for i in jpeg]).to(device, non_blocking=True)
            if t.flip:
                x = torch.where((table[:, 4] > 0.5).view(-1, 1, 1, 1), x.flip(-1), x)
            if t.jitter > 0:
                x = jitter_batch(x, table[:, 5:8], table[:, 8:11].long())
        x = x.round_().clamp_(0, 255).to(torch.uint8)
        for i, view in zip(jpeg, x.unbind(0)):
            rows[i] = view
    for i, e in enumerate(items):
        if rows[i] is None:
            rows[i] = e.data.to(device, non_blocking=True)
    return torch.stack(rows)
