"""Per-class feature mean and covariance kept online from batches (ISDA, methods.md 5).

:class:`ClassMoments` holds, for every class c, the count n_c, the mean mu_c and the scatter
M_c = sum_i (a_i - mu_c)(a_i - mu_c)^T of all the features it has seen, in one of three forms
(``covariance``):

- ``full``: M_c itself, [C, d, d] (what ISDA keeps; for moderate d);
- ``diagonal``: its diagonal, the per-dimension sums of squares, [C, d];
- ``lowrank``: the diagonal plus a sketch Y_c = M_c Omega [C, d, r] with a fixed orthonormal
  probe Omega [d, r]. Sigma_c = F_c F_c^T + diag(delta_c) where F_c F_c^T is the Nyström
  approximation of M_c / n_c from the sketch (M Omega (Omega^T M Omega)^-1 Omega^T M, of rank
  r; exact when the range of M_c is that of Omega, close to it when Omega^T M_c Omega is well
  conditioned; the directions the probe catches poorly are lost to the diagonal) and delta_c
  makes the total diagonal the exact per-dimension variance (the Nyström part never exceeds
  M_c, so delta_c >= 0). A single-pass sketch without oversampling: truncating a wider one to
  rank r would need an eigendecomposition per class and step, which syncs a GPU with the host.

Every form is linear in M_c, so a batch merges exactly (Chan et al.'s parallel update, written
with the batch shifted by the current mean for numerical stability): with u_i = a_i - mu_a,
S1 = sum u_i, S2 = sum u_i u_i^T over a class's rows of the batch,

    n = n_a + n_b,   mu = mu_a + S1 / n,   M = M_a + S2 - S1 S1^T / n.

The statistics after any sequence of batches are those of all the rows seen, whatever the
batch boundaries; under DDP (``reduce=True``) the ranks' S0, S1, S2 are summed before the
merge, so two ranks splitting a stream hold the statistics of the whole stream.

Cost: a batch touches only K = min(B, C) classes, those present in it (plus absent ones to
fill K, on which the merge is the identity): K is fixed by the shapes, so no host sync is
needed to find them. No intermediate beyond the statistics of those K classes exceeds
``BLOCK`` elements: the per-class sums of outer products are accumulated in blocks of
feature rows, never as a batch x d x d tensor. Sigma is the population covariance M / n
(as ISDA's estimator); a class not seen yet has Sigma = 0.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import distributed
from ..errors import CheckpointError

COVARIANCES = ("full", "diagonal", "lowrank")
BLOCK = 2**18  # elements of the largest intermediate tensor a batch's moments build (1 MiB in float32)
PROBE_SEED = 0  # the low-rank probe Omega: the same on every rank and after a resume
NYSTROM_SHIFT = 1e-6  # nu = NYSTROM_SHIFT * |Y|_F: Nyström of M + nu I keeps its Cholesky factor finite

STATE = {"full": ("count", "mean", "scatter"), "diagonal": ("count", "mean", "squares"),
         "lowrank": ("count", "mean", "squares", "sketch")}


@dataclasses.dataclass
class Covariance:
    """Sigma of K classes: ``full`` [K, d, d], or ``diagonal`` [K, d] plus, for the low-rank
    form, ``factor`` [K, d, r] (Sigma_k = diag(diagonal_k) + factor_k factor_k^T). Plain tensors:
    a loss computed from them is differentiable in them."""

    full: torch.Tensor | None = None
    diagonal: torch.Tensor | None = None
    factor: torch.Tensor | None = None

    def select(self, rows: torch.Tensor) -> "Covariance":
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return Covariance(pick(self.full), pick(self.diagonal), pick(self.factor))

    def dense(self) -> torch.Tensor:
        """The [K, d, d] matrices (for checks and small d)."""
        if self.full is not None:
            return self.full
        dense = torch.diag_embed(self.diagonal)
        return dense if self.factor is None else dense + self.factor @ self.factor.transpose(1, 2)


def class_slots(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(classes [K], slot [C])``: K = min(len(labels), C) distinct classes, those present in
    ``labels`` first (ascending), then absent ones; ``slot[c]`` is c's place in that order, so
    ``slot[labels] < K`` gives each row the index of its class among ``classes``. Shapes depend
    only on the sizes, not on the labels' values (no host sync)."""
    present = torch.zeros(num_classes, dtype=torch.int8, device=labels.device).index_fill_(0, labels, 1)
    order = torch.argsort(1 - present, stable=True)
    slot = torch.empty_like(order).scatter_(0, order, torch.arange(num_classes, device=labels.device))
    return order[: min(labels.numel(), num_classes)], slot


