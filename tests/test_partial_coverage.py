"""coverage, and the all-valid maps a partial conv caches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from maskparam import partial
from maskparam.apply import set_mask
from maskparam.partial import coverage
from tests.partial_helpers import PLUS, TYPE_A, masked, reference

# -- coverage -----------------------------------------------------------------------------


def test_coverage_counts_entries_with_multi_channel_validity() -> None:
    conv = masked(nn.Conv2d(3, 2, 3, padding=1), PLUS, "partial")
    validity = torch.ones(1, 3, 4, 4, dtype=torch.bool)
    validity[:, 0] = False
    cov_multi = coverage(conv, validity)
    cov_single = coverage(conv, torch.ones(1, 1, 4, 4, dtype=torch.bool))
    assert cov_multi[0, 0, 1, 1] == 5 * 2  # the cross, in 2 of 3 valid channels
    assert cov_single[0, 0, 1, 1] == 5
    assert cov_single[0, 0, 0, 0] == 3
    assert cov_multi.dtype == torch.float32
    assert coverage(conv.double(), validity).dtype == torch.float64


def test_coverage_stays_exact_under_autocast() -> None:
    conv = nn.Conv2d(257, 1, 1)
    validity = torch.ones(1, 257, 2, 2, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        counts = coverage(conv, validity)  # 257 is not a bfloat16
        pconv = masked(nn.Conv2d(257, 1, 1), torch.ones(1, 1), "partial")
        out = pconv(torch.randn(1, 257, 2, 2))
    assert torch.equal(counts, torch.full((1, 1, 2, 2), 257.0))
    assert out.dtype == torch.bfloat16


# -- caching the all-valid maps -----------------------------------------------------------


def counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = partial._coverage

    def spy(*args: object, **kwargs: object) -> partial._Coverage:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(partial, "_coverage", spy)
    return calls


def test_cache_reuses_maps_and_follows_mask_shape_and_dtype(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = counting(monkeypatch)
    conv = masked(nn.Conv2d(2, 3, 3, padding=1), PLUS, "partial")
    x = torch.randn(1, 2, 5, 5)
    first = conv(x)
    assert torch.equal(conv(x), first)
    assert len(calls) == 1

    set_mask(conv, TYPE_A)
    expected, _, _ = reference(conv, x, None, "partial")
    torch.testing.assert_close(conv(x), expected)
    assert len(calls) == 2

    with torch.no_grad():
        conv.parametrizations.weight[0].mask[0, 0] = False  # in place
    torch.testing.assert_close(conv(x), reference(conv, x, None, "partial")[0])

    torch.testing.assert_close(conv(x[..., :4]), reference(conv, x[..., :4], None, "partial")[0])
    conv.double()
    out = conv(x.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference(conv, x.double(), None, "partial")[0])
    assert len(calls) == 5


def test_cache_filled_in_inference_mode_still_trains() -> None:
    conv = masked(nn.Conv2d(2, 3, 3, padding=1), PLUS, "partial")
    x = torch.randn(1, 2, 5, 5)
    with torch.inference_mode():
        conv(x)
    conv(x).sum().backward()
    assert conv.bias.grad is not None
