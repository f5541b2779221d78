"""Losses: every term against a hand computation in plain Python ``math``."""

from __future__ import annotations

import math
import typing

import pytest
import torch
import torch.nn.functional as F

from tailaug.config import (
    TrainConfig,
    validate_config,
)
from tailaug.errors import ConfigError, DataError, TailaugError
from tailaug.losses import (
    LossFunction,
    LossInputs,
    adjust_logits,
    arcface_psi,
    build_loss,
    class_weights,
    label_aware_smoothing,
    ldam_margins,
    sphereface_psi,
    supcon_loss,
)
from tailaug.losses.ce import CELoss, CrossEntropyTerm, FocalLoss, FocalTerm
from tailaug.losses.ldam import LDAMLoss
from tailaug.losses.margins import ArcFaceLoss, CosFaceLoss, SphereFaceLoss
from tailaug.losses.prior import LogitAdjustLoss
from tailaug.losses.smoothing import LabelAwareSmoothingLoss
from tailaug.losses.supcon import SupConLoss
from tailaug.registry import LOSSES
from tailaug.losses.ldam import LDAMTerm
from tailaug.losses.margins import ArcFaceTerm, CosFaceTerm, SphereFaceTerm
from tailaug.losses.prior import BalancedSoftmaxTerm, LogitAdjustTerm
from tailaug.losses.smoothing import LabelAwareSmoothingTerm
from tailaug.losses.supcon import SupConTerm

COUNTS = (100, 10, 1)
LOGITS = [[1.0, 2.0, 0.5], [0.3, -1.0, 2.0], [0.0, 0.4, -0.7]]
TARGETS = [1, 2, 0]
COSINE = [[0.6, 0.2, -0.3], [0.1, -0.5, 0.8], [0.9, 0.0, -0.95]]


# --------------------------------------------------------------------------- plain-math helpers


def log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def ce(row, y):
    return -log_softmax(row)[y]


def wmean(losses, targets, w=None):
    if w is None:
        return sum(losses) / len(losses)
    return sum(w[y] * l for l, y in zip(losses, targets)) / sum(w[y] for y in targets)


def hand_weights_effective(counts, beta):
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    return [r * len(counts) / sum(raw) for r in raw]


def inputs(logits=LOGITS, targets=TARGETS, cosine=None, features=None, dtype=torch.float32):
    return LossInputs(
        logits=torch.tensor(logits, dtype=dtype),
        targets=torch.tensor(targets),
        cosine=None if cosine is None else torch.tensor(cosine, dtype=dtype),
        features=None if features is None else torch.tensor(features, dtype=dtype),
    )


def close(a, b, tol=1e-5):
    return abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b)))


# --------------------------------------------------------------------------- class weights


def test_effective_number_weights_by_hand():
    # beta 0.9, counts [100, 10, 1]: raw (1-b)/(1-b^n) = [0.1/(1-0.9^100), 0.1/(1-0.9^10), 1]
    raw = [0.1 / (1 - 0.9**100), 0.1 / (1 - 0.9**10), 1.0]
    expected = [r * 3 / sum(raw) for r in raw]
    got = class_weights("effective_number", COUNTS, beta=0.9)
    assert got.dtype == torch.float32 and got.shape == (3,)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)
    assert close(got.sum(), 3.0)
    assert expected[0] == pytest.approx(0.1000027 * 3 / sum(raw), rel=1e-5)


def test_inverse_frequency_and_none_weights():
    expected = [x * 3 / 1.11 for x in (0.01, 0.1, 1.0)]
    assert torch.allclose(class_weights("inverse_frequency", COUNTS, 0.9), torch.tensor(expected), atol=1e-6)
    assert torch.equal(class_weights("none", COUNTS, 0.9), torch.ones(3))
    # beta = 0 is uniform; beta -> 1 approaches inverse frequency
    assert torch.allclose(class_weights("effective_number", COUNTS, 0.0), torch.ones(3))
    assert torch.allclose(
        class_weights("effective_number", COUNTS, 1 - 1e-9), torch.tensor(expected), atol=1e-4
    )


