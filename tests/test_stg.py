"""Stage 2 (the Semantic Transformation Generator) and the feature augmenters."""

import math

import pytest
import torch
from torch import nn

from tailaug.augment.base import AugmentContext, FeatureAugmenter, build_augmenter
from tailaug.augment.noise import FeatureDropoutAugmenter, GaussianNoiseAugmenter, NoiseAugmenter
from tailaug.augment.stg import (
    STGAugmenter,
    STGAugmenterModule,
    SemanticTransformationGenerator,
    TargetEstimator,
    class_betas,
    gaussian_kl,
    generator_loss,
    head_classes,
)
from tailaug.config import HeadSetConfig, STGConfig
from tailaug.registry import AUGMENTERS
from tailaug.errors import CheckpointError, ConfigError
from tailaug.stages.generator import load_generator, save_generator, sidecar_path, train_generator

T = torch.tensor


pytestmark = pytest.mark.usefixtures("one_thread")


class FixedGenerator(nn.Module):
    """Stub STG: the same (mu, log_var, factor) for every row; records the tokens it was asked for."""

    def __init__(self, mu, var, num_classes, factor=None):
        super().__init__()
        self.dim = len(mu)
        self.num_classes = num_classes
        self.register_buffer("mu", T(mu, dtype=torch.float32))
        self.register_buffer("log_var", torch.log(T(var, dtype=torch.float32)))
        self.register_buffer("u", torch.zeros(self.dim, 0) if factor is None else T(factor, dtype=torch.float32))
        self.register_buffer("trained_tokens", torch.zeros(num_classes, dtype=torch.bool))
        self.last_tokens = None

    def forward(self, features, token_classes):
        self.last_tokens = token_classes.clone()
        n = features.shape[0]
        return self.mu.expand(n, -1), self.log_var.expand(n, -1)

    def factor(self, features, token_classes):
        return self.u.expand(features.shape[0], -1, -1)


def _ctx(features, labels, counts, heads, **kw):
    return AugmentContext(features=features, labels=labels, class_counts=counts, head_classes=heads, **kw)


# --------------------------------------------------------------------------- head set, beta


def test_head_classes_rules():
    counts = [500, 150, 101, 100, 20, 150]
    assert head_classes(counts) == [0, 1, 2, 5]  # many-shot: n_c > 100
    assert head_classes(counts, many=140) == [0, 1, 5]
    assert head_classes(counts, HeadSetConfig(rule="threshold", threshold=150)) == [0]
    # top_k: ties broken by the lower class index
    assert head_classes(counts, HeadSetConfig(rule="top_k", top_k=2)) == [0, 1]
    assert head_classes([5, 5], HeadSetConfig(rule="many_shot")) == []
    assert head_classes([5, 4, 3], HeadSetConfig(rule="top_k", top_k=3)) == [0, 1, 2]
    with pytest.raises(ConfigError, match=r"stg.head.top_k = 4 is more than the 3 classes of the data"):
        head_classes([5, 4, 3], HeadSetConfig(rule="top_k", top_k=4))


def test_an_augmenter_with_tail_targets_and_no_tail_class_is_an_error():
    feats, labels, counts = torch.randn(6, 2), T([0, 0, 1, 1, 2, 2]), [200, 150, 120]
    stub = FixedGenerator([0.0, 0.0], [1.0, 1.0], 3)
    for aug in (STGAugmenterModule(stub), GaussianNoiseAugmenter(std=1.0), FeatureDropoutAugmenter(p=0.1)):
        with pytest.raises(ConfigError, match=r"all 3 classes are head classes, so the \w+ augmenter .*targets: all"):
            aug.fit(_ctx(feats, labels, counts, [0, 1, 2]))
    FeatureAugmenter().fit(_ctx(feats, labels, counts, [0, 1, 2]))  # the identity (cRT alone) is fine
    noise = GaussianNoiseAugmenter(std=1.0, targets="all")
    noise.fit(_ctx(feats, labels, counts, [0, 1, 2]))
    assert noise.target_rows(labels).all()


