"""Augmentation of a whole uint8 batch at once, as tensors (pad-and-crop, flip)."""

from __future__ import annotations

import torch

MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "image_folder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad every image by ``padding`` and cut a random crop of the original size from each."""
    if padding == 0:
        return x
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=generator.device).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=generator.device).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=generator, device=generator.device) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class BatchTransform:
    """uint8 [N,C,H,W] -> normalised float [N,C',S,S], optionally augmented.

    ``size`` (a pretrained backbone's input size) resizes the images (bilinear, after the
    crop and flip) and ``channels`` repeats grayscale to that many channels; None keeps both.
    """

    def __init__(self, mean, std, padding: int = 4, flip: bool = True, channels_last: bool = False,
                 *, size: int | None = None, channels: int | None = None):
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.padding, self.flip, self.channels_last = padding, flip, channels_last
        self.size, self.channels = size, channels

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if generator is not None:
            x = random_crop(x, self.padding, generator)
            if self.flip:
                x = random_flip(x, generator)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        x = x.float()
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            down = min(x.shape[-2:]) > self.size
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                                align_corners=False, antialias=down).clamp_(0, 255)
        if self.channels is not None and x.shape[1] != self.channels:
            if x.shape[1] != 1:
                raise ValueError(f"cannot turn {x.shape[1]}-channel images into {self.channels} channels")
            x = x.expand(-1, self.channels, -1, -1)
        out = (x / 255.0 - mean) / std
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out
