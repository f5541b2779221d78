import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tailaug.config import SamplerConfig
from tailaug.data.samplers import (
    ClassAwareSampler,
    build_sampler,
    class_probabilities,
)
from tailaug.errors import ConfigError, DataError, TailaugError
from tailaug.registry import SAMPLERS

SAMPLER_KINDS = SAMPLERS.names()

COUNTS = [400, 150, 60, 20, 5]  # a small long-tailed set


def make_labels(counts=COUNTS, seed=0):
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    return np.random.default_rng(seed).permutation(labels)


def class_freq(sampler, labels, epochs):
    hits = np.zeros(sampler.num_classes, dtype=np.int64)
    for e in epochs:
        sampler.set_epoch(e)
        hits += np.bincount(labels[list(sampler)], minlength=sampler.num_classes)
    return hits


def assert_binomial(hits, probs, z=5.0):
    """Each class count lies within z binomial standard deviations of its expectation."""
    m = hits.sum()
    expected = m * probs
    sd = np.sqrt(m * probs * (1 - probs))
    assert np.all(np.abs(hits - expected) <= z * sd + 1), (hits, expected)


# --------------------------------------------------------------------------- probabilities


def test_class_probabilities_closed_forms():
    n = np.array(COUNTS, dtype=float)
    np.testing.assert_allclose(class_probabilities("instance", COUNTS), n / n.sum())
    np.testing.assert_allclose(class_probabilities("class_balanced", COUNTS), np.full(5, 0.2))
    np.testing.assert_allclose(class_probabilities("sqrt", COUNTS), np.sqrt(n) / np.sqrt(n).sum())
    for kind in SAMPLER_KINDS:
        for epoch in (0, 3, 9):
            p = class_probabilities(kind, COUNTS, epoch=epoch, total_epochs=10)
            assert p.shape == (5,) and np.isclose(p.sum(), 1.0) and np.all(p > 0)


def test_progressive_schedule():
    n = np.array(COUNTS, dtype=float)
    inst, uni = n / n.sum(), np.full(5, 0.2)
    T = 10
    np.testing.assert_allclose(class_probabilities("progressive", COUNTS, 0, T), inst)
    np.testing.assert_allclose(class_probabilities("progressive", COUNTS, T - 1, T), uni)
    mid = class_probabilities("progressive", COUNTS, 3, T)
    np.testing.assert_allclose(mid, (1 - 3 / 9) * inst + (3 / 9) * uni)
    # the head class's share falls monotonically, the tail class's rises
    seq = np.stack([class_probabilities("progressive", COUNTS, t, T) for t in range(T)])
    assert np.all(np.diff(seq[:, 0]) < 0) and np.all(np.diff(seq[:, -1]) > 0)
    # T = 0 (a single epoch) is class balanced; epochs past the end stay balanced
    np.testing.assert_allclose(class_probabilities("progressive", COUNTS, 0, 1), uni)
    np.testing.assert_allclose(class_probabilities("progressive", COUNTS, 15, T), uni)


# --------------------------------------------------------------------------- empirical frequencies


@pytest.mark.parametrize("kind", ["class_balanced", "sqrt", "progressive"])
def test_empirical_frequencies_match(kind):
    labels = make_labels()
    T = 4
    s = ClassAwareSampler(labels, kind, 5, seed=1, total_epochs=T, num_samples=40_000)
    epochs = [0, 2, 3] if kind == "progressive" else [0, 1, 2]
    for e in epochs:  # each epoch on its own, since progressive changes with the epoch
        hits = class_freq(s, labels, [e])
        assert_binomial(hits, class_probabilities(kind, COUNTS, e, T))


def test_instance_frequencies_are_exact_and_a_permutation():
    labels = make_labels()
    s = ClassAwareSampler(labels, "instance", 5, seed=3)
    for e in range(3):
        s.set_epoch(e)
        idx = list(s)
        assert len(idx) == len(s) == len(labels)
        assert sorted(idx) == list(range(len(labels)))
        np.testing.assert_array_equal(np.bincount(labels[idx], minlength=5), COUNTS)


def test_instance_with_num_samples_uses_each_index_evenly():
    labels = make_labels()
    n = len(labels)
    s = ClassAwareSampler(labels, "instance", 5, num_samples=2 * n + 7)
    hits = np.bincount(list(s), minlength=n)
    assert hits.sum() == 2 * n + 7 and hits.min() == 2 and hits.max() == 3


def test_within_class_draw_is_uniform():
    labels = make_labels([30, 10])
    s = ClassAwareSampler(labels, "class_balanced", 2, num_samples=40_000)
    hits = np.bincount(list(s), minlength=len(labels))
    for c, n_c in enumerate([30, 10]):
        members = hits[labels == c]
        assert_binomial(members, np.full(n_c, 1.0 / n_c))


