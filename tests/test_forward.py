"""The conv-forward override that bias modes and executions install: only when an option
needs it, and kept through deepcopy, pickling and subclassing."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from maskparam import _forward, _module_class, apply_mask, remove_mask

PLUS = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)


def _with_override(conv: nn.Module) -> nn.Module:
    conv.__dict__[_forward.EXECUTION_ATTR] = "dense"
    _module_class.adopt(conv)
    return conv


def test_override_installed_only_when_an_option_is_set() -> None:
    plain = apply_mask(nn.Conv2d(1, 2, 3), PLUS)
    assert "_conv_forward" not in type(plain).__dict__
    conv = _with_override(apply_mask(nn.Conv2d(1, 2, 3), PLUS))
    assert type(conv).__dict__["_conv_forward"] is _forward.conv_forward
    assert not _forward.needs_override(
        _with_override(apply_mask(nn.ConvTranspose2d(1, 1, 3), PLUS))
    )


def test_override_survives_deepcopy_and_pickle_and_goes_with_remove() -> None:
    conv = _with_override(apply_mask(nn.Conv2d(1, 2, 3), PLUS))
    x = torch.randn(1, 1, 5, 5)
    twin = copy.deepcopy(conv)
    assert "_conv_forward" in type(twin).__dict__
    buf = io.BytesIO()
    torch.save(conv, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert "_conv_forward" in type(loaded).__dict__
    assert torch.equal(loaded(x), conv(x))
    remove_mask(conv)
    assert type(conv) is nn.Conv2d
    assert _forward.EXECUTION_ATTR not in conv.__dict__


class _Wrapper:
    """Stands in for FSDP2's FSDPModule, which fully_shard puts first among the bases."""


@pytest.mark.parametrize("execution", ["dense", "taps"])
def test_override_survives_a_wrapper_that_subclasses_the_class_again(execution: str) -> None:
    conv = apply_mask(nn.Conv2d(2, 2, 3, padding=1), PLUS, execution=execution)  # type: ignore[arg-type]
    if execution == "dense":
        _with_override(conv)  # the override's own dense path
    x = torch.randn(1, 2, 5, 5)
    expected = conv(x)
    conv.__class__ = type("FSDPConv2d", (_Wrapper, type(conv)), {})
    torch.testing.assert_close(conv(x), expected)
