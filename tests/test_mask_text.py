"""The text form of a mask: round trips, layout, leniency and errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given

from maskparam.masks import from_text, to_text
from tests.strategies import bool_masks


@given(mask=bool_masks())
def test_text_round_trip(mask: torch.Tensor) -> None:
    text = to_text(mask)
    assert set(text) <= {"#", ".", "\n"}
    assert torch.equal(from_text(text, ndim=mask.dim()), mask)
    # Without ndim, leading sizes of 1 are not in the text: (1, 1, 3) reads back as (3,).
    shape = list(mask.shape)
    while len(shape) > 1 and shape[0] == 1:
        shape.pop(0)
    assert torch.equal(from_text(text), mask.reshape(shape))
    if mask.shape[0] > 1:
        assert torch.equal(from_text(text), mask)


def test_text_layout() -> None:
    mask = torch.tensor([[[1, 0], [0, 0]], [[0, 1], [1, 1]]], dtype=torch.bool)
    assert to_text(mask) == "#.\n..\n\n.#\n##"
    assert to_text(mask[1]) == ".#\n##"
    assert to_text(mask[1, 1]) == "##"
    assert to_text(torch.tensor([0, 1, 1])) == ".##"  # 0/1 numbers are fine


def test_from_text_is_lenient_about_whitespace() -> None:
    text = """

        #.
        ..


        .#
        ##

    """
    expected = torch.tensor([[[1, 0], [0, 0]], [[0, 1], [1, 1]]], dtype=torch.bool)
    assert torch.equal(from_text(text), expected)
    assert from_text("  .#.  ").shape == (3,)


def test_from_text_ndim_adds_leading_axes() -> None:
    assert from_text("#.#", ndim=3).shape == (1, 1, 3)
    assert from_text("#.\n.#", ndim=3).shape == (1, 2, 2)
    assert from_text("#.\n.#\n\n..\n..", ndim=3).shape == (2, 2, 2)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("#.#\n#x#", r"'#' \(active\) and '\.' \(off\) only\. Got 'x' at line 2, column 2"),
        ("#.# #", r"Got ' ' at line 1, column 4"),
        ("1 0 1", r"Got '1' at line 1, column 1"),
        ("#.#\n##", r"rows of equal length\. Got 3 characters at line 1 and 2 at line 2"),
        (
            "#.\n\n.#\n##",
            r"slices .* of equal height\. Got 1 rows .* and 2 in the block at line 3",
        ),
        ("", "at least one row"),
        ("\n  \n", "at least one row"),
    ],
)
def test_from_text_exception(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        from_text(text)


def test_from_text_ndim_exception() -> None:
    with pytest.raises(ValueError, match=r"from_text\(ndim=1\) expects text of at most 1 dims"):
        from_text("#.\n.#", ndim=1)
    with pytest.raises(ValueError, match=r"at most 2 dims\. Got 2 slices"):
        from_text("#\n\n.", ndim=2)
    for ndim in (0, 4, True, 2.0):
        with pytest.raises(ValueError, match="ndim to be 1, 2, 3 or None"):
            from_text("#", ndim=ndim)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"from_text expects the mask as a str\. Got bytes"):
        from_text(b"#.#")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("mask", "error", "match"),
    [
        (torch.tensor(True), ValueError, r"1 to 3 dims.*Got shape=\(\)"),
        (torch.ones(1, 1, 1, 1, dtype=torch.bool), ValueError, r"Got shape=\(1, 1, 1, 1\)"),
        (torch.ones(2, 0, dtype=torch.bool), ValueError, r"at least 1\. Got shape=\(2, 0\)"),
        (torch.tensor([0, 2]), ValueError, "values are all 0 or 1"),
        (object(), TypeError, "to_text expects the mask as a tensor"),
    ],
)
def test_to_text_exception(mask: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        to_text(mask)
