"""Feature Space Augmentation for long-tailed data (Chu et al. 2020; methods.md 5).

Phase I is stage 1. Phase II, from the last convolutional maps F [d, h, w] of the stage-1
backbone and its classifier w:

- class activation map of a sample of class y: CAM[h, w] = sum_k w_{y,k} F[k, h, w],
  min-max normalised per sample to [0, 1] (a flat map is all zero);
- class-specific part F * M, class-generic part F * (1 - M), M = (CAM > threshold): the two
  sum to F;
- the confusing classes of a tail class: the ``confusing`` classes (itself excluded) with the
  highest mean stage-1 softmax score over its training samples (ties: lower class first).

Phase III synthesises tail features on the fly: a tail sample t and a donor sample g of one
of its confusing classes give the map S = M_t * F_t + (1 - M_t) * (1 - M_g) * F_g, i.e. the
tail sample's own class-specific positions and, everywhere else, the donor's class-generic
part (its own class evidence removed), and the new feature is S's spatial mean (what the
backbone's pooling gives). Decisions: every epoch draws ``per_class`` such features per tail
class (tail sample uniform in the class, donor uniform over the images of its confusing
classes), shuffles them, and spreads them evenly over the epoch's batches, appended to the
real rows (so the classifier is fine-tuned on real and synthesised features); the maps come
from :class:`~tailaug.augment.base.SpatialMaps`, cached (offline) or recomputed from the
frozen backbone (online), which give the same features for the same seed.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from ..errors import ConfigError
from ..models.heads import head_logits
from ..registry import AUGMENTERS
from .base import AugmentContext, AugmenterOptions, FeatureAugmenter, SpatialRequest

# ---------------------------------------------------------------------------- phase II


def class_activation_map(maps: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CAM [B, h, w] of maps [B, d, h, w] for each row's class: sum_k weight[y, k] * maps[:, k]."""
    return torch.einsum("bdhw,bd->bhw", maps.float(), weight.float()[labels.to(weight.device)])


def normalise_map(cam: torch.Tensor) -> torch.Tensor:
    """Each map of [B, h, w] scaled to [0, 1] (min-max); a flat map becomes all zeros."""
    flat = cam.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    span = (high - low).clamp_min(torch.finfo(cam.dtype).tiny)
    return torch.where((high > low)[:, None, None], (cam - low[:, None, None]) / span[:, None, None],
                       torch.zeros_like(cam))


def split_features(maps: torch.Tensor, cam: torch.Tensor, threshold: float):
    """(class-specific part, class-generic part, mask [B, h, w]) of maps [B, d, h, w]:
    positions whose normalised CAM exceeds ``threshold`` are specific, the rest generic."""
    mask = cam > threshold
    keep = mask[:, None].to(maps.dtype)
    return maps * keep, maps * (1 - keep), mask


def confusing_classes(scores: torch.Tensor, labels: torch.Tensor, classes, k: int) -> torch.Tensor:
    """[len(classes), k]: for each listed class, the k other classes with the highest mean
    softmax score over its rows of ``scores`` [N, C] (ties: lower class id first)."""
    probs = scores.float().softmax(1)
    num_classes = probs.shape[1]
    if not 1 <= k < num_classes:
        raise ConfigError(f"retrain.augmenter.confusing = {k} must lie in 1..{num_classes - 1} (the other classes)")
    out = []
    for c in classes:
        rows = labels == int(c)
        if not bool(rows.any()):
            raise ConfigError(f"tail class {int(c)} has no training rows to find its confusing classes")
        mean = probs[rows].mean(0)
        mean[int(c)] = -1.0
        order = torch.sort(mean, descending=True, stable=True).indices
        out.append(order[:k])
    return torch.stack(out)


def synthesise(tail_maps, tail_mask, donor_generic) -> torch.Tensor:
    """New maps [B, d, h, w]: the tail maps where ``tail_mask`` is True, the donors' generic
    parts elsewhere."""
    return torch.where(tail_mask[:, None], tail_maps, donor_generic)


# ---------------------------------------------------------------------------- options


class FSAOptions(AugmenterOptions):
    """``retrain.augmenter: {name: fsa, ...}``."""

    name: Literal["fsa"]
    threshold: float = Field(0.5, gt=0, lt=1)  # normalised CAM above it: class-specific
    confusing: int = Field(3, ge=1)  # confusing classes per tail class (top-k of the stage-1 scores)
    per_class: int | None = Field(None, ge=1)  # synthesised per tail class per epoch; None: N / C
    tail_max: int | None = Field(None, ge=1)  # tail: at most this many images; None: not a head class
    maps: Literal["offline", "online"] = "offline"  # cached spatial maps, or recomputed per batch
    maps_dtype: Literal["bfloat16", "float32"] = "bfloat16"  # of the cache (and of online maps)

    def spatial_request(self) -> SpatialRequest:
        return SpatialRequest(online=self.maps == "online", dtype=self.maps_dtype)

    def label(self) -> str:
        return f"FSA ({self.maps})"