def test_hidden_layers_need_units():
    from tailaug.config import load_config

    with pytest.raises(ConfigError, match=r"stg.hidden_dims.0 = 0: .*greater than or equal to 1"):
        load_config(None, ["stg.hidden_dims=[0]"])
    assert load_config(None, ["stg.hidden_dims=[]"]).stg.hidden_dims == []
    with pytest.raises(ConfigError, match=r"hidden_dims = \[8, 0\]"):
        SemanticTransformationGenerator(4, 3, [8, 0])


def test_beta_for_known_counts():
    beta = class_betas([500, 50, 5])
    assert torch.allclose(beta, T([0.1, math.sqrt(0.1), 1.0]), atol=1e-6)


# --------------------------------------------------------------------------- targets (Eq. 1)


def test_target_estimator_hand_computation_memory_and_ema():
    est = TargetEstimator(memory_size=2, min_neighbours=2, ema=0.5)
    est.push(T([[0.0, 2.0], [4.0, 0.0]]), T([0, 1]), T([10, 11]))  # memory: one row per class
    feats = T([[0.0, 0.0], [2.0, 0.0], [1.0, 1.0], [3.0, 3.0]])
    labels = T([0, 0, 1, 1])
    index = T([0, 1, 2, 3])

    mu, sigma, mask = est(feats, labels, index)
    # a0: neighbours a1=(2,0) and memory (0,2): deltas (2,0),(0,2) -> mu (1,1), Sigma (1,1)
    # a1: a0=(0,0), memory (0,2): deltas (-2,0),(-2,2) -> mu (-2,1), Sigma (0,1)
    # a2: a3=(3,3), memory (4,0): deltas (2,2),(3,-1) -> mu (2.5,.5), Sigma (.25,2.25)
    # a3: a2=(1,1), memory (4,0): deltas (-2,-2),(1,-3) -> mu (-.5,-2.5), Sigma (2.25,.25)
    assert mask.tolist() == [True] * 4
    assert torch.allclose(mu, T([[1.0, 1.0], [-2.0, 1.0], [2.5, 0.5], [-0.5, -2.5]]))
    assert torch.allclose(sigma, T([[1.0, 1.0], [0.0, 1.0], [0.25, 2.25], [2.25, 0.25]]))

    # FIFO eviction: the memory (size 2) now holds the last two rows pushed, a2 and a3
    assert len(est) == 2
    assert torch.equal(est.mem_features, feats[2:])
    assert est.mem_labels.tolist() == [1, 1] and est.mem_index.tolist() == [2, 3]

    # second visit of the same samples: class 0 has one neighbour (a0 <-> a1) -> no target;
    # class 1: a2's own memory copy (index 2) is excluded, a3 counts in batch and memory
    mu2, sigma2, mask2 = est(feats, labels, index)
    assert mask2.tolist() == [False, False, True, True]
    assert torch.equal(mu2[:2], torch.zeros(2, 2)) and torch.equal(sigma2[:2], torch.zeros(2, 2))
    # raw targets of the visit: a2 mu (2,2) Sigma 0; a3 mu (-2,-2) Sigma 0; EMA rho = .5
    assert torch.allclose(mu2[2:], T([[2.25, 1.25], [-1.25, -2.25]]))
    assert torch.allclose(sigma2[2:], T([[0.125, 1.125], [1.125, 0.125]]))


