"""Schedule endpoints and update-step grids."""
import math

import pytest

from granet.sparsity.schedules import DropFractionSchedule, PruningSchedule


def test_cubic_endpoints_and_midpoint():
    s = PruningSchedule(init_density=1.0, final_density=0.1, start=100, end=1100, interval=100)
    assert s.density(0) == 1.0
    assert s.density(100) == 1.0
    assert s.density(1100) == pytest.approx(0.1, abs=0)
    assert s.density(5000) == 0.1
    # Half-way: d_f + (d_i - d_f) * 0.5**3
    assert s.density(600) == pytest.approx(0.1 + 0.9 * 0.125)


def test_prune_steps_cover_tf_even_off_grid():
    s = PruningSchedule(init_density=1.0, final_density=0.2, start=0, end=250, interval=100)
    steps = [t for t in range(0, 400) if s.is_prune_step(t)]
    assert steps == [100, 200, 250]


def test_pruning_schedule_validation():
    with pytest.raises(ValueError, match="t0=5 >= tf=5"):
        PruningSchedule(1.0, 0.1, 5, 5, 10)
    with pytest.raises(ValueError, match="above the initial"):
        PruningSchedule(0.5, 0.6, 0, 10, 1)


def test_cosine_drop_fraction_endpoints():
    s = DropFractionSchedule(initial=0.5, final=0.005, start=0, end=1000, interval=100)
    assert s.fraction(0) == pytest.approx(0.5)
    assert s.fraction(1000) == pytest.approx(0.005)
    assert s.fraction(500) == pytest.approx(0.005 + 0.5 * 0.495 * (1 + math.cos(math.pi / 2)))
    assert [t for t in range(0, 1200) if s.is_update_step(t)] == list(range(100, 1000, 100))


def test_constant_drop_fraction_and_zero_disables():
    s = DropFractionSchedule(initial=0.3, final=0.0, start=0, end=500, interval=50, decay="constant")
    assert s.fraction(0) == s.fraction(499) == 0.3
    off = DropFractionSchedule(initial=0.0, final=0.0, start=0, end=500, interval=50)
    assert not any(off.is_update_step(t) for t in range(600))