def grouped_outer(groups: torch.Tensor, a: torch.Tensor, b: torch.Tensor, count: int) -> torch.Tensor:
    """[count, d, m]: sum over rows i with ``groups[i] == k`` of a_i b_i^T (a [B, d], b [B, m]),
    accumulated in blocks of feature rows of at most ``BLOCK`` elements."""
    rows, d, m = a.shape[0], a.shape[1], b.shape[1]
    out = a.new_zeros(count, d, m)
    step = max(1, BLOCK // max(1, rows * m))
    for start in range(0, d, step):
        part = a[:, start : start + step, None] * b[:, None, :]
        out[:, start : start + step] = a.new_zeros(count, *part.shape[1:]).index_add_(0, groups, part)
    return out


def probe(dim: int, rank: int) -> torch.Tensor:
    """The fixed orthonormal probe Omega [dim, rank] of the low-rank sketch (float32, CPU)."""
    gen = torch.Generator().manual_seed(PROBE_SEED)
    q, _ = torch.linalg.qr(torch.randn(dim, rank, generator=gen, dtype=torch.float64))
    return q.float()


def nystrom(sketch: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """F [K, d, r] with F F^T the Nyström approximation of each M_k from Y_k = M_k Omega [K, d, r].

    Computed for M + nu I (nu = NYSTROM_SHIFT |Y_k|_F, above the float32 rounding of the sketch),
    whose core Omega^T (M + nu I) Omega is positive definite, in float64 with a Cholesky factor
    (no eigendecomposition, no host sync); a class whose core still fails to factor gets F = 0
    (its Sigma is then the diagonal alone)."""
    y, o = sketch.double(), omega.double().to(sketch.device)
    nu = NYSTROM_SHIFT * y.flatten(1).norm(dim=1) + torch.finfo(torch.float64).tiny
    y = y + nu[:, None, None] * o
    core = o.t() @ y
    core = 0.5 * (core + core.transpose(1, 2))
    lower, info = torch.linalg.cholesky_ex(core)
    factor = torch.linalg.solve_triangular(lower, y.transpose(1, 2), upper=False).transpose(1, 2)
    ok = (info == 0)[:, None, None] & torch.isfinite(factor).all(dim=(1, 2), keepdim=True)
    return torch.where(ok, factor, torch.zeros_like(factor)).to(sketch.dtype)


class ClassMoments(nn.Module):
    """Count, mean and scatter of every class's features (see the module); ``reset`` sizes it."""

    def __init__(self, covariance: str = "full", rank: int | None = None):
        super().__init__()
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {', '.join(COVARIANCES)}, got {covariance!r}")
        if covariance == "lowrank" and (rank is None or rank < 1):
            raise ValueError(f"a low-rank covariance needs a rank >= 1, got {rank}")
        self.kind, self.rank = covariance, rank
        for name in ("count", "mean", "scatter", "squares", "sketch", "omega"):
            self.register_buffer(name, None, persistent=False)

    def reset(self, num_classes: int, dim: int, device: torch.device | str = "cpu") -> None:
        """Empty statistics for ``num_classes`` classes of ``dim``-d features on ``device``."""
        if self.kind == "lowrank" and not 1 <= self.rank < dim:
            raise ValueError(f"the rank {self.rank} must lie in 1..{dim - 1} (below the feature dimension {dim})")
        zeros = lambda *shape: torch.zeros(*shape, device=device)  # noqa: E731
        self.count = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.mean = zeros(num_classes, dim)
        self.scatter = zeros(num_classes, dim, dim) if self.kind == "full" else None
        self.squares = None if self.kind == "full" else zeros(num_classes, dim)
        self.sketch = zeros(num_classes, dim, self.rank) if self.kind == "lowrank" else None
        self.omega = probe(dim, self.rank).to(device) if self.kind == "lowrank" else None

    @property
    def num_classes(self) -> int:
        return self.count.shape[0]

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor, *, reduce: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge a batch (features [B, d], labels [B]); returns ``class_slots`` of its labels
        (of all ranks' labels with ``reduce``: every rank then merges the same sums)."""
        x, labels = features.detach().float(), labels.long()
        everyone = distributed.all_gather_cat(labels) if reduce and distributed.is_active() else labels
        classes, slot = class_slots(everyone, self.num_classes)
        k, row = classes.numel(), slot[labels]
        u = x - self.mean[labels]
        parts = [torch.zeros(k, device=x.device).index_add_(0, row, torch.ones_like(u[:, 0])),
                 u.new_zeros(k, u.shape[1]).index_add_(0, row, u)]
        if self.kind == "full":
            parts.append(grouped_outer(row, u, u, k))
        else:
            parts.append(u.new_zeros(k, u.shape[1]).index_add_(0, row, u * u))
            if self.kind == "lowrank":
                parts.append(grouped_outer(row, u, u @ self.omega, k))
        if reduce and distributed.is_active():
            flat = distributed.all_reduce_sum(torch.cat([p.flatten() for p in parts]))
            parts = [chunk.view_as(p) for chunk, p in zip(flat.split([p.numel() for p in parts]), parts)]
        self._merge(classes, *parts)
        return classes, slot

    def _merge(self, classes, n_b, s1, s2, sketch=None) -> None:
        n = self.count[classes] + n_b.double()
        inv = (1.0 / n.clamp_min(1)).float()
        self.mean.index_copy_(0, classes, self.mean[classes] + s1 * inv[:, None])
        if self.kind == "full":
            merged = self.scatter[classes] + s2 - s1[:, :, None] * s1[:, None, :] * inv[:, None, None]
            self.scatter.index_copy_(0, classes, merged)
        else:
            merged = (self.squares[classes] + s2 - s1 * s1 * inv[:, None]).clamp_min(0)
            self.squares.index_copy_(0, classes, merged)
        if sketch is not None:
            shift = s1[:, :, None] * (s1 @ self.omega)[:, None, :] * inv[:, None, None]
            self.sketch.index_copy_(0, classes, self.sketch[classes] + sketch - shift)
        self.count.index_copy_(0, classes, n)

    @torch.no_grad()
    def fit(self, features, labels: torch.Tensor, rows: int = 4096, *, normalize: bool = False) -> None:
        """The statistics of all rows of (features, labels) (merged ``rows`` at a time; of the
        L2-normalised rows with ``normalize``). ``features``: a tensor or a ShardedArray."""
        for start in range(0, features.shape[0], rows):
            chunk = features[start : start + rows].float()
            self.update(F.normalize(chunk, dim=1) if normalize else chunk, labels[start : start + rows])

    @torch.no_grad()
    def covariance(self, classes: torch.Tensor | None = None) -> Covariance:
        """Sigma of the listed classes (default: all), detached."""
        if classes is None:
            classes = torch.arange(self.num_classes, device=self.count.device)
        n = self.count[classes].clamp_min(1).float()
        if self.kind == "full":
            return Covariance(full=self.scatter[classes] / n[:, None, None])
        variance = self.squares[classes] / n[:, None]
        if self.kind == "diagonal":
            return Covariance(diagonal=variance)
        factor = nystrom(self.sketch[classes], self.omega) / n.sqrt()[:, None, None]
        return Covariance(diagonal=(variance - factor.square().sum(-1)).clamp_min(0), factor=factor)

    # ------------------------------------------------------------------ checkpoints

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).detach().cpu() for name in STATE[self.kind]}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_tensors` (after :meth:`reset` with the same sizes)."""
        for name in STATE[self.kind]:
            mine, saved = getattr(self, name), state.get(name)
            if saved is None or saved.shape != mine.shape:
                found = "missing" if saved is None else f"of shape {tuple(saved.shape)}"
                raise CheckpointError(f"the checkpoint's class statistics {name} are {found}, expected "
                                      f"{tuple(mine.shape)} ({self.kind} covariance); resume with the config "
                                      "that wrote it, or start a new run")
            setattr(self, name, saved.to(device=mine.device, dtype=mine.dtype))

    def extra_repr(self) -> str:
        return f"covariance={self.kind!r}" + (f", rank={self.rank}" if self.kind == "lowrank" else "")