def test_target_estimator_min_neighbours_mask_and_no_memory():
    est = TargetEstimator(memory_size=0, min_neighbours=2, ema=0.9)
    feats = torch.randn(5, 3)
    mu, sigma, mask = est(feats, T([0, 0, 0, 1, 1]), T([0, 1, 2, 3, 4]))
    assert mask.tolist() == [True, True, True, False, False]  # class 1 rows have one neighbour
    assert len(est) == 0  # m = 0 disables the memory
    # first visit: the target itself (mean of the two others minus self)
    assert torch.allclose(mu[0], (feats[1] + feats[2]) / 2 - feats[0], atol=1e-6)
    est3 = TargetEstimator(memory_size=0, min_neighbours=3)
    assert not est3(feats, T([0, 0, 0, 1, 1]))[2].any()


def test_rows_sharing_an_index_are_not_neighbours():
    est = TargetEstimator(memory_size=0, min_neighbours=1)
    feats = T([[0.0], [1.0], [5.0]])
    # rows 0 and 1 are two views of image 7: neither is the other's neighbour
    mu, _, mask = est(feats, T([0, 0, 0]), T([7, 7, 8]))
    assert mask.all()
    assert torch.allclose(est.estimate(feats, T([0, 0, 0]), T([7, 7, 8]))[0][:, 0], T([5.0, 4.0, -4.5]))
    # the moving average is keyed by image: the two views' targets are averaged (4.5)
    assert torch.allclose(mu[:, 0], T([4.5, 4.5, -4.5]))


@pytest.mark.parametrize("k", [0, 3])  # 0: every same-class neighbour; 3: the 3 nearest
def test_target_estimator_matches_a_loop_reference(k):
    g = torch.Generator().manual_seed(1)
    est = TargetEstimator(memory_size=7, min_neighbours=2, ema=0.8, neighbours=k)
    history = []  # (feature, label, index) rows pushed so far
    state = {}
    for step in range(4):
        feats = torch.randn(9, 4, generator=g).double() * 3 + 10
        labels = torch.randint(0, 3, (9,), generator=g)
        index = torch.randint(0, 12, (9,), generator=g)
        mu, sigma, mask = est(feats, labels, index)
        memory = history[-7:]
        raw = {}
        for i in range(9):
            pool = [(feats[j], labels[j], index[j]) for j in range(9)] + memory
            nb = [f for f, lab, ix in pool if lab == labels[i] and ix != index[i]]
            if k:
                nb = sorted(nb, key=lambda f: float((f - feats[i]).norm()))[:k]
            assert bool(mask[i]) == (len(nb) >= 2)
            if len(nb) < 2:
                continue
            deltas = torch.stack(nb) - feats[i]
            m = deltas.mean(0)
            raw.setdefault(int(index[i]), []).append((m, ((deltas - m) ** 2).mean(0)))
        for key, vals in raw.items():
            m = torch.stack([v[0] for v in vals]).mean(0)
            s = torch.stack([v[1] for v in vals]).mean(0)
            if key in state:
                m, s = 0.8 * state[key][0] + 0.2 * m, 0.8 * state[key][1] + 0.2 * s
            state[key] = (m, s)
        for i in range(9):
            if mask[i]:
                assert torch.allclose(mu[i], state[int(index[i])][0], atol=1e-8)
                assert torch.allclose(sigma[i], state[int(index[i])][1], atol=1e-8)
        history += [(feats[j], labels[j], index[j]) for j in range(9)]


# --------------------------------------------------------------------------- Gaussians, losses


def test_gaussian_kl_hand_value():
    mu1, var1, mu2, var2 = T([0.0, 1.0]), T([1.0, 2.0]), T([1.0, 1.0]), T([2.0, 2.0])
    # dim 0: .5 (log 2 + (1 + 1)/2 - 1) = .5 log 2; dim 1: 0
    assert float(gaussian_kl(mu1, var1, mu2, var2)) == pytest.approx(0.5 * math.log(2), rel=1e-6)
    assert float(gaussian_kl(mu1, var1, mu2, var2, reduction="mean")) == pytest.approx(0.25 * math.log(2), rel=1e-6)
    assert float(gaussian_kl(mu1, var1, mu1, var1)) == pytest.approx(0.0, abs=1e-7)
    # the KL loss is KL(target || prediction), mean over dims
    loss = generator_loss(mu2[None], torch.log(var2)[None], mu1[None], var1[None], "kl", eps=0.0)
    assert float(loss) == pytest.approx(0.25 * math.log(2), rel=1e-5)


