"""STG's stage-3 variants (issue #11): a share of the rows, clamping, the implicit (expected)
loss, and the stage-3 loss (``retrain.loss``)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tailaug.augment.stg import STGAugmenterModule, implicit_term
from tailaug.config import load_config
from tailaug.errors import ConfigError
from tailaug.losses.base import LossInputs
from tailaug.stages.classifier import retrain_classifier, stage3_loss
from tailaug.stages.keys import retrain_fields
from tailaug.stages.select import row_label
from test_stg import FixedGenerator, _stg

T = torch.tensor
pytestmark = pytest.mark.usefixtures("one_thread")


def test_implicit_term_against_a_loop_over_rows_and_classes():
    g = torch.Generator().manual_seed(0)
    w, shift, var = torch.randn(5, 4, generator=g), torch.randn(3, 4, generator=g), torch.rand(3, 4, generator=g)
    y = T([0, 3, 2])
    term = implicit_term(w, y, shift, var)
    for i in range(3):
        for j in range(5):
            d = w[j] - w[y[i]]
            want = 0.0 if j == y[i] else float(d @ shift[i] + 0.5 * (var[i] * d * d).sum())
            assert float(term[i, j]) == pytest.approx(want, abs=1e-5)


def test_implicit_term_is_the_log_of_the_expected_exponential_logit_gap():
    """exp(term_ij) = E[exp((w_j - w_y)^T delta)] for delta ~ N(shift, diag(var)): the
    moment-generating function of the Gaussian, checked by Monte Carlo."""
    g = torch.Generator().manual_seed(1)
    w = 0.5 * torch.randn(3, 4, generator=g)
    shift, var = T([[0.3, -0.2, 0.1, 0.0]]), T([[0.5, 0.2, 1.0, 0.3]])
    delta = shift + var.sqrt() * torch.randn(400_000, 4, generator=g)
    y = T([1])
    gap = (delta @ (w - w[1]).T).double()  # [draws, C]
    estimate = gap.exp().mean(0).log()
    assert torch.allclose(implicit_term(w, y, shift, var)[0].double(), estimate, atol=0.01)


def _linear(weight):
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.zero_()
    return head


def test_implicit_mode_matches_the_moments_of_the_drawn_augmentation():
    """The implicit mode's mean shift and variance are those of mode=sample's augmented
    coordinates (mean term, noise and the replacement of a share t of the coordinates)."""
    mu, var = [1.0, -2.0, 0.5], [4.0, 0.25, 1.0]
    stub = FixedGenerator(mu, var, 3)
    counts, heads = [400, 100, 25], [0]
    n = 100_000
    a = torch.zeros(n, 3)
    y = torch.full((n,), 1)
    sampled = _stg(stub, counts, heads, lam=1.5, t=0.5, mu_scale=0.5)
    delta = sampled(a, y, generator=torch.Generator().manual_seed(0))[0] - a
    implicit = _stg(stub, counts, heads, lam=1.5, t=0.5, mu_scale=0.5, mode="implicit")
    w = torch.eye(3)  # class j's logit reads coordinate j: the term holds the moments per coordinate
    out, _ = implicit(a[:1], y[:1], generator=torch.Generator())
    assert torch.equal(out, a[:1])  # nothing is drawn
    logits = torch.zeros(1, 3)
    term = implicit.adjust_loss_inputs(LossInputs(logits, y[:1], a[:1]), _linear(w)).logits[0].detach()
    mean, variance = delta.mean(0), delta.var(0)
    # w = I, y = 1: term_j = mean_j - mean_1 + (var_j + var_1) / 2 for j != 1
    for j in (0, 2):
        want = mean[j] - mean[1] + 0.5 * (variance[j] + variance[1])
        assert float(term[j]) == pytest.approx(float(want), abs=0.05)
    assert float(term[1]) == 0.0


def test_implicit_mode_leaves_head_rows_and_unchosen_rows_alone():
    stub = FixedGenerator([1.0, 1.0], [1.0, 1.0], 3)
    aug = _stg(stub, [400, 100, 25], [0], mode="implicit", rows=0.5)
    y = T([0, 0, 2, 2, 2, 2, 2, 2, 2, 2] * 20)
    a = torch.randn(len(y), 2)
    aug(a, y, generator=torch.Generator().manual_seed(0))
    logits = torch.zeros(len(y), 3)
    shifted = aug.adjust_loss_inputs(LossInputs(logits, y, a), _linear(torch.randn(3, 2))).logits.detach()
    changed = (shifted != logits).any(1)
    assert not bool(changed[y == 0].any())
    assert torch.equal(changed, aug.implicit_rows)
    assert 0.35 < float(changed[y == 2].float().mean()) < 0.65


def test_a_share_of_the_tail_rows_is_augmented_and_the_rest_stay_clean():
    stub = FixedGenerator([0.5, 0.5], [1.0, 1.0], 3)
    y = torch.cat([torch.zeros(200, dtype=torch.long), torch.full((2000,), 2)])
    a = torch.randn(len(y), 2)
    for rows, share in ((0.25, 0.25), (1.0, 1.0)):
        out, _ = _stg(stub, [400, 100, 25], [0], rows=rows, t=1.0)(a, y, generator=torch.Generator().manual_seed(0))
        changed = (out != a).all(1)  # t = 1: an augmented row changes in every coordinate
        assert not bool((out[:200] != a[:200]).any())  # head rows never
        assert abs(float(changed[200:].float().mean()) - share) < 0.03
        assert torch.equal((out[200:] != a[200:]).any(1), changed[200:])  # the others are untouched


def test_clamp_keeps_augmented_features_in_the_training_range():
    stub = FixedGenerator([3.0, -3.0], [4.0, 4.0], 3)
    counts = [400, 100, 25]
    feats = torch.rand(sum(counts), 2)  # in [0, 1), like features after a ReLU
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    a, y = torch.rand(500, 2), torch.full((500,), 2)
    loose = _stg(stub, counts, [0], feats, labels, lam=1.5, t=1.0)
    tight = _stg(stub, counts, [0], feats, labels, lam=1.5, t=1.0, clamp=True)
    out = loose(a, y, generator=torch.Generator().manual_seed(0))[0]
    assert float(out.min()) < 0 and float(out.max()) > 1
    out = tight(a, y, generator=torch.Generator().manual_seed(0))[0]
    assert torch.all(out >= feats.amin(0)) and torch.all(out <= feats.amax(0))


@pytest.mark.parametrize("kw, message", [
    ({"rows": 0.0}, "rows (the share of target rows augmented) must lie in (0, 1]"),
    ({"mode": "exact"}, "unknown STG mode 'exact'"),
    ({"mode": "implicit", "clamp": True}, "the implicit mode draws none"),
])
def test_impossible_variant_options_are_named(kw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        STGAugmenterModule(FixedGenerator([0.0], [1.0], 2), **kw)


def test_implicit_mode_refuses_a_cosine_classifier():
    from tailaug.models.heads import build_head

    aug = _stg(FixedGenerator([0.0, 0.0], [1.0, 1.0], 3), [400, 100, 25], [0], mode="implicit")
    y, a = T([2]), torch.randn(1, 2)
    aug(a, y)
    with pytest.raises(ConfigError, match="needs a linear classifier"):
        aug.adjust_loss_inputs(LossInputs(torch.zeros(1, 3), y, a), build_head("cosine", 2, 3))


# --------------------------------------------------------------------------- retrain.loss


def test_stage3_balanced_softmax_is_cross_entropy_on_logits_plus_the_log_prior():
    cfg = load_config(None, ["retrain.loss=[{name: balanced_softmax}]"]).retrain
    counts = T([90, 9, 1])
    loss_fn = stage3_loss(cfg, counts, "cpu")
    logits, y = T([[1.0, 0.5, -1.0], [0.2, 0.1, 0.3]]), T([2, 0])
    want = F.cross_entropy(logits + torch.log(counts / 100.0), y)
    assert float(loss_fn(None, None, logits, y)) == pytest.approx(float(want), rel=1e-6)
    plain = load_config(None, []).retrain
    assert float(stage3_loss(plain, counts, "cpu")(None, None, logits, y)) == pytest.approx(
        float(F.cross_entropy(logits, y)), rel=1e-6)


def test_a_stage3_loss_that_needs_a_cosine_head_is_refused():
    cfg = load_config(None, ["retrain.loss=[{name: ldam}]"]).retrain
    with pytest.raises(ConfigError, match="retrain.loss: ldam needs a cosine head"):
        stage3_loss(cfg, T([10, 1]), "cpu")


def test_the_stage3_loss_enters_key_and_label_only_when_it_is_not_plain_cross_entropy():
    plain = load_config(None, ["retrain.augmenter={name: none}"])
    same = load_config(None, ["retrain.augmenter={name: none}", "retrain.loss=[{name: ce}]"])
    balanced = load_config(None, ["retrain.augmenter={name: none}", "retrain.loss=[{name: balanced_softmax}]"])
    assert "loss" not in retrain_fields(plain, plain.retrain)
    assert retrain_fields(same, same.retrain) == retrain_fields(plain, plain.retrain)
    assert retrain_fields(balanced, balanced.retrain)["loss"][0]["name"] == "balanced_softmax"
    assert row_label(plain.retrain) == "cRT"
    assert row_label(balanced.retrain) == "cRT, balanced softmax loss"
    implicit = load_config(None, ["retrain.augmenter={name: stg, lam: 1.0, mode: implicit, mu_scale: 0.5}"])
    assert row_label(implicit.retrain) == "cRT + STG (lambda 1.0, mu_scale 0.5, implicit)"


def test_balanced_softmax_stage3_with_instance_sampling_lifts_the_rare_class():
    """On two overlapping Gaussians, 20:1, the plain loss with instance sampling favours the
    head; balanced softmax (same sampler) recovers the rare class's recall."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(2000, 2, generator=g), torch.randn(100, 2, generator=g) + T([1.5, 1.5])])
    y = torch.cat([torch.zeros(2000, dtype=torch.long), torch.ones(100, dtype=torch.long)])
    test_x = torch.cat([torch.randn(500, 2, generator=g), torch.randn(500, 2, generator=g) + T([1.5, 1.5])])

    def rare_recall(loss):
        cfg = load_config(None, ["retrain.augmenter={name: none}", "retrain.sampler={kind: instance}",
                                 f"retrain.loss=[{{name: {loss}}}]", "retrain.epochs=20", "retrain.lr=0.05"]).retrain
        head = retrain_classifier(x, y, [2000, 100], cfg, num_classes=2, seed=0, progress=False)
        with torch.no_grad():
            return float((head(test_x[500:]).argmax(1) == 1).float().mean())

    plain, balanced = rare_recall("ce"), rare_recall("balanced_softmax")
    assert balanced > plain + 0.3, (plain, balanced)


