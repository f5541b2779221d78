"""The Semantic Transformation Generator (STG) and its stage-3 augmenter (methods.md 3-4).

Stage 2 learns, on head-class features, a network that maps one feature a_i (plus a class
token) to the Gaussian N(mu_i, diag(Sigma_i)) of its plausible within-class transformations.
Its training targets come from :class:`TargetEstimator` (the paper's Eq. 1). Stage 3 applies
it to tail samples with :class:`STGAugmenterModule` (Eq. 3 and Eq. 4).

Decisions fixed here (methods.md where it decides, otherwise stated):

- Neighbours of a sample: the same-class rows of the mini-batch and of the memory queue,
  excluding every row with the sample's own dataset index (the sample itself and other
  cached views of the same image). Without an index only the row itself is excluded.
- Fewer than ``min_neighbours`` neighbours: no target in that step (mask False).
- Moving average keyed by dataset index: the first visit stores the target itself; later
  visits mu_bar <- rho * mu_bar + (1 - rho) * mu (same for Sigma). Rows of one batch that
  share an index are averaged first and update the state once.
- The memory is a FIFO queue of the most recent ``memory_size`` (feature, label, index)
  rows, pushed after every step (after the targets of that step are computed).
- The generator predicts log-variance; Sigma = exp(log_var).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..data.classes import shot_groups
from ..errors import ConfigError
from ..losses.base import LossInputs
from ..models.heads import head_logits, linear_form
from ..registry import AUGMENTERS
from .base import AugmentContext, AugmenterOptions, FeatureAugmenter

# --------------------------------------------------------------------------- head set


def head_classes(class_counts, cfg=None, *, many: int = 100) -> list[int]:
    """The classes whose samples train the generator, sorted.

    ``cfg`` is a :class:`~tailaug.config.HeadSetConfig` (default: many-shot rule).
    ``many_shot``: n_c > ``many`` (the data.shots.many threshold); ``threshold``:
    n_c > cfg.threshold; ``top_k``: the cfg.top_k largest classes (ties: lower index first).
    May return an empty list; callers that need a head class say so.
    """
    counts = [int(c) for c in torch.as_tensor(class_counts).reshape(-1).tolist()]
    rule = "many_shot" if cfg is None else cfg.rule
    if rule == "many_shot":
        return shot_groups(counts, many=many, few=0)["many"]
    if rule == "threshold":
        return [c for c, n in enumerate(counts) if n > cfg.threshold]
    if rule == "top_k":
        if cfg.top_k > len(counts):
            raise ConfigError(
                f"stg.head.top_k = {cfg.top_k} is more than the {len(counts)} classes of the data; "
                f"set it below {len(counts)} so that some classes stay tail classes"
            )
        order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
        return sorted(order[: cfg.top_k])
    raise ConfigError(f"unknown head-set rule {rule!r}; use many_shot, threshold or top_k (stg.head.rule)")


def class_betas(class_counts) -> torch.Tensor:
    """beta_y = (n_min / n_y) ** 0.5 per class (Eq. 3); n_min over non-empty classes, 0 for empty ones."""
    counts = torch.as_tensor(class_counts).reshape(-1).double()
    present = counts > 0
    if not present.any():
        raise ValueError("class_counts are all zero")
    n_min = counts[present].min()
    beta = torch.zeros_like(counts)
    beta[present] = (n_min / counts[present]).sqrt()
    return beta.float()


# --------------------------------------------------------------------------- Gaussians


def gaussian_kl(mu1, var1, mu2, var2, *, reduction: str = "sum") -> torch.Tensor:
    """KL(N(mu1, diag var1) || N(mu2, diag var2)) over the last dimension.

    reduction ``sum``: the KL divergence itself (per leading index); ``mean``: divided by
    d (the per-dimension mean used as a training loss); ``none``: per dimension.
    """
    mu1, var1, mu2, var2 = (torch.as_tensor(x) for x in (mu1, var1, mu2, var2))
    per_dim = 0.5 * (torch.log(var2) - torch.log(var1) + (var1 + (mu1 - mu2) ** 2) / var2 - 1.0)
    if reduction == "none":
        return per_dim
    if reduction == "sum":
        return per_dim.sum(-1)
    if reduction == "mean":
        return per_dim.mean(-1)
    raise ValueError(f"reduction must be sum, mean or none, got {reduction!r}")


def generator_loss(mu, log_var, mu_target, sigma_target, kind: str = "mse", *, eps: float = 1e-6) -> torch.Tensor:
    """The stage-2 loss on rows that have a target (a scalar).

    ``mse``: MSE(mu, mu_t) + MSE(log_var, log(Sigma_t + eps)).
    ``kl``: KL(N(mu_t, Sigma_t + eps) || N(mu, exp(log_var))), mean over dimensions and rows.
    """
    if kind == "mse":
        return F.mse_loss(mu, mu_target) + F.mse_loss(log_var, torch.log(sigma_target + eps))
    if kind == "kl":
        # written with log_var directly (no exp followed by log) for stability
        var_t = sigma_target + eps
        per_dim = 0.5 * (log_var - torch.log(var_t) + (var_t + (mu_target - mu) ** 2) * torch.exp(-log_var) - 1.0)
        return per_dim.mean()
    raise ConfigError(f"unknown generator loss {kind!r}; use mse or kl (stg.loss)")


def neighbour_nll(mu, log_var, factor, anchors, pool, same) -> torch.Tensor:
    """The stage-2 loss ``stg.loss = nll`` (a scalar): the negative log-likelihood of each row's
    neighbours under its predicted Gaussian N(anchor + mu, diag(exp(log_var)) + U U^T),
    averaged over the neighbours (``same`` [B, P] marks them among the ``pool`` rows [P, d]),
    divided by d, then averaged over the rows; the 2 pi term is dropped. Up to a constant
    this is KL(the neighbours' Gaussian, full covariance || prediction), so it fits Eq. 1's
    mean and, with U [B, d, r], the off-diagonal covariance too. The Woodbury identity keeps
    it to products of [B, d] and [B, d, r] with [P, d]: no [B, P, d] tensor, no d x d matrix.
    """
    dim, rank = factor.shape[1], factor.shape[2]
    inv = torch.exp(-log_var)
    centre = pool.mean(0)
    p = pool - centre
    b = anchors + mu - centre  # the predicted mean, shifted like the pool
    weights = same.to(p.dtype) / same.sum(1, keepdim=True).clamp_min(1).to(p.dtype)
    # (p_j - b_i)^T D_i^-1 (p_j - b_i) for every pair, expanded
    quad = inv @ p.square().T - 2 * (b * inv) @ p.T + (b.square() * inv).sum(1, keepdim=True)
    log_det = log_var.sum(1)
    if rank:
        v = factor * inv[:, :, None]  # D^-1 U
        inner = torch.eye(rank, dtype=p.dtype, device=p.device) + factor.transpose(1, 2) @ v
        chol = torch.linalg.cholesky(inner)
        proj = torch.einsum("bdr,pd->brp", v, p) - torch.einsum("bdr,bd->br", v, b)[:, :, None]
        quad = quad - torch.linalg.solve_triangular(chol, proj, upper=False).square().sum(1)
        log_det = log_det + 2 * chol.diagonal(dim1=1, dim2=2).log().sum(1)
    return (0.5 * ((weights * quad).sum(1) + log_det)).mean() / dim


# --------------------------------------------------------------------------- targets (Eq. 1)


class TargetEstimator:
    """Per-sample transformation targets from same-class neighbours (Eq. 1), with memory and EMA.

    Call it once per training step: ``mu, sigma, mask = est(features, labels, index)``
    computes the targets of the batch from the batch and the memory, smooths them over
    visits of the same dataset index, then pushes the batch into the memory. The pieces are
    also available separately (:meth:`estimate`, :meth:`smooth`, :meth:`push`).
    Rows with ``mask`` False have no target (mu and sigma are zero there). ``neighbours`` k > 0
    takes Eq. 1 over the k nearest same-class rows only (fewer when fewer exist).
    """

    def __init__(self, memory_size: int = 1200, min_neighbours: int = 2, ema: float = 0.9, neighbours: int = 0):
        if memory_size < 0:
            raise ValueError(f"memory_size must be >= 0, got {memory_size}")
        if min_neighbours < 1:
            raise ValueError(f"min_neighbours must be >= 1, got {min_neighbours}")
        if not 0 <= ema < 1:
            raise ValueError(f"ema must lie in [0, 1), got {ema}")
        if neighbours < 0:
            raise ValueError(f"neighbours must be >= 0 (0: every same-class row), got {neighbours}")
        self.neighbours = int(neighbours)  # k nearest same-class rows; 0: all of them
        self.memory_size = int(memory_size)
        self.min_neighbours = int(min_neighbours)
        self.ema = float(ema)
        self.reset()

    def reset(self) -> None:
        self.mem_features: torch.Tensor | None = None  # [m', d], oldest first
        self.mem_labels: torch.Tensor | None = None
        self.mem_index: torch.Tensor | None = None  # -1 where unknown
        self._mu_bar: torch.Tensor | None = None  # [K, d] keyed by dataset index
        self._sigma_bar: torch.Tensor | None = None
        self._seen: torch.Tensor | None = None  # bool [K]

    def __len__(self) -> int:
        return 0 if self.mem_features is None else int(self.mem_features.shape[0])

    def __call__(self, features, labels, index=None):
        mu, sigma, mask = self.estimate(features, labels, index)
        if index is not None:
            mu, sigma = self.smooth(mu, sigma, mask, index)
        self.push(features, labels, index)
        return mu, sigma, mask

    # ------------------------------------------------------------------ pieces

    def neighbourhood(self, features: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None = None):
        """(pool [P, d], same bool [B, P]): the rows Eq. 1 may use (the batch, then the memory)
        and, per batch row, which of them are its neighbours (memory unchanged)."""
        a = features.detach()
        b = a.shape[0]
        labels = labels.to(a.device).long()
        if index is not None:
            index = index.to(a.device).long()
            if index.numel() and int(index.min()) < 0:
                raise ValueError("dataset indices must be >= 0")
        pool, pool_labels = a, labels
        if self.mem_features is not None and len(self):
            pool = torch.cat([a, self.mem_features.to(a)])
            pool_labels = torch.cat([labels, self.mem_labels.to(a.device)])
        same = labels[:, None] == pool_labels[None, :]  # [B, P]
        if index is not None:
            pool_index = index
            if pool.shape[0] > b:
                pool_index = torch.cat([index, self.mem_index.to(a.device)])
            same &= index[:, None] != pool_index[None, :]
        else:
            same[:, :b] &= ~torch.eye(b, dtype=torch.bool, device=a.device)
        if self.neighbours:
            distance = torch.cdist(a.float(), pool.float()).masked_fill(~same, float("inf"))
            nearest = distance.topk(min(self.neighbours, pool.shape[0]), dim=1, largest=False).indices
            same = torch.zeros_like(same).scatter_(1, nearest, True) & same
        return pool, same

    def estimate(self, features: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None = None):
        """Raw Eq. 1 targets of a batch (no smoothing, memory unchanged)."""
        a = features.detach()
        pool, same = self.neighbourhood(a, labels, index)
        k = same.sum(1)
        mask = k >= self.min_neighbours
        # float64 and a common shift keep E[x^2] - E[x]^2 accurate
        pool64 = pool.double()
        shift = pool64.mean(0, keepdim=True)
        centred = pool64 - shift
        weights = same.double() / k.clamp_min(1).double()[:, None]
        mean = weights @ centred  # mean of the neighbours, shifted
        second = weights @ centred.square()
        sigma = (second - mean.square()).clamp_min(0.0)
        mu = mean - (a.double() - shift)
        keep = mask[:, None]
        mu = torch.where(keep, mu, torch.zeros_like(mu)).to(a.dtype)
        sigma = torch.where(keep, sigma, torch.zeros_like(sigma)).to(a.dtype)
        return mu, sigma, mask

    def smooth(self, mu: torch.Tensor, sigma: torch.Tensor, mask: torch.Tensor, index: torch.Tensor):
        """Moving average over visits keyed by dataset index; returns the smoothed targets."""
        index = index.to(mu.device).long()
        rows = mask.nonzero().squeeze(1)
        out_mu, out_sigma = mu.clone(), sigma.clone()
        if rows.numel() == 0:
            return out_mu, out_sigma
        keys, inverse = torch.unique(index[rows], return_inverse=True)
        count = torch.bincount(inverse, minlength=keys.numel()).to(mu.dtype)[:, None]
        batch_mu = torch.zeros(keys.numel(), mu.shape[1], dtype=mu.dtype, device=mu.device)
        batch_sigma = torch.zeros_like(batch_mu)
        batch_mu.index_add_(0, inverse, mu[rows])
        batch_sigma.index_add_(0, inverse, sigma[rows])
        batch_mu /= count
        batch_sigma /= count
        self._grow(int(keys.max()) + 1, mu.shape[1], mu.dtype, mu.device)
        seen = self._seen[keys][:, None]
        rho = self.ema
        new_mu = torch.where(seen, rho * self._mu_bar[keys] + (1 - rho) * batch_mu, batch_mu)
        new_sigma = torch.where(seen, rho * self._sigma_bar[keys] + (1 - rho) * batch_sigma, batch_sigma)
        self._mu_bar[keys] = new_mu
        self._sigma_bar[keys] = new_sigma
        self._seen[keys] = True
        out_mu[rows] = new_mu[inverse]
        out_sigma[rows] = new_sigma[inverse]
        return out_mu, out_sigma

    def push(self, features: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Append a batch to the FIFO memory, dropping the oldest rows beyond ``memory_size``."""
        if self.memory_size == 0:
            return
        feats = features.detach()
        labels = labels.detach().to(feats.device).long()
        if index is None:
            index = torch.full_like(labels, -1)
        index = index.detach().to(feats.device).long()
        if self.mem_features is not None:
            feats = torch.cat([self.mem_features, feats])
            labels = torch.cat([self.mem_labels, labels])
            index = torch.cat([self.mem_index, index])
        m = self.memory_size
        self.mem_features, self.mem_labels, self.mem_index = feats[-m:], labels[-m:], index[-m:]

    def _grow(self, size: int, dim: int, dtype, device) -> None:
        if self._seen is not None and self._seen.numel() >= size:
            return
        old = 0 if self._seen is None else self._seen.numel()
        new = max(size, 2 * old)
        mu_bar = torch.zeros(new, dim, dtype=dtype, device=device)
        sigma_bar = torch.zeros(new, dim, dtype=dtype, device=device)
        seen = torch.zeros(new, dtype=torch.bool, device=device)
        if old:
            mu_bar[:old], sigma_bar[:old], seen[:old] = self._mu_bar, self._sigma_bar, self._seen
        self._mu_bar, self._sigma_bar, self._seen = mu_bar, sigma_bar, seen


# --------------------------------------------------------------------------- the generator (Eq. 2)


def _branch(dim: int, hidden_dims, out: int | None = None) -> nn.Sequential:
    layers: list[nn.Module] = []
    prev = dim
    for h in hidden_dims:
        layers += [nn.Linear(prev, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
        prev = h
    layers.append(nn.Linear(prev, dim if out is None else out))
    return nn.Sequential(*layers)


class SemanticTransformationGenerator(nn.Module):
    """s(a + p_c) -> (mu, log_var): two MLP branches (Linear-BatchNorm-ReLU per hidden dim, then Linear).

    ``tokens`` [C, d] are the learnable class tokens, initialised N(0, token_std^2);
    ``trained_tokens`` (bool [C] buffer) marks the classes whose tokens were trained.
    ``rank`` r > 0 adds a third branch, :meth:`factor`, for a low-rank part of the covariance:
    Sigma = diag(exp(log_var)) + U U^T with U [d, r] per sample (the paper: r = 0).
    """

    def __init__(self, dim: int, num_classes: int, hidden_dims=(256,), token_std: float = 1.0, rank: int = 0):
        super().__init__()
        if dim < 1 or num_classes < 1:
            raise ValueError(f"dim and num_classes must be >= 1, got {dim}, {num_classes}")
        if not 0 <= rank <= dim:
            raise ConfigError(f"stg.rank must lie in [0, {dim}] (the feature dimension), got {rank}")
        if any(int(h) < 1 for h in hidden_dims):
            raise ConfigError(f"every hidden layer needs at least one unit; got stg.hidden_dims = {list(hidden_dims)}")
        self.dim = int(dim)
        self.num_classes = int(num_classes)
        self.hidden_dims = [int(h) for h in hidden_dims]
        self.token_std = float(token_std)
        self.tokens = nn.Parameter(torch.randn(num_classes, dim) * token_std)
        self.mean_branch = _branch(dim, self.hidden_dims)
        self.var_branch = _branch(dim, self.hidden_dims)
        self.rank = int(rank)
        if rank:
            self.factor_branch = _branch(dim, self.hidden_dims, dim * rank)
            with torch.no_grad():  # start near the diagonal model: small factors
                self.factor_branch[-1].weight.mul_(0.1)
                self.factor_branch[-1].bias.zero_()
        self.register_buffer("trained_tokens", torch.zeros(num_classes, dtype=torch.bool))

    def arch(self) -> dict:
        """The constructor arguments (enough to rebuild the module before loading weights)."""
        return {
            "dim": self.dim,
            "num_classes": self.num_classes,
            "hidden_dims": list(self.hidden_dims),
            "token_std": self.token_std,
            **({"rank": self.rank} if self.rank else {}),
        }

    def forward(self, features: torch.Tensor, token_classes: torch.Tensor):
        x = features + self.tokens[token_classes]
        return self.mean_branch(x), self.var_branch(x)

    def factor(self, features: torch.Tensor, token_classes: torch.Tensor) -> torch.Tensor:
        """U [B, d, r] of the low-rank part of Sigma ([B, d, 0] at rank 0)."""
        if not self.rank:
            return features.new_zeros(features.shape[0], self.dim, 0)
        x = features + self.tokens[token_classes]
        return self.factor_branch(x).view(-1, self.dim, self.rank)


# --------------------------------------------------------------------------- stage-3 augmenter


def choose_tokens(
    features: torch.Tensor,
    candidates: torch.Tensor,
    *,
    mode: str = "prototype",
    prototypes: torch.Tensor | None = None,
    classifier_weight: torch.Tensor | None = None,
    classifier_bias: torch.Tensor | None = None,
    classifier_cosine_scale: float | None = None,
) -> torch.Tensor:
    """The head class whose token each row borrows, [B] (class ids from ``candidates``).

    ``prototype``: highest cosine similarity between the feature and the candidates' mean
    features ``prototypes`` [H, d]. ``classifier``: highest stage-1 score among the
    candidates, from ``classifier_weight``/``classifier_bias`` restricted to them ([H, d], [H]),
    scored as the stage-1 head does (a cosine head when ``classifier_cosine_scale`` is set).
    """
    if mode == "prototype":
        if prototypes is None:
            raise ValueError("token mode 'prototype' needs the head-class prototypes")
        scores = F.normalize(features.float(), dim=1) @ F.normalize(prototypes.float(), dim=1).T
    elif mode == "classifier":
        if classifier_weight is None:
            raise ConfigError(
                "retrain.augmenter.token = classifier needs the stage-1 classifier weights; "
                "pass them in the AugmentContext or use token: prototype"
            )
        bias = None if classifier_bias is None else classifier_bias.float()
        scores = head_logits(features.float(), classifier_weight.float(), bias, classifier_cosine_scale)
    else:
        raise ConfigError(f"unknown token mode {mode!r}; use prototype or classifier (retrain.augmenter.token)")
    return candidates.to(features.device)[scores.argmax(1)]


class STGAugmenter(AugmenterOptions):
    """Options of the STG augmenter (Eq. 3 and Eq. 4); the generator comes from stage 2 (``stg``)."""

    uses_generator: ClassVar[bool] = True
    name: Literal["stg"]
    lam: float = Field(1.5, ge=0)  # lambda of Eq. 3
    t: float = Field(0.5, ge=0, le=1)  # fraction of coordinates replaced (Eq. 4)
    mu_scale: float = Field(1.0, ge=0)  # scale of the mean term; 0 turns it off
    token: Literal["prototype", "classifier"] = "prototype"
    targets: Literal["tail", "all"] = "tail"
    # the share of target rows augmented at each step (drawn per row); the others stay clean
    rows: float = Field(1.0, gt=0, le=1)
    # keep augmented features within each coordinate's range over the training features
    # (after a ReLU and average pooling: never negative)
    clamp: bool = False
    # sample: draw augmented features (Eq. 3-4); implicit: no draws, the expected
    # cross-entropy's upper bound over that same distribution (ISDA's bound, per sample)
    mode: Literal["sample", "implicit"] = "sample"

    def label(self) -> str:
        extras = [f"{k} {v}" for k, v, default in (("rows", self.rows, 1.0), ("mu_scale", self.mu_scale, 1.0))
                  if v != default]
        extras += ["clamped"] * self.clamp + ["implicit"] * (self.mode == "implicit")
        return f"STG (lambda {self.lam}{''.join(', ' + e for e in extras)})"


@AUGMENTERS.register("stg", config=STGAugmenter, label="STG")
class STGAugmenterModule(FeatureAugmenter):
    """Sample-specific augmentation with a trained, frozen STG (Eq. 3 and Eq. 4).

    a_aug = a + (sqrt(Sigma) * eps + mu_scale * mu) * lam * beta_y; then each coordinate
    takes a_aug with probability t (u < t, u ~ U(0, 1)) and keeps a otherwise. Tail rows
    borrow the token of their most similar head class; with ``targets="all"`` head rows use
    their own class token. The generator is frozen (no gradients) and stays in eval mode.

    ``rows`` < 1 augments that share of the target rows of each batch (a draw per row), the
    rest stay clean; ``clamp`` keeps every augmented coordinate within its range over the
    training features. ``mode="implicit"`` draws nothing: per coordinate the augmented
    feature has mean a + t s mu and variance t s^2 Sigma + t (1 - t) s^2 mu^2 (s = lam
    beta_y, mu scaled by mu_scale), and the loss gets ISDA's upper bound of the expected
    cross-entropy under a Gaussian with these moments: the logit of class j != y gains
    (w_j - w_y)^T m + 1/2 sum_k v_k (w_jk - w_yk)^2, with m the mean shift and v the variance
    (:func:`implicit_term`).
    """

    name = "stg"

    def __init__(
        self,
        generator_module: SemanticTransformationGenerator,
        *,
        lam: float = 1.5,
        t: float = 0.5,
        mu_scale: float = 1.0,
        token: str = "prototype",
        targets: str = "tail",
        rows: float = 1.0,
        clamp: bool = False,
        mode: str = "sample",
    ):
        super().__init__(targets)
        if generator_module is None:
            raise ConfigError("the stg augmenter needs a trained generator (run stage 2 first)")
        if not 0 <= t <= 1:
            raise ConfigError(f"t must lie in [0, 1], got {t}")
        if lam < 0 or mu_scale < 0:
            raise ConfigError(f"lam and mu_scale must be >= 0, got {lam}, {mu_scale}")
        if token not in ("prototype", "classifier"):
            raise ConfigError(f"unknown token mode {token!r}; use prototype or classifier")
        if not 0 < rows <= 1:
            raise ConfigError(f"rows (the share of target rows augmented) must lie in (0, 1], got {rows}")
        if mode not in ("sample", "implicit"):
            raise ConfigError(f"unknown STG mode {mode!r}; use sample or implicit")
        if clamp and mode == "implicit":
            raise ConfigError("clamp acts on drawn features and the implicit mode draws none; "
                              "set clamp: false or mode: sample")
        self.rows, self.clamp, self.mode = float(rows), bool(clamp), mode
        self.implicit_rows: torch.Tensor | None = None  # implicit mode: the batch's augmented rows
        self.register_buffer("low", None, persistent=False)  # [d] range of the training features (clamp)
        self.register_buffer("high", None, persistent=False)
        self.generator_module = generator_module
        self.generator_module.requires_grad_(False)
        self.generator_module.eval()
        self.lam, self.t, self.mu_scale, self.token = float(lam), float(t), float(mu_scale), token
        self.register_buffer("beta", None, persistent=False)
        self.register_buffer("head", None, persistent=False)  # long [H]
        self.register_buffer("head_mask", None, persistent=False)
        self.register_buffer("prototypes", None, persistent=False)  # [H, d]
        self.register_buffer("head_weight", None, persistent=False)
        self.register_buffer("head_bias", None, persistent=False)
        self.head_cosine_scale: float | None = None

    @classmethod
    def from_config(cls, cfg, generator_module=None) -> "STGAugmenterModule":
        return cls(
            generator_module, lam=cfg.lam, t=cfg.t, mu_scale=cfg.mu_scale, token=cfg.token, targets=cfg.targets,
            rows=cfg.rows, clamp=cfg.clamp, mode=cfg.mode,
        )

    def train(self, mode: bool = True):
        super().train(mode)
        self.generator_module.eval()  # frozen: BatchNorm keeps its running statistics
        return self

    def fit(self, ctx: AugmentContext) -> None:
        gen = self.generator_module
        if ctx.num_classes != gen.num_classes or ctx.dim != gen.dim:
            raise ConfigError(
                f"the generator was trained for {gen.num_classes} classes of {gen.dim}-d features but "
                f"stage 3 has {ctx.num_classes} classes of {ctx.dim}-d features; retrain stage 2"
            )
        if not ctx.head_classes:
            raise ConfigError(
                "no head class: STG needs at least one head class to borrow a token from; "
                "lower stg.head.threshold or use stg.head.rule = top_k"
            )
        trained = gen.trained_tokens
        if bool(trained.any()):
            untrained = [c for c in ctx.head_classes if not bool(trained[c])]
            if untrained:
                raise ConfigError(
                    f"head classes {untrained} have no trained generator token; use the same "
                    "stg.head settings in stages 2 and 3"
                )
        super().fit(ctx)
        device = ctx.features.device
        self.beta = class_betas(ctx.class_counts).to(device)
        self.head = torch.tensor(ctx.head_classes, dtype=torch.long, device=device)
        self.head_mask = ctx.head_mask
        self.prototypes = ctx.class_means(ctx.head_classes)
        if self.clamp:
            self.low, self.high = ctx.feature_range()
        if self.token == "classifier":
            if ctx.classifier_weight is None:
                raise ConfigError(
                    "retrain.augmenter.token = classifier needs the stage-1 classifier weights; "
                    "pass them to stage 3 or use token: prototype"
                )
            self.head_weight = ctx.classifier_weight[self.head].float()
            self.head_bias = None if ctx.classifier_bias is None else ctx.classifier_bias[self.head].float()
            self.head_cosine_scale = ctx.classifier_cosine_scale

    def token_classes(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The class token each row uses: own class for head rows, borrowed for the rest."""
        borrowed = choose_tokens(
            features,
            self.head,
            mode=self.token,
            prototypes=self.prototypes,
            classifier_weight=self.head_weight,
            classifier_bias=self.head_bias,
            classifier_cosine_scale=self.head_cosine_scale,
        )
        return torch.where(self.head_mask.to(labels.device)[labels], labels, borrowed)

    def transformation(self, features: torch.Tensor, labels: torch.Tensor):
        """(mu, diagonal Sigma, U [B, d, r]) the frozen generator predicts for these rows;
        the covariance is diag(Sigma) + U U^T (r = 0 unless stage 2 had ``stg.rank``)."""
        tokens = self.token_classes(features, labels)
        with torch.no_grad():
            mu, log_var = self.generator_module(features, tokens)
            factor = self.generator_module.factor(features, tokens)
        return mu, torch.exp(log_var.clamp(-60.0, 60.0)), factor

    def augmented_rows(self, labels: torch.Tensor, generator=None) -> torch.Tensor:
        """Bool [B]: the target rows, each kept with probability ``rows`` (no draw at 1)."""
        rows = self.target_rows(labels)
        if self.rows < 1:
            rows = rows & (torch.rand(labels.shape, generator=generator, device=labels.device) < self.rows)
        return rows

    def forward(self, features, labels, *, generator=None):
        rows = self.augmented_rows(labels, generator)
        if self.mode == "implicit":  # the loss carries the augmentation of these rows (adjust_loss_inputs)
            self.implicit_rows = rows
            return features, labels
        if not bool(rows.any()):
            return features, labels
        a, y = features[rows], labels[rows]
        mu, sigma, factor = self.transformation(a, y)
        eps = torch.randn(a.shape, generator=generator, device=a.device, dtype=a.dtype)
        noise = sigma.sqrt().to(a.dtype) * eps
        if factor.shape[2]:
            shared = torch.randn(a.shape[0], factor.shape[2], 1, generator=generator, device=a.device, dtype=a.dtype)
            noise = noise + (factor.to(a.dtype) @ shared).squeeze(2)
        scale = (self.lam * self.beta.to(a.device)[y])[:, None].to(a.dtype)
        augmented = a + (noise + self.mu_scale * mu.to(a.dtype)) * scale
        if self.clamp:
            augmented = torch.maximum(torch.minimum(augmented, self.high.to(a.dtype)), self.low.to(a.dtype))
        u = torch.rand(a.shape, generator=generator, device=a.device)
        mixed = torch.where(u < self.t, augmented, a)
        out = features.clone()
        out[rows] = mixed
        return out, labels

    def adjust_loss_inputs(self, inputs: LossInputs, head) -> LossInputs:
        if self.mode != "implicit":
            return inputs
        form = linear_form(head)
        if form.normalised:
            raise ConfigError("STG's implicit mode needs a linear classifier (crt, lws), not a cosine one; "
                              "use mode: sample")
        a, y = inputs.features.detach().float(), inputs.targets.long()
        mu, sigma, factor = self.transformation(a, y)
        s = (self.lam * self.beta.to(a.device)[y])[:, None]
        m = self.mu_scale * mu.float() * s
        shift = self.t * m
        u = factor.float() * s[:, :, None]
        # each coordinate moves with probability t, so the low-rank part keeps t^2 of its
        # covariance (the factor t u below) and its diagonal t: the diagonal gets t - t^2 more
        var = self.t * sigma.float() * s**2 + (self.t - self.t**2) * u.square().sum(2) \
            + self.t * (1 - self.t) * m**2
        term = implicit_term(form.weight.float(), y, shift, var, self.t * u)
        term = term * self.implicit_rows[:, None]  # the rows forward() chose for this batch
        return dataclasses.replace(inputs, logits=inputs.logits + term)

    def extra_repr(self) -> str:
        return (
            f"lam={self.lam}, t={self.t}, mu_scale={self.mu_scale}, token={self.token!r}, "
            f"targets={self.targets!r}, rows={self.rows}, clamp={self.clamp}, mode={self.mode!r}"
        )


def implicit_term(weight: torch.Tensor, labels: torch.Tensor, shift: torch.Tensor, var: torch.Tensor,
                  factor: torch.Tensor | None = None) -> torch.Tensor:
    """[B, C]: (w_j - w_y)^T shift_i + 1/2 (w_j - w_y)^T Sigma_i (w_j - w_y) for row i (label y)
    and class j, zero at j = y, with Sigma_i = diag(var_i) + F_i F_i^T (``factor`` F [B, d, r],
    optional): what a Gaussian feature with mean a_i + shift_i and covariance Sigma_i adds to
    the logit z_j - z_y in ISDA's bound. Expanded into products of [B, d] and [C, d]; the
    low-rank part is [B, C, r] (no [B, C, d] tensor)."""
    w_y = weight[labels]
    linear = shift @ weight.T - (shift * w_y).sum(1, keepdim=True)
    quadratic = var @ (weight**2).T - 2 * (var * w_y) @ weight.T + (var * w_y**2).sum(1, keepdim=True)
    if factor is not None and factor.shape[2]:
        projected = torch.einsum("bdr,cd->bcr", factor, weight)  # F_i^T w_j
        own = projected.gather(1, labels[:, None, None].expand(-1, 1, factor.shape[2]))
        quadratic = quadratic + (projected - own).square().sum(2)
    return (linear + 0.5 * quadratic).masked_fill(F.one_hot(labels, weight.shape[0]).bool(), 0.0)


def transformation_kl_matrix(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Pairwise KL(N_i || N_j) [n, n] between diagonal Gaussians (the paper's Table 5 analysis)."""
    return gaussian_kl(mu[:, None, :], sigma[:, None, :], mu[None, :, :], sigma[None, :, :])


__all__ = [
    "head_classes",
    "class_betas",
    "gaussian_kl",
    "generator_loss",
    "neighbour_nll",
    "TargetEstimator",
    "SemanticTransformationGenerator",
    "choose_tokens",
    "STGAugmenterModule",
    "implicit_term",
    "transformation_kl_matrix",
]