def _gaussian_heads(seed, stds, n=300, d=6, tail_n=8):
    g = torch.Generator().manual_seed(seed)
    feats, labels = [], []
    for c, s in enumerate(stds):
        mean = torch.randn(d, generator=g) * 4
        feats.append(mean + torch.randn(n, d, generator=g) * T(s))
        labels.append(torch.full((n,), c))
    feats.append(torch.randn(tail_n, d, generator=g))  # a tail class, not used in stage 2
    labels.append(torch.full((tail_n,), len(stds)))
    return torch.cat(feats), torch.cat(labels), [n] * len(stds) + [tail_n]


def test_train_generator_learns_per_class_variance():
    stds = [[0.5] * 3 + [1.0] * 3, [1.0] * 6, [2.0] * 3 + [0.7] * 3]
    feats, labels, counts = _gaussian_heads(0, stds)
    cfg = STGConfig(epochs=12, hidden_dims=[64], memory_size=600)
    model, losses = train_generator(feats, labels, None, counts, cfg, seed=0, progress=False)
    assert len(losses) == 12 and losses[-1] < 0.5 * losses[0]
    assert model.trained_tokens.tolist() == [True, True, True, False]
    assert not model.training
    with torch.no_grad():
        for c, s in enumerate(stds):
            rows = labels == c
            _, log_var = model(feats[rows], labels[rows])
            predicted = log_var.exp().mean(0)
            true = T(s) ** 2
            assert torch.allclose(predicted, true, rtol=0.25), (c, predicted, true)


def test_kl_loss_option_runs_and_decreases():
    feats, labels, counts = _gaussian_heads(1, [[1.0] * 6, [0.5] * 6], n=200)
    cfg = STGConfig(epochs=6, hidden_dims=[32], loss="kl", memory_size=200)
    model, losses = train_generator(feats, labels, None, counts, cfg, seed=0, progress=False)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]


def test_a_non_finite_generator_loss_is_a_clear_error():
    from tailaug.errors import TailaugError

    feats, labels, counts = _gaussian_heads(1, [[1.0] * 6, [0.5] * 6], n=200)
    cfg = STGConfig(epochs=3, hidden_dims=[16], memory_size=0, lr=1e30)
    with pytest.raises(TailaugError, match="generator loss became"):
        train_generator(feats, labels, None, counts, cfg, seed=0, progress=False)


def linear_output_dtypes(run):
    """The dtypes of every nn.Linear output while ``run()`` executes."""
    seen = set()

    def hook(module, args, out):
        if isinstance(module, nn.Linear):
            seen.add(out.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        result = run()
    finally:
        handle.remove()
    return seen, result


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_train_generator_runs_forward_passes_in_the_run_precision(dtype):
    feats, labels, counts = _gaussian_heads(1, [[1.0] * 6, [0.5] * 6], n=200)
    cfg = STGConfig(epochs=3, hidden_dims=[16], memory_size=200)
    seen, (model, losses) = linear_output_dtypes(
        lambda: train_generator(feats, labels, None, counts, cfg, seed=0, progress=False, device="cpu", dtype=dtype)
    )
    assert seen == {dtype or torch.float32}
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # autocast, not a cast model


def test_train_generator_is_seeded_and_needs_a_head_class():
    feats, labels, counts = _gaussian_heads(2, [[1.0] * 6, [1.0] * 6], n=150)
    cfg = STGConfig(epochs=2, hidden_dims=[16], memory_size=100)
    state = torch.get_rng_state()
    m1, l1 = train_generator(feats, labels, None, counts, cfg, seed=3, progress=False)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    m2, l2 = train_generator(feats, labels, None, counts, cfg, seed=3, progress=False)
    assert l1 == l2
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="no head class"):
        train_generator(feats, labels, None, counts, cfg, seed=0, many=1000, progress=False)


