"""Exact tests of the layer-wise distributions and the capped proportional allocator."""
import math

import pytest

from granet.sparsity.distributions import allocate_counts, layer_counts


def test_allocate_counts_hand_worked_with_capacity():
    # weights 1:1:2, total 8. Unconstrained shares would be 2, 2, 4; bin 2 holds only 3, so it is
    # filled and the remaining 5 split 1:1 between bins 0 and 1 as 2.5/2.5 -> largest remainder
    # ties go to the lower index: 3, 2, 3.
    assert allocate_counts(8, [1.0, 1.0, 2.0], [10, 10, 3]) == [3, 2, 3]


def test_allocate_counts_exact_sum_and_caps():
    weights = [0.3, 5.0, 1.7, 0.0, 2.2]
    caps = [7, 3, 11, 5, 100]
    for total in range(0, sum(caps) + 1):
        counts = allocate_counts(total, weights, caps)
        assert sum(counts) == total
        assert all(0 <= c <= cap for c, cap in zip(counts, caps))


def test_allocate_counts_rejects_impossible_totals():
    with pytest.raises(ValueError, match="capacity"):
        allocate_counts(11, [1.0, 1.0], [5, 5])
    with pytest.raises(ValueError):
        allocate_counts(-1, [1.0], [5])


def test_uniform_counts_equal_density():
    shapes = [(10, 10), (20, 5, 3, 3), (7, 13)]
    counts = layer_counts("uniform", shapes, 0.5)
    sizes = [math.prod(s) for s in shapes]
    assert sum(counts) == round(0.5 * sum(sizes))
    for c, n in zip(counts, sizes):
        assert abs(c - 0.5 * n) <= 1


def test_erk_hand_worked_two_layers():
    # Linear (out=2, in=2): raw = (2+2)/(2*2) = 1.0, size 4.
    # Linear (out=100, in=100): raw = 200/10000 = 0.02, size 10000.
    # density 0.1 -> budget round(0.1 * 10004) = 1000. eps*(1*4 + 0.02*10000) = 1000 gives eps = 4.9
    # so the small layer would get density 4.9 > 1: it is made dense (4) and the big layer gets 996.
    assert layer_counts("erk", [(2, 2), (100, 100)], 0.1) == [4, 996]


def test_er_ignores_kernel_dims_erk_uses_them():
    shapes = [(16, 3, 3, 3), (32, 16, 3, 3), (10, 32)]
    er = layer_counts("er", shapes, 0.3)
    erk = layer_counts("erk", shapes, 0.3)
    assert sum(er) == sum(erk) == round(0.3 * sum(math.prod(s) for s in shapes))
    assert er != erk


@pytest.mark.parametrize("density", [0.01, 0.05, 0.1, 0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("kind", ["uniform", "er", "erk"])
def test_distribution_totals_exact_and_capped(kind, density):
    shapes = [(64, 3, 7, 7), (64, 64, 1, 1), (64, 64, 3, 3), (256, 64, 1, 1), (1000, 2048), (4, 4)]
    counts = layer_counts(kind, shapes, density)
    sizes = [math.prod(s) for s in shapes]
    assert sum(counts) == round(density * sum(sizes))
    assert all(0 <= c <= n for c, n in zip(counts, sizes))


def test_erk_power_scale_zero_is_uniform():
    shapes = [(8, 4, 3, 3), (16, 8, 3, 3), (10, 16)]
    assert layer_counts("erk", shapes, 0.25, power_scale=0.0) == layer_counts("uniform", shapes, 0.25)


def test_bad_distribution_and_density():
    with pytest.raises(ValueError, match="unknown distribution"):
        layer_counts("gaussian", [(2, 2)], 0.5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        layer_counts("erk", [(2, 2)], 0.0)
