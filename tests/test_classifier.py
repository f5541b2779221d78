"""Stage 3 on cached features: cRT, LWS, tau-norm, NCM, and cRT + STG."""

import logging

import pytest
import torch

from tailaug.augment.base import AugmentContext, FeatureAugmenter, build_augmenter
from tailaug.augment.stg import head_classes
from tailaug.data.profiles import exponential_counts
from tailaug.augment.noise import NoiseAugmenter
from tailaug.augment.stg import STGAugmenter
from tailaug.config import RetrainConfig, STGConfig, load_config
from tailaug.errors import ConfigError, DataError
from tailaug.classifiers.tau_norm import TAU_GRID
from tailaug.stages.classifier import accuracy, retrain_classifier
from tailaug.stages.generator import train_generator


pytestmark = pytest.mark.usefixtures("one_thread")


def long_tailed_problem(seed=0, d=32, n_nuisance=24, nuisance_std=2.0, noise_std=0.3, sep=0.8, n_test=100):
    """10 Gaussian classes, counts 500..5 (exponential profile, IF 100), balanced test set.

    Every class shares one within-class covariance: large variance (nuisance_std^2) on the
    first ``n_nuisance`` coordinates, the "semantic transformations", and small variance on
    the rest. Class means differ only on the rest. Head classes reveal the large nuisance
    variance; five tail samples do not, so a classifier trained on them latches on to
    their chance positions along the nuisance coordinates. The structure is axis-aligned
    because the generator models a diagonal covariance.
    """
    g = torch.Generator().manual_seed(seed)
    num_classes = 10
    counts = exponential_counts(500, num_classes, 100)
    means = torch.zeros(num_classes, d)
    means[:, n_nuisance:] = torch.randn(num_classes, d - n_nuisance, generator=g) * sep
    std = torch.full((d,), noise_std)
    std[:n_nuisance] = nuisance_std

    def draw(n, c):
        return means[c] + torch.randn(n, d, generator=g) * std

    x_train = torch.cat([draw(n, c) for c, n in enumerate(counts)])
    y_train = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    x_test = torch.cat([draw(n_test, c) for c in range(num_classes)])
    y_test = torch.arange(num_classes).repeat_interleave(n_test)
    return x_train, y_train, x_test, y_test, counts


def group_accuracy(model, x, y, classes):
    rows = torch.isin(y, torch.tensor(classes))
    return accuracy(model, x[rows], y[rows])


def test_stg_beats_crt_on_tail_classes_of_a_synthetic_long_tailed_problem():
    x, y, x_test, y_test, counts = long_tailed_problem()
    heads = head_classes(counts)  # many-shot: 500, 299, 179, 107
    tail = [c for c in range(10) if c not in heads]
    assert heads == [0, 1, 2, 3]

    generator, losses = train_generator(x, y, None, counts, STGConfig(epochs=10), seed=0, progress=False)
    assert losses[-1] < 0.2 * losses[0]
    cfg = RetrainConfig(method="crt", epochs=30, lr=1e-2)
    crt = retrain_classifier(x, y, counts, cfg, num_classes=10, seed=0, progress=False)

    results = {}
    for mu_scale in (1.0, 0.0):  # the paper's Eq. 3, and its variance term alone
        aug = build_augmenter(STGAugmenter(name="stg", mu_scale=mu_scale), generator)
        aug.fit(AugmentContext(features=x, labels=y, class_counts=counts, head_classes=heads))
        # the variance learnt on head classes transfers to the tail samples
        with torch.no_grad():
            _, sigma, _ = aug.transformation(x[y >= 4], y[y >= 4])
        assert sigma[:, :24].mean() == pytest.approx(4.0, rel=0.15)
        assert sigma[:, 24:].mean() == pytest.approx(0.09, rel=0.3)
        model = retrain_classifier(x, y, counts, cfg, num_classes=10, seed=0, augmenter=aug, progress=False)
        results[mu_scale] = model

    crt_tail, crt_head = group_accuracy(crt, x_test, y_test, tail), group_accuracy(crt, x_test, y_test, heads)
    for mu_scale, model in results.items():
        tail_acc = group_accuracy(model, x_test, y_test, tail)
        head_acc = group_accuracy(model, x_test, y_test, heads)
        # measured (seed 0): tail cRT 0.82, STG 0.99 (mu_scale 1), 0.92 (mu_scale 0); head 0.985-0.995
        assert tail_acc > crt_tail + 0.08, (mu_scale, tail_acc, crt_tail)
        assert head_acc > crt_head - 0.03, (mu_scale, head_acc, crt_head)


