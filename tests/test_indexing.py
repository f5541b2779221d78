"""engine.indexing.pick: advanced indexing's values, with a backward that repeats bit for bit."""

import torch

from tailaug.engine.indexing import pick


def test_pick_gives_the_rows_of_advanced_indexing_for_any_index_shape():
    values = torch.arange(24.0).view(6, 4)
    for index in (torch.tensor([5, 0, 0, 3]), torch.tensor([[1, 2], [2, 1], [0, 0]])):
        assert torch.equal(pick(values, index), values[index])


def test_pick_backward_sums_repeated_rows_and_repeats_exactly():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(50, 33, generator=g, requires_grad=True)
    index = torch.randint(0, 50, (4000,), generator=g)
    weights = torch.randn(4000, 33, generator=g)
    grads = []
    for _ in range(3):
        values.grad = None
        (pick(values, index) * weights).sum().backward()
        grads.append(values.grad.clone())
    expected = torch.zeros(50, 33).index_add_(0, index, weights)
    torch.testing.assert_close(grads[0], expected)
    assert all(torch.equal(grads[0], other) for other in grads[1:])