def test_a_generator_without_targets_is_an_error_not_an_untrained_model():
    feats, labels, counts = _gaussian_heads(2, [[1.0] * 6, [1.0] * 6], n=150)
    # batches of 2 rows without memory: no row ever has 2 same-class neighbours
    cfg = STGConfig(epochs=2, hidden_dims=[16], memory_size=0, batch_size=2)
    with pytest.raises(ConfigError, match=r"stage 2 epoch 1: no head-class row had 2 other images .*stg.batch_size"):
        train_generator(feats, labels, None, counts, cfg, seed=0, progress=False)


def test_a_head_class_without_targets_is_named():
    feats, labels, counts = _gaussian_heads(3, [[1.0] * 6, [1.0] * 6], n=150)
    # class 1 keeps two images: each has only one other image of its class, never 2 neighbours
    keep = (labels != 1) | (torch.cumsum((labels == 1).long(), 0) <= 2)
    feats, labels = feats[keep], labels[keep]
    counts = torch.bincount(labels, minlength=len(counts)).tolist()
    cfg = STGConfig(epochs=2, hidden_dims=[16], memory_size=0, batch_size=len(labels),
                    head=HeadSetConfig(rule="threshold", threshold=1))
    with pytest.raises(ConfigError, match=r"head class\(es\) \[1\] never had a target"):
        train_generator(feats, labels, None, counts, cfg, seed=0, progress=False)
    cfg = cfg.model_copy(update={"min_neighbours": 1})
    model, losses = train_generator(feats, labels, None, counts, cfg, seed=0, progress=False)
    assert model.trained_tokens.tolist() == [True, True, True] and all(math.isfinite(v) for v in losses)


def test_save_and_load_generator(tmp_path):
    model = SemanticTransformationGenerator(5, 3, [8, 4], token_std=0.5)
    model.trained_tokens[:2] = True
    model.eval()
    path = tmp_path / "gen" / "stg.safetensors"
    save_generator(path, model, {"lr": 0.001, "hidden_dims": [8, 4]})
    assert sidecar_path(path).is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["stg.json", "stg.safetensors"]  # no temp files left
    loaded, cfg = load_generator(path)
    assert cfg == {"lr": 0.001, "hidden_dims": [8, 4]}
    x, tok = torch.randn(4, 5), T([0, 1, 1, 0])
    for got, want in zip(loaded(x, tok), model(x, tok)):
        assert torch.equal(got, want)
    assert loaded.trained_tokens.tolist() == [True, True, False]
    # a tensor file that does not match its sidecar is refused; it is reused as long as it exists,
    # so the fix is to delete both files
    fix = f"delete {path} and {sidecar_path(path)} and rerun: stage 2 trains the generator again"
    side = sidecar_path(path).read_text()
    sidecar_path(path).write_text(side[:-9])
    with pytest.raises(CheckpointError) as info:
        load_generator(path)
    assert str(info.value).startswith(f"{sidecar_path(path)} cannot be read as JSON") and str(info.value).endswith(fix)
    sidecar_path(path).write_text(side)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="does not match") as info:
        load_generator(path)
    assert str(info.value).endswith(fix)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_generator(tmp_path / "missing.safetensors")


# --------------------------------------------------------------------------- the STG augmenter


def _stg(stub, counts, heads, feats=None, labels=None, **kw):
    aug = STGAugmenterModule(stub, **kw)
    if feats is None:
        feats = torch.randn(sum(counts), stub.dim)
        labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    aug.fit(_ctx(feats, labels, counts, heads))
    return aug