def test_bad_class_counts_and_beta_are_explained():
    with pytest.raises(DataError, match=r"class\(es\) \[1\] have no training images"):
        class_weights("effective_number", [5, 0, 3], 0.9)
    with pytest.raises(ConfigError, match="beta"):
        class_weights("effective_number", COUNTS, 1.0)
    with pytest.raises(ConfigError, match="unknown reweight.scheme"):
        class_weights("bogus", COUNTS, 0.9)
    with pytest.raises(TailaugError, match="at least 2 classes"):
        class_weights("none", [4], 0.9)


# --------------------------------------------------------------------------- ce / focal


def test_cross_entropy_by_hand_plain_weighted_and_smoothed():
    x = inputs()
    per = [ce(r, y) for r, y in zip(LOGITS, TARGETS)]
    term = CrossEntropyTerm(CELoss(), COUNTS)
    assert close(term(x), sum(per) / 3)
    w = hand_weights_effective(COUNTS, 0.9)
    wt = torch.tensor(w)
    assert close(term(x, wt), wmean(per, TARGETS, w))
    assert close(term(x, wt), F.cross_entropy(x.logits, x.targets, weight=wt))
    # uniform smoothing eps/C over all classes
    eps = 0.2
    smooth = [(1 - eps) * ce(r, y) - eps / 3 * sum(log_softmax(r)) for r, y in zip(LOGITS, TARGETS)]
    term_s = CrossEntropyTerm(CELoss(label_smoothing=eps), COUNTS)
    assert close(term_s(x), sum(smooth) / 3)
    assert close(term_s(x), F.cross_entropy(x.logits, x.targets, label_smoothing=eps))
    assert close(term_s(x, wt), wmean(smooth, TARGETS, w))


def test_focal_by_hand():
    x = inputs()
    gamma = 2.0
    per = []
    for r, y in zip(LOGITS, TARGETS):
        p = math.exp(log_softmax(r)[y])
        per.append(-((1 - p) ** gamma) * math.log(p))
    term = FocalTerm(FocalLoss(name="focal", gamma=gamma), COUNTS)
    assert close(term(x), sum(per) / 3)
    w = [0.5, 1.0, 1.5]
    assert close(term(x, torch.tensor(w)), wmean(per, TARGETS, w))
    # gamma 0 is cross-entropy
    ce_value = CrossEntropyTerm(CELoss(), COUNTS)(x)
    assert close(FocalTerm(FocalLoss(name="focal", gamma=0.0), COUNTS)(x), ce_value)


def test_focal_gradient_gradcheck_and_saturation():
    term = FocalTerm(FocalLoss(name="focal", gamma=2.0), COUNTS)
    term_half = FocalTerm(FocalLoss(name="focal", gamma=0.5), COUNTS)
    targets = torch.tensor(TARGETS)
    w = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
    logits = torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True)
    for t in (term, term_half):
        assert torch.autograd.gradcheck(lambda z: t(LossInputs(z, targets), w), (logits,))
    # p_t rounding to 1 with gamma < 1: gradient stays finite
    z = torch.tensor([[60.0, 0.0, 0.0], [0.0, 80.0, 0.0]], requires_grad=True)
    loss = term_half(LossInputs(z, torch.tensor([0, 1])))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


# --------------------------------------------------------------------------- LDAM


def test_ldam_margins_formula():
    m = ldam_margins(COUNTS, max_margin=0.5)
    assert close(m.max(), 0.5) and int(m.argmax()) == 2
    expected = [0.5 * (1 / n) ** 0.25 / (1 / 1) ** 0.25 for n in COUNTS]
    assert torch.allclose(m, torch.tensor(expected), atol=1e-7)
    # ratio between classes is (n_b / n_a)^(1/4)
    assert close(m[0] / m[1], (10 / 100) ** 0.25)
    assert close(ldam_margins([16, 1], 0.3)[0], 0.15)


def test_ldam_loss_by_hand_on_cosines_and_refused_without_them():
    s, mmax = 30.0, 0.5
    margins = [mmax * (1 / n) ** 0.25 for n in COUNTS]
    term = LDAMTerm(LDAMLoss(name="ldam", max_margin=mmax, scale=s), COUNTS)

    def hand(z):
        per = []
        for row, y in zip(z, TARGETS):
            adj = [s * (v - (margins[y] if c == y else 0.0)) for c, v in enumerate(row)]
            per.append(ce(adj, y))
        return per

    with_cos = inputs(cosine=COSINE)
    assert close(term(with_cos), sum(hand(COSINE)) / 3)
    w = [0.2, 0.8, 2.0]
    assert close(term(with_cos, torch.tensor(w)), wmean(hand(COSINE), TARGETS, w))
    # a linear head gives no cosines: an error, not s * (raw logits - margins)
    assert term.needs_cosine
    with pytest.raises(ConfigError, match="ldam needs a cosine classifier: set model.head: cosine"):
        term(inputs())


