"""The pixel-level contract (pixeldefend.pixels): one convention for levels <-> floats."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixeldefend.errors import DataError, UsageError
from pixeldefend.pixels import (
    ball_levels,
    check_images,
    check_levels,
    clip_to_ball,
    from_8bit,
    quantise,
    straight_through_round,
    to_8bit,
    to_float,
    to_levels,
)


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_float_level_round_trip_is_exact(levels):
    q = torch.arange(levels, dtype=torch.uint8).view(1, 1, 1, -1)
    assert torch.equal(to_levels(to_float(q, levels), levels), q)
    assert float(to_float(q, levels).max()) == 1.0


def test_to_levels_rounds_and_clamps():
    x = torch.tensor([-0.5, 0.03, 0.04, 1.7])
    assert to_levels(x, 17).tolist() == [0, 0, 1, 16]


def test_straight_through_round_is_identity_backward():
    x = torch.tensor([0.26, 0.9], requires_grad=True)
    y = straight_through_round(x, 5)
    assert y.tolist() == [0.25, 1.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0]


def test_eps_ball_in_levels_and_floats():
    assert ball_levels(2 / 16, 17) == 2 and ball_levels(8 / 255, 17) == 0
    clean = torch.tensor([[[[3, 0, 16]]]], dtype=torch.uint8)
    adv = torch.tensor([[[[1.0, 0.5, -1.0]]]])
    assert quantise(adv, clean, 17, 2).flatten().tolist() == [5, 2, 14]
    centre = torch.tensor([0.5, 0.0])
    assert clip_to_ball(torch.tensor([0.9, -0.3]), centre, 0.1).tolist() == \
        pytest.approx([0.6, 0.0])


def test_checks_name_the_problem():
    with pytest.raises(DataError, match="uint8"):
        check_images(torch.zeros(1, 1, 2, 2), 17)
    with pytest.raises(DataError, match=r"\[0, 16\]"):
        check_images(torch.full((1, 1, 2, 2), 17, dtype=torch.uint8), 17)
    with pytest.raises(DataError, match="N, C, H, W"):
        check_images(torch.zeros(2, 2, dtype=torch.uint8), 17)
    with pytest.raises(UsageError):
        check_levels(1)
    assert check_levels(256) == 256


def test_8bit_mapping_round_trips():
    for levels in (2, 17, 256):
        v = np.arange(levels, dtype=np.uint8)
        assert np.array_equal(from_8bit(to_8bit(v, levels), levels), v)