def test_draws_only_from_the_drawn_class_members():
    labels = make_labels()
    s = ClassAwareSampler(labels, "sqrt", 5, num_samples=5000)
    idx = np.array(list(s))
    assert idx.min() >= 0 and idx.max() < len(labels)


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("kind", SAMPLER_KINDS)
def test_deterministic_per_seed_and_epoch(kind):
    labels = make_labels()
    a = ClassAwareSampler(labels, kind, 5, seed=7, total_epochs=5)
    b = ClassAwareSampler(labels, kind, 5, seed=7, total_epochs=5)
    for e in (0, 1):
        a.set_epoch(e)
        b.set_epoch(e)
        assert list(a) == list(b)
        assert list(a) == list(a)  # iterating again repeats the epoch
    a.set_epoch(0)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    c = ClassAwareSampler(labels, kind, 5, seed=8, total_epochs=5)
    assert list(c) != first


def test_labels_as_list_or_tensor_give_same_draw():
    labels = make_labels()
    ref = list(ClassAwareSampler(labels, "sqrt", 5, seed=2))
    assert list(ClassAwareSampler(labels.tolist(), "sqrt", 5, seed=2)) == ref
    assert list(ClassAwareSampler(torch.from_numpy(labels), "sqrt", 5, seed=2)) == ref


# --------------------------------------------------------------------------- distributed


@pytest.mark.parametrize("kind", SAMPLER_KINDS)
def test_two_ranks_partition_the_single_rank_draw(kind):
    labels = make_labels()
    n = len(labels)
    assert n % 2 == 1  # odd size: exercises the padding
    full = ClassAwareSampler(labels, kind, 5, seed=5, total_epochs=3)
    ranks = [ClassAwareSampler(labels, kind, 5, seed=5, total_epochs=3, rank=r, world_size=2) for r in (0, 1)]
    for e in (0, 2):
        for s in (full, *ranks):
            s.set_epoch(e)
        glob = list(full)
        r0, r1 = list(ranks[0]), list(ranks[1])
        assert len(r0) == len(r1) == len(ranks[0]) == (n + 1) // 2
        # interleaving the rank slices gives back the global draw padded from its start
        merged = [x for pair in zip(r0, r1) for x in pair]
        assert merged == glob + glob[:1]
        # as positions in the draw the ranks are disjoint; their union is the full draw
        pos0, pos1 = set(range(0, n + 1, 2)), set(range(1, n + 1, 2))
        assert not pos0 & pos1
        if kind == "instance":
            assert set(r0) | set(r1) == set(range(n))
            assert set(r0[:-1]).isdisjoint(r1[:-1])  # disjoint except the padded repeat


def test_padding_when_fewer_samples_than_ranks():
    labels = make_labels()
    ranks = [ClassAwareSampler(labels, "class_balanced", 5, num_samples=2, rank=r, world_size=4) for r in range(4)]
    glob = ClassAwareSampler(labels, "class_balanced", 5, num_samples=2).global_indices().tolist()
    got = [list(s) for s in ranks]
    assert [len(g) for g in got] == [1, 1, 1, 1]
    assert [g[0] for g in got] == [glob[0], glob[1], glob[0], glob[1]]


def test_works_as_dataloader_sampler():
    labels = make_labels()
    ds = TensorDataset(torch.arange(len(labels)), torch.from_numpy(labels))
    s = ClassAwareSampler(labels, "class_balanced", 5, seed=0)
    seen = torch.cat([x for x, _ in DataLoader(ds, batch_size=64, sampler=s)])
    assert seen.tolist() == list(s)


# --------------------------------------------------------------------------- config and errors


def test_build_sampler_from_config():
    labels = make_labels()
    s = build_sampler(SamplerConfig(kind="progressive"), labels, 5, seed=4, total_epochs=6, rank=1, world_size=2)
    assert isinstance(s, ClassAwareSampler)
    assert (s.kind, s.seed, s.total_epochs, s.rank, s.world_size) == ("progressive", 4, 6, 1, 2)
    assert len(s) == (len(labels) + 1) // 2
    assert build_sampler(SamplerConfig(), labels, 5, seed=0, total_epochs=1).kind == "instance"


def test_empty_class_names_the_class():
    labels = make_labels([10, 0, 5, 0])
    with pytest.raises(DataError, match=r"\[1, 3\]"):
        ClassAwareSampler(labels, "class_balanced", 4)
    with pytest.raises(DataError, match=r"\[2\]"):
        class_probabilities("sqrt", [3, 4, 0])


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(ConfigError) as info:
        ClassAwareSampler(make_labels(), "balanced", 5)
    for kind in SAMPLER_KINDS:
        assert kind in str(info.value)
    with pytest.raises(TailaugError):
        class_probabilities("square_root", COUNTS)


def test_labels_out_of_range():
    with pytest.raises(DataError, match="num_classes"):
        ClassAwareSampler([0, 1, 5], "instance", 3)