# --------------------------------------------------------------------------- prior-based


def test_balanced_softmax_and_logit_adjust_by_hand():
    prior = [n / 111 for n in COUNTS]
    x = inputs()
    bs = [ce([v + math.log(p) for v, p in zip(r, prior)], y) for r, y in zip(LOGITS, TARGETS)]
    term = BalancedSoftmaxTerm(None, COUNTS)
    assert close(term(x), sum(bs) / 3)
    assert not term.uses_class_weights
    tau = 0.5
    la = [ce([v + tau * math.log(p) for v, p in zip(r, prior)], y) for r, y in zip(LOGITS, TARGETS)]
    assert close(LogitAdjustTerm(LogitAdjustLoss(name="logit_adjust", tau=tau), COUNTS)(x), sum(la) / 3)
    # tau 1 is balanced softmax; tau 0 is cross-entropy
    assert close(LogitAdjustTerm(LogitAdjustLoss(name="logit_adjust", tau=1.0), COUNTS)(x), sum(bs) / 3)
    assert close(
        LogitAdjustTerm(LogitAdjustLoss(name="logit_adjust", tau=0.0), COUNTS)(x),
        sum(ce(r, y) for r, y in zip(LOGITS, TARGETS)) / 3,
    )


def test_post_hoc_logit_adjustment():
    prior = [n / 111 for n in COUNTS]
    logits = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    out = adjust_logits(logits, COUNTS, tau=1.0)
    expected = [v - math.log(p) for v, p in zip([2.0, 1.0, 0.0], prior)]
    assert torch.allclose(out, torch.tensor([expected], dtype=torch.float64))
    assert out.dtype == torch.float64
    assert int(out.argmax()) == 2  # the rare class wins once the prior is divided out
    half = adjust_logits(logits.float(), list(COUNTS), tau=0.5)
    assert torch.allclose(half, torch.tensor([[v - 0.5 * math.log(p) for v, p in zip([2.0, 1.0, 0.0], prior)]]))
    assert torch.equal(adjust_logits(logits, COUNTS, tau=0.0), logits)
    assert adjust_logits(torch.zeros(4, 5, 3), COUNTS, 1.0).shape == (4, 5, 3)


# --------------------------------------------------------------------------- label-aware smoothing


def test_label_aware_smoothing_values():
    head, tail = 0.4, 0.1
    r = [(n - 1) / (100 - 1) for n in COUNTS]  # [1, 9/99, 0]
    concave = [tail + (head - tail) * math.sin(math.pi / 2 * v) for v in r]
    linear = [tail + (head - tail) * v for v in r]
    convex = [tail + (head - tail) * v**3 for v in r]
    for shape, exp in (("concave", concave), ("linear", linear), ("convex", convex)):
        got = label_aware_smoothing(COUNTS, head, tail, shape, power=3.0)
        assert torch.allclose(got, torch.tensor(exp), atol=1e-7), shape
    got = label_aware_smoothing(COUNTS, head, tail, "concave")
    assert close(got[0], head) and close(got[2], tail)  # head class smoothed most
    assert torch.allclose(label_aware_smoothing([7, 7, 7], head, tail), torch.full((3,), head))


def test_label_aware_smoothing_loss_by_hand():
    cfg = LabelAwareSmoothingLoss(name="label_aware_smoothing", head_smoothing=0.4, tail_smoothing=0.1, shape="linear")
    eps = [0.1 + 0.3 * (n - 1) / 99 for n in COUNTS]
    per = []
    for row, y in zip(LOGITS, TARGETS):
        q = [1 - eps[y] if c == y else eps[y] / 2 for c in range(3)]
        assert close(sum(q), 1.0)
        per.append(-sum(qc * lp for qc, lp in zip(q, log_softmax(row))))
    term = LabelAwareSmoothingTerm(cfg, COUNTS)
    assert close(term(inputs()), sum(per) / 3)
    w = [1.0, 2.0, 3.0]
    assert close(term(inputs(), torch.tensor(w)), wmean(per, TARGETS, w))