@AUGMENTERS.register("fsa", config=FSAOptions, label="FSA")
class FSAAugmenter(FeatureAugmenter):
    """Phase III of Feature Space Augmentation on stage-3 batches (see the module)."""

    name = "fsa"

    def __init__(self, threshold: float = 0.5, confusing: int = 3, per_class: int | None = None,
                 tail_max: int | None = None, maps: str = "offline", maps_dtype: str = "bfloat16",
                 chunk: int = 512):
        super().__init__("tail")
        if not 0 < threshold < 1:
            raise ConfigError(f"fsa threshold must lie in (0, 1), got {threshold}")
        self.threshold, self.confusing, self.per_class = float(threshold), int(confusing), per_class
        self.tail_max, self.maps, self.chunk = tail_max, maps, int(chunk)
        self.spatial = None
        self.tail: list[int] = []
        self.confusers: torch.Tensor | None = None
        self._pool: tuple[torch.Tensor, torch.Tensor] | None = None
        self._cursor = 0

    def fit(self, ctx: AugmentContext) -> None:
        if ctx.spatial is None:
            raise ConfigError("the fsa augmenter needs the spatial maps of the training images (AugmentContext."
                              "spatial); tailaug run provides them, or use another retrain.augmenter")
        if ctx.classifier_weight is None:
            raise ConfigError("the fsa augmenter needs the stage-1 classifier (class activation maps and "
                              "confusing classes); pass its weights to stage 3")
        counts = ctx.class_counts.tolist()
        if self.tail_max is not None:
            tail = [c for c, n in enumerate(counts) if n <= self.tail_max]
        else:
            super().fit(ctx)
            tail = torch.where(self.target_classes)[0].tolist()
        if not tail:
            raise ConfigError(f"no class counts as tail (class counts {counts}); raise "
                              "retrain.augmenter.tail_max or shrink the head set (stg.head)")
        self.target_classes = torch.zeros(ctx.num_classes, dtype=torch.bool, device=ctx.features.device)
        self.target_classes[tail] = True
        self.fitted = True
        self.tail = tail
        self.weight = ctx.classifier_weight.float()
        scores = head_logits(ctx.dense_features(), self.weight,  # [N, C]: FSA holds the features in memory
                             None if ctx.classifier_bias is None else ctx.classifier_bias.float(),
                             ctx.classifier_cosine_scale)
        self.confusers = confusing_classes(scores, ctx.labels, tail, self.confusing)
        self.spatial = ctx.spatial
        index, labels = ctx.spatial.index.cpu().long(), ctx.spatial.labels.cpu().long()
        self._label_of = torch.full((int(index.max()) + 1,), -1, dtype=torch.long)
        self._label_of[index] = labels
        self._members = [index[labels == c] for c in tail]
        self._donors = [index[torch.isin(labels, self.confusers[i].cpu())] for i in range(len(tail))]
        empty = [c for c, m in zip(tail, self._members) if m.numel() == 0]
        if empty:
            raise ConfigError(f"tail classes {empty} have no image with spatial maps; re-extract them")
        self.rows_per_epoch = int(ctx.features.shape[0])
        self.count = self.per_class or max(1, round(self.rows_per_epoch / ctx.num_classes))

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        self._pool, self._cursor = None, 0

    # ------------------------------------------------------------------ synthesis

    def draw(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One epoch's (tail index, donor index, class) triples, ``count`` per tail class, shuffled."""
        tails, donors, classes = [], [], []
        for c, members, pool in zip(self.tail, self._members, self._donors):
            pick = torch.randint(len(members), (self.count,), generator=generator, device=_device(generator))
            give = torch.randint(len(pool), (self.count,), generator=generator, device=_device(generator))
            tails.append(members[pick.cpu()])
            donors.append(pool[give.cpu()])
            classes.append(torch.full((self.count,), c, dtype=torch.long))
        order = torch.randperm(self.count * len(self.tail), generator=generator, device=_device(generator)).cpu()
        return torch.cat(tails)[order], torch.cat(donors)[order], torch.cat(classes)[order]

    def decompose(self, index: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(maps, normalised CAM, specific mask) of the images ``index``, each for its own class."""
        maps = self.spatial.maps(index, device)
        labels = self._label_of[index.cpu()].to(device)
        cam = normalise_map(class_activation_map(maps, self.weight.to(device), labels))
        return maps, cam, cam > self.threshold

    def synthesise_pairs(self, tail_index: torch.Tensor, donor_index: torch.Tensor, device) -> torch.Tensor:
        """Pooled synthesised features [B, d] of (tail, donor) image pairs, in chunks."""
        out = []
        for start in range(0, len(tail_index), self.chunk):
            t, g = tail_index[start : start + self.chunk], donor_index[start : start + self.chunk]
            tail_maps, _, tail_mask = self.decompose(t, device)
            donor_maps, donor_cam, _ = self.decompose(g, device)
            _, donor_generic, _ = split_features(donor_maps, donor_cam, self.threshold)
            out.append(synthesise(tail_maps, tail_mask, donor_generic).mean((2, 3)))
        return torch.cat(out)

    def forward(self, features, labels, *, generator=None):
        if not self.fitted:
            raise RuntimeError("FSAAugmenter.fit(ctx) must be called before augmenting")
        if self._pool is None:
            tail_index, donor_index, classes = self.draw(generator)
            pooled = self.synthesise_pairs(tail_index, donor_index, features.device)
            self._pool, self._cursor = (pooled, classes.to(features.device)), 0
        pooled, classes = self._pool
        take = math.ceil(len(classes) * features.shape[0] / self.rows_per_epoch)
        new = slice(self._cursor, self._cursor + take)
        self._cursor += take
        if new.start >= len(classes):
            return features, labels
        return (torch.cat([features, pooled[new].to(features.dtype)]), torch.cat([labels, classes[new]]))

    def extra_repr(self) -> str:
        return (f"threshold={self.threshold}, confusing={self.confusing}, per_class={self.per_class}, "
                f"tail_max={self.tail_max}, maps={self.maps!r}")


def _device(generator: torch.Generator | None):
    return generator.device if generator is not None else "cpu"