# --------------------------------------------------------------------------- decoupled classifiers


def clusters(seed=0, d=8, counts=(200, 100, 50, 20, 10), spread=0.3, n_val=30):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(counts), d, generator=g) * 3

    def draw(n, c):
        return centres[c] + torch.randn(n, d, generator=g) * spread

    x = torch.cat([draw(n, c) for c, n in enumerate(counts)])
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    xv = torch.cat([draw(n_val, c) for c in range(len(counts))])
    yv = torch.arange(len(counts)).repeat_interleave(n_val)
    return x, y, xv, yv, list(counts), centres


def biased_stage1(centres, counts):
    """A stage-1-like classifier whose weight norms grow with the class size."""
    n = torch.tensor(counts, dtype=torch.float32)
    return centres * (n / n.max()).sqrt()[:, None] * 2.0, torch.zeros(len(counts))


def test_ncm_is_perfect_on_separable_clusters():
    x, y, xv, yv, counts, _ = clusters(0)
    model = retrain_classifier(x, y, counts, RetrainConfig(method="ncm"), num_classes=5, seed=0, progress=False)
    logits = model(xv)
    assert logits.shape == (len(yv), 5)
    assert float(logits.abs().max()) <= 1.0 + 1e-5  # cosine similarities
    assert accuracy(model, xv, yv) == 1.0


def test_tau_norm_weight_norms():
    x, y, xv, yv, counts, centres = clusters(1)
    weight, bias = biased_stage1(centres, counts)
    norms = weight.norm(dim=1)

    def fit(tau, **kw):
        return retrain_classifier(
            x, y, counts, RetrainConfig(method="tau_norm", tau=tau), num_classes=5, seed=0,
            init_weight=weight, init_bias=bias, progress=False, **kw,
        )

    assert torch.allclose(fit(0.0).weight, weight)  # tau = 0: unchanged
    assert torch.allclose(fit(1.0).weight.norm(dim=1), torch.ones(5), atol=1e-6)  # tau = 1: all equal
    half = fit(0.5).weight.norm(dim=1)
    assert torch.allclose(half, norms.sqrt(), atol=1e-5)
    assert torch.equal(half.argsort(), norms.argsort())  # head/tail ordering kept for tau < 1
    assert fit(0.5).bias is None  # the stage-1 bias is dropped (Kang et al.)
    with pytest.raises(ConfigError, match="init_weight"):
        retrain_classifier(x, y, counts, RetrainConfig(method="tau_norm"), num_classes=5, seed=0, progress=False)


def test_tau_is_chosen_on_the_validation_split(caplog):
    counts = [400, 20]
    # class 0 near (1, 0), class 1 near (0, 1); the stage-1 head weight is 3x longer, so the
    # boundary 3^(1 - tau) x_0 = x_1 is balanced only at tau = 1
    weight = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([[1.0, 0.0]] * 400 + [[0.0, 1.0]] * 20)
    y = torch.tensor([0] * 400 + [1] * 20)
    s = 0.01 + 0.02 * torch.arange(50)
    xv = torch.stack([1 - s, s], dim=1)  # validation points along the segment between the classes
    yv = (s > 0.5).long()
    cfg = RetrainConfig(method="tau_norm")
    model = retrain_classifier(x, y, counts, cfg, num_classes=2, seed=0, init_weight=weight, val=(xv, yv), progress=False)
    assert set(model.tau_scores) == set(TAU_GRID)
    assert model.tau == pytest.approx(1.0)
    assert accuracy(model, xv, yv) == max(model.tau_scores.values()) == 1.0
    assert model.tau_scores[0.0] < 0.8 and model.tau_scores[2.0] < 0.8
    with caplog.at_level(logging.WARNING, logger="tailaug.classifiers.tau_norm"):
        fallback = retrain_classifier(x, y, counts, cfg, num_classes=2, seed=0, init_weight=weight, progress=False)
    assert fallback.tau == 1.0 and "no validation split" in caplog.text