def test_stage3_trains_with_the_implicit_term_and_is_repeatable():
    """cRT with implicit STG on a 3-class problem: same seed, same classifier; the term
    widens the tail class's region, so its recall is at least cRT's."""
    g = torch.Generator().manual_seed(0)
    centres = T([[0.0, 0.0], [3.0, 0.0], [1.5, 1.5]])
    counts = [600, 300, 15]
    x = torch.cat([torch.randn(n, 2, generator=g) + centres[c] for c, n in enumerate(counts)])
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    test_x = torch.randn(300, 2, generator=g) + centres[2]

    def fit(augmenter):
        cfg = load_config(None, ["retrain.epochs=3", "retrain.lr=0.05"]).retrain
        return retrain_classifier(x, y, counts, cfg, num_classes=3, seed=0, progress=False, augmenter=augmenter,
                                  head_classes=[0, 1])

    def implicit():
        return STGAugmenterModule(FixedGenerator([0.0, 0.0], [1.0, 1.0], 3), mode="implicit", lam=1.0)

    first, again, plain = fit(implicit()), fit(implicit()), fit(None)
    assert torch.equal(first.weight, again.weight)
    assert all(h["loss"] == h["loss"] and h["loss"] > 0 for h in first.history)
    with torch.no_grad():
        recall = [float((m(test_x).argmax(1) == 2).float().mean()) for m in (first, plain)]
    assert recall[0] >= recall[1] and recall[0] > 0.5, recall


def test_nearest_neighbour_targets_name_their_own_generator():
    from tailaug.stages.keys import generator_key

    keys = [generator_key(load_config(None, overrides)) for overrides in ([], ["stg.neighbours=0"], ["stg.neighbours=10"])]
    assert keys[0] == keys[1] != keys[2]