# --------------------------------------------------------------------------- SupCon

FEATS = [[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 2.0]]  # rows 0-1 view 1, rows 2-3 view 2


def hand_supcon(feats, labels, t):
    z = []
    for f in feats:
        norm = math.sqrt(sum(v * v for v in f))
        z.append([v / norm for v in f])
    dot = lambda a, b: sum(u * v for u, v in zip(a, b))  # noqa: E731
    losses = []
    for i in range(len(z)):
        pos = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not pos:
            continue
        denom = sum(math.exp(dot(z[i], z[a]) / t) for a in range(len(z)) if a != i)
        losses.append(-sum(math.log(math.exp(dot(z[i], z[p]) / t) / denom) for p in pos) / len(pos))
    return sum(losses) / len(losses)


def test_supcon_by_hand_two_views():
    t = 0.5
    labels = [0, 1, 0, 1]
    expected = hand_supcon(FEATS, labels, t)
    term = SupConTerm(SupConLoss(name="supcon", temperature=t), COUNTS)
    got = term(LossInputs(torch.zeros(4, 3), torch.tensor(labels), features=torch.tensor(FEATS)))
    assert close(got, expected)
    # one target per image (N/2) is repeated for the second view
    got_half = term(LossInputs(torch.zeros(2, 3), torch.tensor([0, 1]), features=torch.tensor(FEATS)))
    assert close(got_half, expected)
    # the same label across images makes extra positives
    assert close(supcon_loss(torch.tensor(FEATS), torch.tensor([0, 0, 0, 1]), t), hand_supcon(FEATS, [0, 0, 0, 1], t))


def test_supcon_anchor_without_positive_is_excluded():
    t = 0.07
    feats = FEATS[:3]
    labels = [0, 0, 1]  # anchor 2 has no positive
    expected = hand_supcon(feats, labels, t)
    assert close(supcon_loss(torch.tensor(feats), torch.tensor(labels), t), expected, tol=1e-4)
    # no positive pair at all: 0 with a (zero) gradient, not NaN
    f = torch.tensor(feats, requires_grad=True)
    loss = supcon_loss(f, torch.tensor([0, 1, 2]), t)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(f.grad, torch.zeros_like(f))
    f1 = torch.ones(1, 2, requires_grad=True)
    supcon_loss(f1, torch.tensor([0]), t).backward()
    assert torch.isfinite(f1.grad).all()


# --------------------------------------------------------------------------- angular margins


def test_margin_losses_by_hand():
    s = 10.0
    # target cosines 0.2, 0.8, -0.8: SphereFace (m=4) pieces k = 1, 0, 3
    cosine = [[0.6, 0.2, -0.3], [0.1, -0.5, 0.8], [-0.8, 0.0, -0.95]]

    def hand(psi):
        per = []
        for row, y in zip(cosine, TARGETS):
            z = [s * (psi(v) if c == y else v) for c, v in enumerate(row)]
            per.append(ce(z, y))
        return per

    x = inputs(cosine=cosine)
    m = 0.3
    arc = hand(lambda c: math.cos(math.acos(c) + m))  # all target angles are below pi - m
    assert close(ArcFaceTerm(ArcFaceLoss(name="arcface", margin=m, scale=s), COUNTS)(x), sum(arc) / 3)

    def arc_big(c, m=1.0):  # theta(-0.8) = 2.50 > pi - 1: the continuation
        theta = math.acos(c)
        return math.cos(theta + m) if theta <= math.pi - m else c - 1 + math.cos(m)

    assert math.acos(-0.8) > math.pi - 1.0
    arc1 = hand(arc_big)
    assert close(ArcFaceTerm(ArcFaceLoss(name="arcface", margin=1.0, scale=s), COUNTS)(x), sum(arc1) / 3)

    cos = hand(lambda c: c - m)
    cos_term = CosFaceTerm(CosFaceLoss(name="cosface", margin=m, scale=s), COUNTS)
    assert close(cos_term(x), sum(cos) / 3)
    w = [3.0, 1.0, 0.5]
    assert close(cos_term(x, torch.tensor(w)), wmean(cos, TARGETS, w))

    def psi4(c):
        theta = math.acos(c)
        k = min(int(4 * theta / math.pi), 3)
        return (-1) ** k * math.cos(4 * theta) - 2 * k

    assert [min(int(4 * math.acos(c) / math.pi), 3) for c in (0.2, 0.8, -0.8)] == [1, 0, 3]
    sph = hand(psi4)
    sph_term = SphereFaceTerm(SphereFaceLoss(name="sphereface", margin=4, scale=s), COUNTS)
    assert close(sph_term(x), sum(sph) / 3)
    assert close(sph_term(x, torch.tensor(w)), wmean(sph, TARGETS, w))