def test_lws_keeps_directions_and_rebalances_scales():
    x, y, xv, yv, counts, centres = clusters(2)
    weight, bias = biased_stage1(centres, counts)
    cfg = RetrainConfig(method="lws", epochs=10, lr=1e-2)
    model = retrain_classifier(
        x, y, counts, cfg, num_classes=5, seed=0, init_weight=weight, init_bias=bias, progress=False
    )
    assert torch.equal(model.weight, weight)  # stage-1 weights frozen
    eff = model.effective_weight
    cos = torch.nn.functional.cosine_similarity(eff, weight, dim=1)
    assert torch.allclose(cos, torch.ones(5), atol=1e-6)  # one scale per class: directions kept
    scales = model.scales.detach()
    assert bool((scales > 0).all())
    assert scales[3:].mean() > scales[:2].mean()  # class-balanced training lifts the tail classes
    assert accuracy(model, xv, yv) >= 0.95
    with pytest.raises(ConfigError, match="init_weight"):
        retrain_classifier(x, y, counts, cfg, num_classes=5, seed=0, progress=False)


def test_lws_on_a_cosine_head_scales_the_heads_own_logits():
    from tailaug.models.heads import CosineHead

    x, y, xv, yv, counts, centres = clusters(2)
    weight, _ = biased_stage1(centres, counts)
    head = CosineHead(8, 5, scale=16.0)
    with torch.no_grad():
        head.weight.copy_(weight)
    cfg = RetrainConfig(method="lws", epochs=10, lr=1e-2)
    model = retrain_classifier(x, y, counts, cfg, num_classes=5, seed=0, init_weight=head.weight.detach(),
                               init_cosine_scale=16.0, progress=False)
    scales = model.scales.detach()
    assert not torch.allclose(scales, torch.ones(5), atol=1e-3)  # it trained
    with torch.no_grad():
        assert torch.allclose(model(xv), scales * head(xv), atol=1e-5)  # f_c * 16 * cos(w_c, a)
    assert accuracy(model, xv, yv) >= 0.95
    with pytest.raises(DataError, match="cosine stage-1 head has no bias"):
        retrain_classifier(x, y, counts, cfg, num_classes=5, seed=0, init_weight=weight, init_bias=torch.zeros(5),
                           init_cosine_scale=16.0, progress=False)


def test_tau_norm_of_a_cosine_head_is_refused():
    x, y, _, _, counts, centres = clusters(1)
    with pytest.raises(ConfigError, match="cosine head .* every tau gives back the stage-1 model"):
        retrain_classifier(x, y, counts, RetrainConfig(method="tau_norm", tau=1.0), num_classes=5, seed=0,
                           init_weight=centres, init_cosine_scale=16.0, progress=False)
    with pytest.raises(ConfigError, match="tau_norm .*model.head: cosine"):
        load_config(None, ["model.head=cosine", "retrain.method=tau_norm"])
    assert load_config(None, ["model.head=cosine", "retrain.method=lws"]).retrain.method == "lws"