def test_replacement_mask_fraction():
    d = 20000
    stub = FixedGenerator([0.0] * d, [1.0] * d, 2)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, d)
    y = T([1, 1, 1])  # tail rows (class 1 is not head)
    for t in (0.3, 0.5, 0.8):
        aug = _stg(stub, [200, 20], [0], t=t)
        out, y_out = aug(a, y, generator=gen)
        assert torch.equal(y_out, y)
        frac = float((out != a).float().mean())
        assert abs(frac - t) < 0.015, (t, frac)
    out, _ = _stg(stub, [200, 20], [0], t=0.0)(a, y, generator=gen)
    assert torch.equal(out, a)
    out, _ = _stg(stub, [200, 20], [0], t=1.0)(a, y, generator=gen)
    assert bool((out != a).all())


def test_augmented_features_follow_predicted_mean_and_variance():
    mu, var = [1.0, -2.0, 0.5], [4.0, 0.25, 1.0]
    stub = FixedGenerator(mu, var, 3)
    counts, heads = [400, 100, 25], [0]
    aug = _stg(stub, counts, heads, lam=1.5, t=1.0)
    n = 40000
    a = torch.randn(n, 3)
    y = torch.full((n,), 1)  # beta_1 = (25 / 100) ** .5 = .5
    out, _ = aug(a, y, generator=torch.Generator().manual_seed(0))
    delta = out - a
    scale = 1.5 * 0.5
    assert torch.allclose(delta.mean(0), scale * T(mu), atol=0.03)
    assert torch.allclose(delta.var(0), scale**2 * T(var), rtol=0.05)
    # mu_scale 0 removes the mean term; head rows are untouched with targets="tail"
    out0, _ = _stg(stub, counts, heads, t=1.0, mu_scale=0.0)(a, y, generator=torch.Generator().manual_seed(0))
    assert torch.allclose((out0 - a).mean(0), torch.zeros(3), atol=0.03)
    head_out, _ = aug(a[:10], torch.zeros(10, dtype=torch.long), generator=torch.Generator())
    assert torch.equal(head_out, a[:10])
    # fresh randomness on every call
    gen = torch.Generator().manual_seed(1)
    assert not torch.equal(aug(a[:5], y[:5], generator=gen)[0], aug(a[:5], y[:5], generator=gen)[0])


def test_token_choice_prototype_and_classifier():
    stub = FixedGenerator([0.0, 0.0], [1.0, 1.0], 4)
    # head classes 0 and 1 with means (1, 0) and (0, 1); tail classes 2 and 3
    feats = T([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0], [0.5, 0.5], [5.0, 5.0]])
    labels = T([0, 0, 1, 1, 2, 3])
    counts = [200, 200, 10, 5]
    aug = _stg(stub, counts, [0, 1], feats, labels)
    x = T([[0.1, 2.0], [3.0, 0.2], [0.0, 1.0]])
    assert aug.token_classes(x, T([2, 3, 0])).tolist() == [1, 0, 0]  # head row keeps its own class
    aug(x, T([2, 3, 2]), generator=torch.Generator())
    assert stub.last_tokens.tolist() == [1, 0, 1]
    # classifier option: highest stage-1 score among the head classes (class 2's score is ignored)
    weight = T([[0.0, 10.0], [1.0, 0.0], [100.0, 100.0], [0.0, 0.0]])
    bias = T([0.0, 5.0, 0.0, 0.0])
    aug_c = STGAugmenterModule(stub, token="classifier", targets="all")
    aug_c.fit(_ctx(feats, labels, counts, [0, 1], classifier_weight=weight, classifier_bias=bias))
    # scores (head 0, head 1): (20, 5.1) -> 0; (2, 8) -> 1
    assert aug_c.token_classes(x[:2], T([2, 3])).tolist() == [0, 1]
    assert aug_c.token_classes(x[:2], T([1, 0])).tolist() == [1, 0]
    with pytest.raises(ConfigError, match="classifier"):
        STGAugmenterModule(stub, token="classifier").fit(_ctx(feats, labels, counts, [0, 1]))


