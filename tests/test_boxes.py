"""The box decomposition: a mask's active taps split exactly into dense blocks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given

from maskparam.taps import Box, decompose, spatial_support
from maskparam.taps import boxes as boxes_module
from tests.strategies import (
    bool_masks,
)
from tests.tap_helpers import (
    PLUS,
    ball,
    causal_type_a,
    covered,
    cross3d,
)

# -- decomposition ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mask", "sizes"),
    [
        (cross3d(), [3, 2, 2]),
        (ball(2), [27, 2, 2, 2]),
        (causal_type_a(), [21, 3]),
        (PLUS, [3, 2]),
        (torch.tensor([1, 0, 0, 0, 1, 0, 0, 0, 1]), [3]),
        (torch.ones(3, 3, 3), [27]),
    ],
    ids=["cross3d", "ball2", "causal7", "plus", "dilated1d", "full"],
)
def test_decompose_shaped_kernels(mask: torch.Tensor, sizes: list[int]) -> None:
    boxes = decompose(mask.bool())
    assert boxes is not None
    assert [b.size for b in boxes] == sizes
    assert sorted(covered(boxes)) == sorted(map(tuple, mask.nonzero().tolist()))


def test_decompose_cross_is_three_lines() -> None:
    boxes = decompose(cross3d())
    assert boxes == (
        Box(start=(0, 1, 1), count=(3, 1, 1), step=(1, 1, 1)),
        Box(start=(1, 0, 1), count=(1, 2, 1), step=(1, 2, 1)),
        Box(start=(1, 1, 0), count=(1, 1, 2), step=(1, 1, 2)),
    )


@given(mask=bool_masks(max_dims=3, max_side=5))
def test_decompose_is_exact_and_disjoint(mask: torch.Tensor) -> None:
    boxes = decompose(mask, max_boxes=200)
    assert boxes is not None
    taps_ = covered(boxes)
    assert len(taps_) == len(set(taps_)), "boxes overlap"
    assert set(taps_) == {tuple(t) for t in mask.nonzero().tolist()}
    assert [b.size for b in boxes] == sorted((b.size for b in boxes), reverse=True)
    for box in boxes:
        assert all(s >= 1 and c >= 1 for s, c in zip(box.step, box.count, strict=False))
        assert all(
            a >= 0 and a + (c - 1) * q < k
            for a, c, q, k in zip(box.start, box.count, box.step, mask.shape, strict=False)
        )


def test_decompose_empty_and_too_many() -> None:
    assert decompose(torch.zeros(3, 3, dtype=torch.bool)) == ()
    checker = (torch.arange(9).reshape(3, 3) % 2 == 0) & ~PLUS  # the 4 corners
    assert len(decompose(checker)) == 1  # one box with step 2 on both axes
    assert decompose(torch.tensor([1, 1, 0, 1, 0, 0, 0, 1], dtype=torch.bool), max_boxes=1) is None


def test_decompose_gives_up_on_irregular_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(boxes_module, "_SEARCH_BUDGET", 50)
    mask = torch.rand(5, 5, 5, generator=torch.Generator().manual_seed(0)) < 0.5
    assert decompose(mask) is None


def test_spatial_support_is_union_over_channels() -> None:
    mask = torch.zeros(2, 3, 3, 3, dtype=torch.bool)
    mask[0, 1, 0, 0] = True
    mask[1, 2, 2, 1] = True
    support = spatial_support(mask, (2, 3, 3, 3))
    assert support.device.type == "cpu"
    assert support.nonzero().tolist() == [[0, 0], [2, 1]]
    assert spatial_support(torch.ones(2, 1, 1, 1, dtype=torch.bool), (2, 3, 3, 3)).all()