def test_sphereface_extension_is_continuous_and_monotone():
    theta = torch.linspace(0, math.pi, 20001, dtype=torch.float64)
    for m in (1, 2, 3, 4):
        psi = sphereface_psi(theta, m)
        steps = psi[1:] - psi[:-1]
        assert (steps <= 1e-12).all(), m  # non-increasing
        assert steps.abs().max() < 1e-2, m  # no jumps at theta = k pi / m
        assert close(psi[0], 1.0) and close(psi[-1], 1 - 2 * m)
    assert torch.allclose(sphereface_psi(theta, 1), torch.cos(theta))
    # gradient of the loss w.r.t. the cosine agrees with finite differences
    term = SphereFaceTerm(SphereFaceLoss(name="sphereface", margin=3, scale=2.0), COUNTS)
    cosine = torch.tensor(COSINE, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor(TARGETS)
    assert torch.autograd.gradcheck(lambda c: term(LossInputs(c, targets, cosine=c)), (cosine,))


def test_arcface_continuation_and_safe_gradients():
    m = 0.5
    theta = torch.linspace(0, math.pi, 20001, dtype=torch.float64)
    psi = arcface_psi(theta, m)
    steps = psi[1:] - psi[:-1]
    assert (steps <= 1e-12).all() and steps.abs().max() < 1e-3
    at = torch.tensor([math.pi - m], dtype=torch.float64)
    assert close(arcface_psi(at, m), -1.0)
    assert close(arcface_psi(torch.tensor([math.pi], dtype=torch.float64), m), -2 + math.cos(m))
    # cosines exactly at +-1 (acos has an infinite derivative there) give finite gradients
    for term in (
        ArcFaceTerm(ArcFaceLoss(name="arcface"), COUNTS),
        SphereFaceTerm(SphereFaceLoss(name="sphereface"), COUNTS),
    ):
        c = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0]], requires_grad=True)
        loss = term(LossInputs(torch.zeros(2, 3), torch.tensor([0, 0]), cosine=c))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(c.grad).all()


# --------------------------------------------------------------------------- errors


def test_margin_without_cosine_and_supcon_without_features_explain_the_fix():
    for name, cfg in (("ldam", {}), ("arcface", {}), ("cosface", {}), ("sphereface", {})):
        fn = build_loss(TrainConfig.model_validate({"loss": [{"name": name, **cfg}]}), COUNTS)
        assert fn.needs_cosine
        with pytest.raises(ConfigError, match=f"{name} needs a cosine classifier: set model.head: cosine"):
            fn(inputs())
    fn = build_loss(TrainConfig.model_validate({"loss": [{"name": "supcon"}]}), COUNTS)
    assert fn.needs_two_views and not fn.needs_cosine
    with pytest.raises(TailaugError, match="supcon loss needs the pooled features"):
        fn(inputs())
    with pytest.raises(TailaugError, match="3 feature rows but 2 targets"):
        fn(LossInputs(torch.zeros(2, 3), torch.tensor([0, 1]), features=torch.zeros(3, 4)))


def test_shape_mismatch_and_useless_reweight_are_reported():
    fn = build_loss(TrainConfig(), COUNTS)
    with pytest.raises(TailaugError, match="model outputs 4 classes"):
        fn(LossInputs(torch.zeros(2, 4), torch.tensor([0, 1])))
    with pytest.raises(TailaugError, match="integer class indices"):
        fn(LossInputs(torch.zeros(2, 3), torch.tensor([0.0, 1.0])))
    cfg = TrainConfig.model_validate(
        {"loss": [{"name": "balanced_softmax"}], "reweight": {"scheme": "effective_number"}}
    )
    with pytest.raises(ConfigError, match="reweight.scheme: none"):
        build_loss(cfg, COUNTS)
    late = TrainConfig.model_validate({"epochs": 10, "reweight": {"scheme": "inverse_frequency", "start_epoch": 10}})
    with pytest.warns(UserWarning, match="never applied"):
        build_loss(late, COUNTS)


