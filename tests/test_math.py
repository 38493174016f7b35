"""Tests for trainer.model.math: symlog, two-hot regression (docs/tdmpc2.md#two-hot) and RunningScale
(docs/tdmpc2.md#running-scale)."""

import math

import pytest
import torch

from trainer.model.math import RunningScale, soft_ce, symexp, symlog, two_hot, two_hot_inv


def test_symlog_symexp_are_inverse():
    x = torch.tensor([-1e4, -3.0, -0.5, 0.0, 0.25, 7.0, 2e4])
    assert torch.allclose(symexp(symlog(x)), x, rtol=1e-5)
    assert symlog(torch.tensor([math.e - 1])).item() == pytest.approx(1.0)


def test_two_hot_places_mass_on_two_neighbouring_bins():
    x = symexp(torch.tensor([[0.0], [0.1], [-9.9], [3.33]]))
    th = two_hot(x)
    assert th.shape == (4, 101)
    assert torch.allclose(th.sum(-1), torch.ones(4))
    assert th[0, 50] == 1.0  # y = 0 sits exactly on bin 50
    assert th[1, 50] == pytest.approx(0.5, abs=1e-4)  # y = 0.1: halfway between 50 and 51
    assert th[1, 51] == pytest.approx(0.5, abs=1e-4)
    assert th[2, 0] == pytest.approx(0.5, abs=1e-4)
    assert th[2, 1] == pytest.approx(0.5, abs=1e-4)
    assert (th > 0).sum(-1).le(2).all()


def test_two_hot_wraps_around_at_the_top_of_the_range():
    th = two_hot(torch.tensor([[1e9], [-1e9]]))  # clamped to y = 10 and y = -10
    assert th[0, 100] == 1.0
    assert th[0, 0] == 0.0  # the (i + 1) mod 101 neighbour gets weight 0
    assert th[1, 0] == 1.0


def test_two_hot_round_trip():
    x = torch.linspace(-500.0, 500.0, 257).unsqueeze(1)
    back = two_hot_inv(torch.log(two_hot(x)))
    assert torch.allclose(back, x, rtol=1e-4, atol=1e-4)


def test_two_hot_inv_of_zero_logits_is_zero():
    out = two_hot_inv(torch.zeros(3, 5, 101))
    assert out.shape == (3, 5, 1)
    assert torch.all(out.abs() < 1e-6)


def test_soft_ce_of_zero_logits_is_ln_101():
    loss = soft_ce(torch.zeros(6, 101), torch.tensor([[0.0], [1.0], [-2.0], [50.0], [1e6], [0.3]]))
    assert loss.shape == (6, 1)
    assert torch.allclose(loss, torch.full((6, 1), math.log(101)))


def test_soft_ce_is_smallest_at_the_target():
    target = torch.tensor([[2.5]])
    near = 10 * two_hot(target)
    far = 10 * two_hot(torch.tensor([[-2.5]]))
    assert soft_ce(near, target) < soft_ce(torch.zeros(1, 101), target) < soft_ce(far, target)


def test_running_scale_tracks_the_percentile_spread():
    scale = RunningScale(tau=0.01)
    assert scale.value.item() == 1.0
    x = torch.arange(21, dtype=torch.float32).unsqueeze(1) * 10  # P5 = 10, P95 = 190
    scale.update(x)
    expected = 1.0 + 0.01 * (180.0 - 1.0)
    assert scale.value.item() == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(scale(torch.tensor([expected])), torch.ones(1))


def test_running_scale_percentiles_interpolate_linearly():
    scale = RunningScale()
    x = torch.randn(37, 1)
    ours = scale._percentile(x)
    ref = torch.quantile(x, torch.tensor([0.05, 0.95]), dim=0)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_running_scale_spread_is_clamped_at_one():
    scale = RunningScale(tau=0.5)
    scale.value.fill_(3.0)
    scale.update(torch.zeros(8, 1))
    assert scale.value.item() == pytest.approx(2.0)