def test_token_choice_by_a_cosine_stage1_head_uses_cosines_not_raw_dot_products():
    stub = FixedGenerator([0.0, 0.0], [1.0, 1.0], 3)
    feats = T([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = T([0, 1, 2])
    # head 0 has a long weight: w . a prefers it, cos(w, a) prefers head 1 for a = (1, 2)
    weight = T([[10.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    x = T([[1.0, 2.0], [2.0, 1.0]])
    linear = STGAugmenterModule(stub, token="classifier")
    linear.fit(_ctx(feats, labels, [200, 200, 5], [0, 1], classifier_weight=weight))
    assert linear.token_classes(x, T([2, 2])).tolist() == [0, 0]  # 10 > 2 and 20 > 1
    cosine = STGAugmenterModule(stub, token="classifier")
    cosine.fit(_ctx(feats, labels, [200, 200, 5], [0, 1], classifier_weight=weight, classifier_cosine_scale=16.0))
    assert cosine.token_classes(x, T([2, 2])).tolist() == [1, 0]  # cos: (.45, .89) and (.89, .45)
    with pytest.raises(ValueError, match="cosine classifier has no bias"):
        _ctx(feats, labels, [200, 200, 5], [0, 1], classifier_weight=weight, classifier_bias=torch.zeros(3),
             classifier_cosine_scale=16.0)


def test_stg_generator_stays_frozen_in_eval_mode():
    gen = SemanticTransformationGenerator(4, 3, [8])
    gen.trained_tokens[0] = True
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    aug = build_augmenter(STGAugmenter(name="stg", targets="all"), gen)
    aug.fit(_ctx(torch.randn(30, 4), torch.arange(3).repeat(10), [20, 5, 5], [0]))
    aug.train()
    assert not gen.training and not any(p.requires_grad for p in gen.parameters())
    out, _ = aug(torch.randn(1, 4), T([1]), generator=torch.Generator())  # one row is fine in eval mode
    assert out.shape == (1, 4)
    for k, v in gen.state_dict().items():
        assert torch.equal(v, before[k])  # BatchNorm running statistics unchanged
    with pytest.raises(ConfigError, match="no trained generator token"):
        aug.fit(_ctx(torch.randn(30, 4), torch.arange(3).repeat(10), [20, 5, 5], [0, 1]))


# --------------------------------------------------------------------------- registry, baselines


def test_registry_and_baseline_augmenters():
    assert {"none", "stg", "noise", "dropout"} <= set(AUGMENTERS.names())
    assert type(build_augmenter(None)) is FeatureAugmenter
    with pytest.raises(ConfigError, match="generator"):
        build_augmenter({"name": "stg"})
    with pytest.raises(ConfigError):
        build_augmenter({"name": "nosie"})
    noise = build_augmenter(NoiseAugmenter(name="noise", std=0.5))
    assert isinstance(noise, GaussianNoiseAugmenter)
    feats, labels = torch.zeros(4000, 50), torch.arange(2).repeat(2000)
    noise.fit(_ctx(feats, labels, [2000, 20], [0]))
    out, _ = noise(feats, labels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[labels == 0], feats[labels == 0])  # head rows untouched
    assert float(out[labels == 1].std()) == pytest.approx(0.5, rel=0.02)

    drop = build_augmenter({"name": "dropout", "p": 0.2, "targets": "all"})
    assert isinstance(drop, FeatureDropoutAugmenter)
    ones = torch.ones(4000, 50)
    drop.fit(_ctx(ones, labels, [2000, 20], [0]))
    out, _ = drop(ones, labels, generator=torch.Generator().manual_seed(0))
    assert float((out == 0).float().mean()) == pytest.approx(0.2, abs=0.01)
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 1 / 0.8))
    assert float(out.mean()) == pytest.approx(1.0, abs=0.01)  # inverted dropout keeps the mean