# --------------------------------------------------------------------------- the combined loss


def test_every_registered_term_is_named_like_its_config():
    assert {"ce", "focal", "ldam", "balanced_softmax", "logit_adjust", "label_aware_smoothing", "supcon",
            "arcface", "cosface", "sphereface"} <= set(LOSSES.names())
    for name in LOSSES.names():
        entry = LOSSES.get(name)
        assert entry.obj.name == name
        assert typing.get_args(entry.config.model_fields["name"].annotation) == (name,)


def test_drw_switches_on_at_start_epoch():
    cfg = TrainConfig.model_validate(
        {"loss": [{"name": "ce"}], "reweight": {"scheme": "effective_number", "beta": 0.9, "start_epoch": 3}}
    )
    fn = build_loss(cfg, COUNTS)
    x = inputs()
    per = [ce(r, y) for r, y in zip(LOGITS, TARGETS)]
    w = hand_weights_effective(COUNTS, 0.9)
    for epoch, weighted in ((0, False), (2, False), (3, True), (7, True)):
        fn.set_epoch(epoch)
        assert fn.reweighting is weighted
        expected = wmean(per, TARGETS, w if weighted else None)
        assert close(fn(x), expected), epoch
        exp_w = torch.tensor(w) if weighted else torch.ones(3)
        assert torch.allclose(fn.current_class_weights(), exp_w)
    fn.set_epoch(1)
    assert close(fn(x), sum(per) / 3)
    # start_epoch 0 is plain re-weighting from the first epoch
    fn0 = build_loss(TrainConfig.model_validate({"reweight": {"scheme": "inverse_frequency"}}), COUNTS)
    assert fn0.reweighting


def test_weighted_sum_ldam_supcon_from_parsed_config():
    cfg = validate_config(
        {
            "model": {"head": "cosine"},
            "train": {
                "loss": [
                    {"name": "ldam", "weight": 0.1, "max_margin": 0.5, "scale": 30},
                    {"name": "supcon", "weight": 0.9, "temperature": 0.07},
                ],
                "reweight": {"scheme": "inverse_frequency", "start_epoch": 160},
            },
        }
    )
    fn = build_loss(cfg.train, COUNTS)
    assert isinstance(fn, LossFunction)
    assert fn.needs_two_views and fn.needs_cosine and fn.uses_cosine
    labels = [0, 1, 0, 1]
    x = LossInputs(
        logits=torch.tensor(LOGITS + [[0.2, 0.1, 0.0]]),
        targets=torch.tensor(labels),
        cosine=torch.tensor(COSINE + [[0.1, 0.3, -0.2]]),
        features=torch.tensor(FEATS),
    )
    ldam = LDAMTerm(LDAMLoss(name="ldam"), COUNTS)(x)
    supcon = hand_supcon(FEATS, labels, 0.07)
    total = fn(x)
    assert close(total, 0.1 * float(ldam) + 0.9 * supcon, tol=1e-4)
    assert set(fn.last_terms) == {"ldam", "supcon"}
    assert close(fn.last_terms["supcon"], supcon, tol=1e-4)
    # DRW on: only the LDAM part changes
    fn.set_epoch(160)
    w = torch.tensor([x * 3 / 1.11 for x in (0.01, 0.1, 1.0)])
    ldam_w = LDAMTerm(LDAMLoss(name="ldam"), COUNTS)(x, w)
    assert close(fn(x), 0.1 * float(ldam_w) + 0.9 * supcon, tol=1e-4)


def test_loss_function_backward_device_dtype_and_names():
    cfg = TrainConfig.model_validate(
        {"loss": [{"name": "ce"}, {"name": "focal", "weight": 0.5}, {"name": "ce", "label_smoothing": 0.1}]}
    )
    fn = build_loss(cfg, torch.tensor(COUNTS))
    assert fn.term_names == ["ce", "focal", "ce_1"]
    assert not (fn.uses_cosine or fn.needs_cosine or fn.needs_two_views)
    logits = torch.tensor(LOGITS, dtype=torch.bfloat16, requires_grad=True)
    loss = fn(LossInputs(logits, torch.tensor(TARGETS, dtype=torch.int32)))
    assert loss.dtype == torch.float32 and loss.ndim == 0
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()
    assert "class_weight" in fn.state_dict()
