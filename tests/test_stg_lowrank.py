"""The low-rank STG (issue #11, direction 5): ``stg.rank`` r adds a per-sample factor U [d, r]
to the generator's diagonal covariance, trained by the neighbours' likelihood (``stg.loss:
nll``) and used by the stage-3 augmenter in both modes."""

import pytest
import torch
from torch.distributions import LowRankMultivariateNormal

from tailaug.augment.stg import SemanticTransformationGenerator, implicit_term, neighbour_nll
from tailaug.config import STGConfig
from tailaug.errors import ConfigError
from tailaug.losses.base import LossInputs
from tailaug.stages.generator import load_generator, save_generator, train_generator
from test_stg import FixedGenerator, _stg
from test_stg_variants import _linear

T = torch.tensor
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("rank", [0, 2])
def test_neighbour_nll_is_the_mean_log_likelihood_of_the_neighbours(rank):
    g = torch.Generator().manual_seed(0)
    b, p, d = 4, 7, 5
    anchors, pool = torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(p, d, generator=g, dtype=torch.float64)
    mu, log_var = torch.randn(b, d, generator=g, dtype=torch.float64), 0.3 * torch.randn(b, d, generator=g, dtype=torch.float64)
    factor = torch.randn(b, d, rank, generator=g, dtype=torch.float64)
    same = torch.rand(b, p, generator=g) < 0.6
    same[:, 0] = True
    got = neighbour_nll(mu, log_var, factor, anchors, pool, same)
    want = []
    for i in range(b):
        cov_factor = factor[i] if rank else torch.zeros(d, 1, dtype=torch.float64)
        dist = LowRankMultivariateNormal(anchors[i] + mu[i], cov_factor, log_var[i].exp())
        constant = 0.5 * d * torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64))
        want.append(-(dist.log_prob(pool[same[i]]) + constant).mean() / d)
    assert float(got) == pytest.approx(float(torch.stack(want).mean()), rel=1e-9)


def test_implicit_term_with_a_factor_against_the_full_quadratic_form():
    g = torch.Generator().manual_seed(1)
    w, shift, var = torch.randn(5, 4, generator=g), torch.randn(3, 4, generator=g), torch.rand(3, 4, generator=g)
    factor = torch.randn(3, 4, 2, generator=g)
    y = T([0, 3, 2])
    term = implicit_term(w, y, shift, var, factor)
    for i in range(3):
        cov = torch.diag(var[i]) + factor[i] @ factor[i].T
        for j in range(5):
            d = w[j] - w[y[i]]
            want = 0.0 if j == y[i] else float(d @ shift[i] + 0.5 * d @ cov @ d)
            assert float(term[i, j]) == pytest.approx(want, abs=1e-5)


def test_the_drawn_augmentation_has_the_low_rank_covariance_the_implicit_mode_assumes():
    """Sample mode with a factor: the deltas' covariance is t^2 s^2 U U^T off the diagonal;
    the implicit mode's term (w = I) carries the same moments."""
    mu, var, u = [0.5, -1.0, 0.0], [0.2, 0.1, 0.3], [[1.0], [1.0], [-0.5]]
    stub = FixedGenerator(mu, var, 3, factor=u)
    counts, heads = [400, 100, 25], [0]
    n, t, lam = 200_000, 0.5, 1.0
    a, y = torch.zeros(n, 3), torch.full((n,), 2)
    sampled = _stg(stub, counts, heads, lam=lam, t=t)
    delta = sampled(a, y, generator=torch.Generator().manual_seed(0))[0] - a
    s = lam * 1.0  # beta of the smallest class is 1
    cov = torch.cov(delta.T)
    uu = T(u) @ T(u).T
    assert float(cov[0, 1]) == pytest.approx(t**2 * s**2 * float(uu[0, 1]), abs=0.01)
    assert float(cov[0, 2]) == pytest.approx(t**2 * s**2 * float(uu[0, 2]), abs=0.01)
    implicit = _stg(stub, counts, heads, lam=lam, t=t, mode="implicit")
    implicit(a[:1], y[:1])
    term = implicit.adjust_loss_inputs(LossInputs(torch.zeros(1, 3), y[:1], a[:1]), _linear(torch.eye(3)))
    mean = delta.mean(0)
    for j in (0, 1):  # (e_j - e_2)^T mean + 1/2 (e_j - e_2)^T cov (e_j - e_2)
        want = mean[j] - mean[2] + 0.5 * (cov[j, j] + cov[2, 2] - 2 * cov[j, 2])
        assert float(term.logits[0, j].detach()) == pytest.approx(float(want), abs=0.03)


def _oblique_classes(n_per_class=300, classes=3, d=6, seed=0):
    """Every class spreads along the same oblique direction (std 2) plus a little isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.ones(d) / d**0.5
    centres = 6 * torch.randn(classes, d, generator=g)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    feats = centres[labels] + 2 * torch.randn(len(labels), 1, generator=g) * direction \
        + 0.2 * torch.randn(len(labels), d, generator=g)
    return feats, labels, direction


def test_a_rank_one_generator_learns_the_shared_oblique_direction():
    feats, labels, direction = _oblique_classes()
    counts = torch.bincount(labels).tolist()
    cfg = STGConfig(epochs=25, hidden_dims=[32], memory_size=300, loss="nll", rank=1, lr=3e-3)
    model, losses = train_generator(feats, labels, None, counts, cfg, seed=0, progress=False)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        factor = model.factor(feats[:50], labels[:50])[:, :, 0]
        _, log_var = model(feats[:50], labels[:50])
    cosine = (torch.nn.functional.normalize(factor, dim=1) @ direction).abs()
    assert float(cosine.mean()) > 0.95
    # the factor carries the spread (std 2) the diagonal cannot hold without inflating every axis
    assert float(factor.norm(dim=1).mean()) == pytest.approx(2.0, rel=0.25)
    assert float(log_var.exp().mean()) < 0.2


def test_rank_and_loss_round_trip_and_errors(tmp_path):
    model = SemanticTransformationGenerator(4, 3, [8], rank=2)
    x, y = torch.randn(5, 4), T([0, 1, 2, 0, 1])
    model.eval()
    path = save_generator(tmp_path / "g.safetensors", model)
    loaded, _ = load_generator(path)
    assert loaded.rank == 2 and loaded.factor(x, y).shape == (5, 4, 2)
    assert torch.equal(loaded.factor(x, y), model.factor(x, y))
    assert SemanticTransformationGenerator(4, 3, [8]).factor(x, y).shape == (5, 4, 0)
    with pytest.raises(ValueError, match="stg.rank 2 needs stg.loss: nll"):
        STGConfig(rank=2)
    with pytest.raises(ConfigError, match=r"stg.rank must lie in \[0, 4\]"):
        SemanticTransformationGenerator(4, 3, [8], rank=5)
