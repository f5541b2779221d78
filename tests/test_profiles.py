"""Class-count profiles, the long-tailed subset draw and planned counts (methods.md section 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tailaug.config import DataConfig
from tailaug.data.datasets import BALANCED_SIZE, NUM_CLASSES, planned_counts
from tailaug.data.profiles import exponential_counts, long_tail_indices, ordered_counts, profile_counts, step_counts
from tailaug.errors import DataError

# --------------------------------------------------------------------------- oracle sizes


@pytest.mark.parametrize(
    "n_max, num_classes, imbalance_factor, total",
    [
        (5000, 10, 100, 12406),  # CIFAR-10-LT
        (5000, 10, 50, 13996),
        (5000, 10, 10, 20431),
        (500, 100, 100, 10847),  # CIFAR-100-LT
        (500, 100, 50, 12608),
        (500, 100, 10, 19573),
        (6000, 10, 100, 14886),  # Fashion-MNIST-LT
    ],
)
def test_published_long_tail_sizes(n_max, num_classes, imbalance_factor, total):
    counts = profile_counts("exponential", n_max, num_classes, imbalance_factor)
    assert counts == exponential_counts(n_max, num_classes, imbalance_factor)
    assert sum(counts) == total
    assert len(counts) == num_classes
    assert counts[0] == n_max
    assert counts[-1] == int(n_max / imbalance_factor)
    assert all(a >= b for a, b in zip(counts, counts[1:]))


def test_fashion_mnist_lt_counts():
    assert exponential_counts(6000, 10, 100) == [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]


def test_exponential_formula_by_hand():
    # n_c = int(n_max * (1/IF) ** (c / (C-1))); C=3, IF=4: 100, int(100 * 0.5) = 50, int(100 / 4) = 25
    assert exponential_counts(100, 3, 4) == [100, 50, 25]
    # IF 1 keeps the set balanced
    assert exponential_counts(7, 4, 1) == [7, 7, 7, 7]
    # a single class is n_max (no division by C-1 = 0)
    assert exponential_counts(9, 1, 10) == [9]


def test_cifar10_lt_if100_counts():
    assert exponential_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


# --------------------------------------------------------------------------- step profile


def test_step_profile_by_hand():
    assert step_counts(500, 10, 10) == [500] * 5 + [50] * 5
    # odd C: the first floor(C/2) classes are the head; int() truncates 7/2 = 3.5
    assert step_counts(7, 5, 2) == [7, 7, 3, 3, 3]
    assert profile_counts("step", 1000, 4, 100) == [1000, 1000, 10, 10]


def test_none_profile_is_balanced():
    assert profile_counts("none", 12, 3, 100) == [12, 12, 12]


def test_unknown_profile():
    with pytest.raises(DataError, match="unknown profile 'zipf'; use exponential, step or none"):
        profile_counts("zipf", 10, 3, 2)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("func", [exponential_counts, step_counts])
def test_imbalance_factor_below_one(func):
    with pytest.raises(DataError) as info:
        func(100, 10, 0.5)
    msg = str(info.value)
    assert "imbalance factor 0.5 is below 1" in msg
    assert "use a value >= 1" in msg


@pytest.mark.parametrize("profile", ["exponential", "step"])
def test_imbalance_factor_below_one_via_profile_counts(profile):
    with pytest.raises(DataError, match="imbalance factor 0.5 is below 1"):
        profile_counts(profile, 100, 10, 0.5)


def test_class_left_without_samples_step():
    with pytest.raises(DataError) as info:
        profile_counts("step", 50, 10, 100)
    msg = str(info.value)
    assert "the step profile with n_max=50 and imbalance factor 100" in msg
    assert "class(es) [5, 6, 7, 8, 9] with no samples" in msg
    assert "lower data.imbalance_factor (at most 50) or raise data.n_max" in msg


def test_class_left_without_samples_exponential():
    # int(50 * 0.01 ** (8/9)) = int(0.84...) = 0 and int(50 / 100) = 0
    with pytest.raises(DataError, match=r"class\(es\) \[8, 9\] with no samples"):
        profile_counts("exponential", 50, 10, 100)


@pytest.mark.parametrize("n_max, limit", [(49, 48), (50, 50)])
def test_no_samples_hint_names_the_largest_factor_that_works(n_max, limit):
    # 49 * (1/49) ** 1 = 0.99999... so int() empties the last class at IF = n_max = 49
    with pytest.raises(DataError, match=rf"at most {limit}\)"):
        profile_counts("exponential", n_max, 10, 1000)
    assert min(profile_counts("exponential", n_max, 10, limit)) == 1
    with pytest.raises(DataError, match="no samples"):
        profile_counts("exponential", n_max, 10, limit + 1)


def test_non_positive_sizes():
    with pytest.raises(DataError, match="must be positive"):
        exponential_counts(0, 10, 10)
    with pytest.raises(DataError, match="must be positive"):
        step_counts(10, 0, 10)


# --------------------------------------------------------------------------- subset draw


def _labels() -> np.ndarray:
    """A small label array with the classes interleaved: 6, 5 and 7 images of classes 0, 1, 2."""
    labels = np.repeat(np.arange(3), [6, 5, 7])
    return labels[np.random.RandomState(123).permutation(len(labels))]


def _by_hand(labels: np.ndarray, counts: list[int], seed: int) -> np.ndarray:
    """The protocol written differently: one RandomState, classes in order, permute, keep the first n_c."""
    rng = np.random.RandomState(seed)
    out: list[int] = []
    for c, n_c in enumerate(counts):
        out.extend(rng.permutation(np.flatnonzero(labels == c))[:n_c].tolist())
    return np.array(out)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_long_tail_indices_matches_hand_protocol(seed):
    labels, counts = _labels(), [5, 3, 1]
    got = long_tail_indices(labels, counts, seed)
    np.testing.assert_array_equal(got, _by_hand(labels, counts, seed))


def test_long_tail_indices_keeps_n_c_of_each_class_without_repeats():
    labels, counts = _labels(), [6, 2, 1]
    idx = long_tail_indices(labels, counts, 0)
    assert len(idx) == 9 == len(set(idx.tolist()))
    assert np.bincount(labels[idx], minlength=3).tolist() == counts
    # grouped by class, in class order
    assert labels[idx].tolist() == [0] * 6 + [1] * 2 + [2]


def test_long_tail_indices_is_deterministic_and_seeded():
    labels = np.repeat(np.arange(4), 50)
    counts = [50, 20, 8, 3]
    a = long_tail_indices(labels, counts, 0)
    b = long_tail_indices(labels, counts, 0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, long_tail_indices(labels, counts, 1))
    # the whole class is kept when n_c is its size: a permutation of its indices
    assert sorted(a[:50].tolist()) == list(range(50))
    # RandomState(0) stream: class 0 is shuffled first, so its first kept index is fixed
    rng = np.random.RandomState(0)
    first = np.arange(50)
    rng.shuffle(first)
    np.testing.assert_array_equal(a[:50], first)


def test_long_tail_indices_does_not_touch_global_numpy_state():
    np.random.seed(5)
    expected = np.random.rand()
    np.random.seed(5)
    long_tail_indices(np.repeat(np.arange(3), 10), [10, 5, 2], 0)
    assert np.random.rand() == expected


def test_long_tail_indices_too_few_images():
    labels = np.array([0, 0, 1])
    with pytest.raises(DataError) as info:
        long_tail_indices(labels, [2, 2], 0)
    msg = str(info.value)
    assert "class 1 has 1 images but the profile asks for 2" in msg
    assert "lower data.n_max" in msg


def test_long_tail_indices_empty_counts():
    assert long_tail_indices(np.array([0, 1]), [], 0).tolist() == []


# --------------------------------------------------------------------------- planned counts


@pytest.mark.parametrize(
    "dataset, imbalance_factor, total",
    [("cifar10", 100, 12406), ("cifar10", 10, 20431), ("cifar100", 100, 10847), ("cifar100", 50, 12608),
     ("fashion_mnist", 100, 14886)],
)
def test_planned_counts_without_data(tmp_path, dataset, imbalance_factor, total):
    cfg = DataConfig(dataset=dataset, imbalance_factor=imbalance_factor, root=str(tmp_path / "empty"))
    counts = planned_counts(cfg)
    assert sum(counts) == total
    assert len(counts) == NUM_CLASSES[dataset]
    assert counts[0] == BALANCED_SIZE[dataset]
    assert not (tmp_path / "empty").exists()  # nothing was downloaded or created


def test_planned_counts_cifar10_exact():
    counts = planned_counts(DataConfig(dataset="cifar10", imbalance_factor=100))
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_planned_counts_n_max_and_step():
    cfg = DataConfig(dataset="cifar10", profile="step", imbalance_factor=10, n_max=1000)
    assert planned_counts(cfg) == [1000] * 5 + [100] * 5
    assert planned_counts(DataConfig(dataset="cifar100", profile="none")) == [500] * 100


def test_planned_counts_validation_hold_out():
    # val is drawn from the images the LT draw left unused (BALANCED_SIZE - n_c of them); only class 0
    # (5000 of 5000 used) gives up its 10 from the LT subset, class 9 has 4950 unused
    cfg = DataConfig(dataset="cifar10", imbalance_factor=100, val_per_class=10)
    assert planned_counts(cfg) == [4990, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    cfg = DataConfig(dataset="cifar10", imbalance_factor=100, val_per_class=10, n_max=4995)
    assert planned_counts(cfg)[0] == 4990  # 5 unused + 5 taken from the subset


def test_planned_counts_bad_profile_is_a_data_error():
    with pytest.raises(DataError, match="no samples"):
        planned_counts(DataConfig(dataset="cifar100", profile="step", imbalance_factor=600))


def test_planned_counts_image_folder(tmp_path):
    lines = []
    for i, label in enumerate([0, 0, 0, 1, 2, 2]):
        (tmp_path / f"{i}.png").touch()
        lines.append(f"{i}.png {label}")
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(dataset="image_folder", root=str(tmp_path), train_split="train.txt", test_split="train.txt",
                     num_classes=4)
    assert planned_counts(cfg) == [3, 1, 2, 0]


# --------------------------------------------------------------------------- class order

HARD_TAIL = [1, 8, 9, 5, 7, 3, 0, 2, 4, 6]  # Trouser, Bag, Ankle boot, ... Coat, Shirt


def test_ordered_counts_gives_count_i_to_class_order_i():
    assert ordered_counts([100, 50, 25], [2, 0, 1]) == [50, 25, 100]
    assert ordered_counts([100, 50, 25], None) == [100, 50, 25]
    assert ordered_counts([100, 50, 25], [0, 1, 2]) == [100, 50, 25]


def test_hard_tail_order_on_fashion_mnist_lt():
    counts = planned_counts(DataConfig(dataset="fashion_mnist", imbalance_factor=100, class_order=HARD_TAIL))
    # profile counts 6000 3596 2156 1292 774 464 278 166 100 60, given to classes 1 8 9 5 7 3 0 2 4 6
    assert counts == [278, 6000, 166, 464, 100, 1292, 60, 774, 3596, 2156]
    assert counts[1] == 6000 and counts[4] == 100 and counts[6] == 60  # Trouser, Coat, Shirt
    assert sum(counts) == 14886
    # the validation split takes from the unused images; Trouser (6000 of 6000 used) gives up its own
    with_val = planned_counts(DataConfig(dataset="fashion_mnist", class_order=HARD_TAIL, val_per_class=20))
    assert with_val == [278, 5980, 166, 464, 100, 1292, 60, 774, 3596, 2156]


@pytest.mark.parametrize("order, problem", [
    ([0, 1], "has 2 entries for 3 classes; leaves out class 2"),
    ([0, 1, 1], "lists class 1 more than once; leaves out class 2"),
    ([0, 1, 3], "names class 3 outside 0..2; leaves out class 2"),
    ([2, 0, 1, 0], "has 4 entries for 3 classes; lists class 0 more than once"),
])
def test_a_bad_class_order_is_a_data_error_when_the_data_is_built(order, problem):
    with pytest.raises(DataError) as info:
        ordered_counts([100, 50, 25], order)
    assert str(info.value) == (f"data.class_order {problem}; list each class 0..2 exactly once "
                               "(profile count i goes to class class_order[i])")


def _fashion_mnist(tmp_path, **data):
    from synthetic import write_fashion_mnist

    root = tmp_path / "fm"
    if not root.exists():
        write_fashion_mnist(root, per_class_train=100, per_class_test=2)
    return DataConfig(dataset="fashion_mnist", root=str(root), n_max=100, imbalance_factor=10, **data)


def test_build_data_draws_the_protocol_subset_for_the_default_order(tmp_path):
    from tailaug.data.datasets import build_data

    default = build_data(_fashion_mnist(tmp_path))
    identity = build_data(_fashion_mnist(tmp_path, class_order=list(range(10))))
    assert default.class_counts == exponential_counts(100, 10, 10) == identity.class_counts
    assert torch.equal(default.train.images, identity.train.images)
    np.testing.assert_array_equal(default.train.labels, identity.train.labels)


def test_build_data_gives_each_class_its_count_of_the_order(tmp_path):
    from tailaug.data.datasets import build_data

    order = [3, 9, 0, 7, 1, 8, 2, 6, 4, 5]
    default = build_data(_fashion_mnist(tmp_path))
    data = build_data(_fashion_mnist(tmp_path, class_order=order))
    profile = exponential_counts(100, 10, 10)
    assert data.class_counts == [profile[order.index(c)] for c in range(10)]
    assert data.class_counts == planned_counts(_fashion_mnist(tmp_path, class_order=order))
    # the draw visits the classes 0..C-1 as the protocol does and shuffles each class the same
    # way whatever its count, so the larger of two counts keeps the images of the smaller one
    for c in range(10):
        a = default.train.images[torch.from_numpy(default.train.labels == c)]
        b = data.train.images[torch.from_numpy(data.train.labels == c)]
        short, long = (a, b) if len(a) <= len(b) else (b, a)
        assert torch.equal(long[: len(short)], short)