def test_crt_is_deterministic_and_learns():
    x, y, xv, yv, counts, _ = clusters(3)
    cfg = RetrainConfig(method="crt", epochs=20, lr=1e-2, augmenter=NoiseAugmenter(name="noise", std=0.5))

    def run(seed):
        aug = build_augmenter(cfg.augmenter)
        return retrain_classifier(
            x, y, counts, cfg, num_classes=5, seed=seed, augmenter=aug, val=(xv, yv), progress=False
        )

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)
    assert [h["epoch"] for h in a.history] == list(range(20))
    assert a.history[-1]["val_acc"] == accuracy(a, xv, yv) >= 0.95
    assert not a.training


class _AppendRows(FeatureAugmenter):
    """A test augmenter using every hook: counts epochs, appends two rows to each batch."""

    def __init__(self):
        super().__init__("all")
        self.epochs, self.calls = [], 0

    def set_epoch(self, epoch, total_epochs):
        self.epochs.append((epoch, total_epochs))

    def forward(self, features, labels, *, generator=None):
        self.calls += 1
        return torch.cat([features, features[:2]]), torch.cat([labels, labels[:2]])


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_crt_trains_in_the_run_precision_and_evaluates_in_float32(dtype):
    from test_stg import linear_output_dtypes

    x, y, xv, yv, counts, _ = clusters(3)
    cfg = RetrainConfig(method="crt", epochs=10, lr=1e-2)
    seen, model = linear_output_dtypes(lambda: retrain_classifier(
        x, y, counts, cfg, num_classes=5, seed=0, val=(xv, yv), progress=False, device="cpu", dtype=dtype))
    assert seen == {dtype or torch.float32, torch.float32}  # training under autocast, validation in float32
    assert model.weight.dtype == torch.float32 and model(xv).dtype == torch.float32
    assert model.history[-1]["val_acc"] >= 0.95


def test_stage3_drives_all_augmenter_hooks():
    x, y, _, _, counts, _ = clusters(4)
    aug = _AppendRows()
    cfg = RetrainConfig(method="crt", epochs=2, batch_size=64)
    retrain_classifier(x, y, counts, cfg, num_classes=5, seed=0, augmenter=aug, progress=False)
    assert aug.fitted and aug.epochs == [(0, 2), (1, 2)]
    n_batches = -(-len(y) // 64)  # an epoch is N samples
    assert aug.calls == 2 * n_batches


def test_a_non_finite_stage3_loss_is_a_clear_error():
    from tailaug.augment.noise import GaussianNoiseAugmenter
    from tailaug.errors import TailaugError

    x = torch.randn(40, 4)
    y = torch.arange(40) % 2
    with pytest.raises(TailaugError, match="stage-3 loss became"):
        retrain_classifier(x, y, [20, 20], RetrainConfig(epochs=1), num_classes=2, seed=0, progress=False,
                           augmenter=GaussianNoiseAugmenter(std=float("inf"), targets="all"), head_classes=[0])


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_stage3_learning_rate_schedule(monkeypatch, schedule):
    import math

    seen = []
    step = torch.optim.Adam.step

    def record(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", record)
    x, y, _, _, counts, _ = clusters(4)
    cfg = RetrainConfig(method="crt", epochs=3, batch_size=64, lr=0.01, schedule=schedule)
    retrain_classifier(x, y, counts, cfg, num_classes=5, seed=0, progress=False)
    total = 3 * -(-len(y) // 64)
    assert len(seen) == total
    want = [0.01 * (0.5 * (1 + math.cos(math.pi * t / total)) if schedule == "cosine" else 1.0) for t in range(total)]
    assert seen == pytest.approx(want, rel=1e-12)


def test_stage3_schedule_is_in_the_retrain_key_only_when_not_constant():
    from tailaug.stages.keys import retrain_fields

    cfg = load_config(None)
    assert "schedule" not in retrain_fields(cfg, cfg.retrain)
    cosine = cfg.retrain.model_copy(update={"schedule": "cosine"})
    assert retrain_fields(cfg, cosine)["schedule"] == "cosine"
    with pytest.raises(ConfigError, match="schedule"):
        load_config(None, ["retrain.schedule=linear"])
