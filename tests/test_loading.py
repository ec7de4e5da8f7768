"""Loading masked models the ways large pretrained models are really built and loaded.

Meta-device construction, ``to_empty``, ``load_state_dict`` with ``assign=True`` and
``strict=False``, checkpoints of other dtypes and of maskparam 0.1: the masks come out exact
and the values under them are never lost.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from maskparam import apply_mask, apply_masks, get_mask, masks, remove_mask, remove_masks

PLUS = masks.cross(3, ndim=2)
CORNERS = ~PLUS


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1), nn.Flatten()
    )


def _conv_masks(model: nn.Module) -> list[torch.Tensor]:
    return [
        m.parametrizations.weight[0].mask
        for m in model.modules()
        if hasattr(m, "parametrizations")
    ]


def _meta_net(**options: object) -> nn.Sequential:
    with torch.device("meta"):
        model = _net()
    apply_masks(model, PLUS, include=nn.Conv2d, **options)  # type: ignore[arg-type]
    return model


OPTIONS = [
    {},
    {"bias_mode": "zero"},
    {"bias_mode": "channel"},
    {"bias_mode": "valid"},
    {"execution": "taps"},
]


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_to_empty_keeps_the_masks_exactly(options: dict[str, object]) -> None:
    model = _meta_net(**options)
    for _ in range(3):  # uninitialised memory differs between tries: check a few
        model.to_empty(device="cpu")
        for mask in _conv_masks(model):
            assert mask.device.type == "cpu"
            assert torch.equal(mask, PLUS)
        for layer in (model[0], model[2]):
            assert torch.equal(get_mask(layer), PLUS)


def test_get_mask_of_a_meta_model_has_values() -> None:
    model = _meta_net()
    assert torch.equal(get_mask(model[0]), PLUS)


@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("checkpoint", ["plain", "masked"])
@pytest.mark.parametrize("route", ["to_empty", "assign"])
def test_meta_model_loads_like_a_model_built_normally(
    options: dict[str, object], checkpoint: str, route: str
) -> None:
    pretrained = _net()
    reference = copy.deepcopy(pretrained)
    if checkpoint == "masked":
        # The checkpoint's masks differ from the meta model's: they must win.
        apply_masks(pretrained, CORNERS | torch.eye(3, dtype=torch.bool), include=nn.Conv2d)
        apply_masks(reference, CORNERS | torch.eye(3, dtype=torch.bool), include=nn.Conv2d)
        remove_masks(reference)
        apply_masks(
            reference, CORNERS | torch.eye(3, dtype=torch.bool), include=nn.Conv2d, **options
        )  # type: ignore[arg-type]
    else:
        apply_masks(reference, PLUS, include=nn.Conv2d, **options)  # type: ignore[arg-type]
    state = pretrained.state_dict()
    model = _meta_net(**options)
    if route == "to_empty":
        model.to_empty(device="cpu")
        model.load_state_dict(state, strict=True)
    else:
        model.load_state_dict(state, strict=True, assign=True)
    for tensor in [*model.parameters(), *model.buffers()]:
        assert tensor.device.type == "cpu"
    x = torch.randn(2, 2, 5, 5)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-6)
    for got, want in zip(_conv_masks(model), _conv_masks(reference), strict=True):
        assert torch.equal(got, want)
    # The values under the masks are the checkpoint's, for bake=False.
    remove_masks(model, bake=False)
    stored = _plain(pretrained)
    assert model.state_dict().keys() == stored.keys()
    for name, value in model.state_dict().items():
        assert torch.equal(value, stored[name]), name


def _plain(model: nn.Module) -> dict[str, torch.Tensor]:
    """The values a model stores, masked or not, under plain keys."""
    out = {}
    for key, value in model.state_dict().items():
        if key.endswith(".mask"):
            continue
        out[key.replace("parametrizations.", "").replace(".original", "")] = value
    return out


def test_reset_parameters_reinitialises_the_stored_weights() -> None:
    with torch.device("meta"):
        conv = nn.Conv2d(4, 8, 3)
    apply_mask(conv, PLUS, bias_mode="channel")
    conv.to_empty(device="cpu")
    with torch.no_grad():
        conv.parametrizations.weight.original.fill_(float("nan"))
        conv.parametrizations.bias.original.fill_(float("nan"))
    conv.reset_parameters()
    stored = conv.parametrizations.weight.original
    assert torch.isfinite(stored).all()
    bound = 1 / (4 * 9) ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in = 36
    assert stored.abs().max() <= bound
    assert stored.std() > bound / 4  # really random, not zero
    assert torch.isfinite(conv.parametrizations.bias.original).all()
    assert (conv.weight[:, :, ~PLUS] == 0).all()
    assert type(conv).__name__ == "ParametrizedConv2d"
    assert [n for n, _ in conv.named_parameters()] == [
        "parametrizations.weight.original",
        "parametrizations.bias.original",
    ]


def test_plain_checkpoint_under_strict_false_keeps_values_under_new_masks() -> None:
    pretrained = nn.Conv2d(1, 2, 3)
    conv = apply_mask(nn.Conv2d(1, 2, 3), PLUS)
    conv.load_state_dict(pretrained.state_dict(), strict=False)
    remove_mask(conv, bake=False)
    assert torch.equal(conv.weight, pretrained.weight)


def test_masked_checkpoint_without_hidden_values_keeps_them_in_the_original() -> None:
    # A checkpoint whose mask switches off more taps than the module's: the stored values
    # at the newly masked taps come from the checkpoint's original.
    source = apply_mask(nn.Conv2d(1, 2, 3), torch.ones(3, 3))
    stored = source.parametrizations.weight.original.detach().clone()
    state = source.state_dict()
    state["parametrizations.weight.0.mask"] = PLUS
    conv = apply_mask(nn.Conv2d(1, 2, 3), torch.ones(3, 3))
    conv.load_state_dict(state, strict=False)
    assert torch.equal(get_mask(conv), PLUS)
    remove_mask(conv, bake=False)
    assert torch.equal(conv.weight.detach(), stored)


def test_legacy_checkpoint_with_hidden_values_gives_them_back() -> None:
    # maskparam 0.1 saved the values a mask hides as extra state, and the original had
    # drifted under weight decay at those taps.
    pretrained = torch.randn(2, 1, 3, 3)
    drifted = torch.where(PLUS, pretrained, pretrained * 0.5)
    legacy = {
        "bias": torch.zeros(2),
        "parametrizations.weight.original": drifted,
        "parametrizations.weight.0.mask": PLUS,
        "parametrizations.weight.0._extra_state": torch.where(PLUS, 0, pretrained),
    }
    conv = apply_mask(nn.Conv2d(1, 2, 3), torch.ones(3, 3))
    conv.load_state_dict(legacy, strict=True)
    assert torch.equal(get_mask(conv), PLUS)
    assert "parametrizations.weight.0._extra_state" not in conv.state_dict()
    remove_mask(conv, bake=False)
    assert torch.equal(conv.weight.detach(), pretrained)


@pytest.mark.parametrize(
    ("source_dtype", "model_dtype"),
    [
        (torch.float64, torch.float32),
        (torch.float32, torch.float16),
        (torch.float32, torch.bfloat16),
    ],
)
def test_checkpoint_of_another_dtype(source_dtype: torch.dtype, model_dtype: torch.dtype) -> None:
    source = apply_mask(nn.Conv2d(1, 2, 3).to(source_dtype), CORNERS)
    conv = apply_mask(nn.Conv2d(1, 2, 3), PLUS).to(model_dtype)
    conv.load_state_dict(source.state_dict())
    original = conv.parametrizations.weight.original
    assert original.dtype == model_dtype
    assert torch.equal(get_mask(conv), CORNERS)
    # A later assignment is still stored, in the parameter's dtype.
    conv.weight = torch.arange(18.0).reshape(2, 1, 3, 3).to(model_dtype)
    remove_mask(conv, bake=False)
    assert torch.equal(
        conv.weight.detach(), torch.arange(18.0).reshape(2, 1, 3, 3).to(model_dtype)
    )


def test_weight_assignment_does_not_alias_the_callers_tensor() -> None:
    conv = apply_mask(nn.Conv1d(1, 1, 3, bias=False), [1, 0, 1])
    mine = torch.tensor([[[4.0, 5.0, 6.0]]])
    conv.weight = mine
    opt = torch.optim.SGD(conv.parameters(), lr=0.5)
    conv(torch.ones(1, 1, 3)).sum().backward()
    opt.step()
    remove_mask(conv, bake=False)
    assert torch.equal(mine, torch.tensor([[[4.0, 5.0, 6.0]]]))
    assert conv.weight.data_ptr() != mine.data_ptr()


def test_bias_channel_follows_a_mask_that_arrives_by_load_state_dict() -> None:
    source = apply_mask(nn.Conv2d(1, 2, 3), PLUS)
    state = source.state_dict()
    per_channel = torch.ones(2, 1, 1, 1, dtype=torch.bool)
    per_channel[1] = False  # every tap of channel 1 off
    state["parametrizations.weight.0.mask"] = per_channel
    conv = apply_mask(nn.Conv2d(1, 2, 3), PLUS, bias_mode="channel")
    with torch.no_grad():
        conv.parametrizations.bias.original.fill_(3.0)
    conv.load_state_dict(state, strict=False)
    out = conv(torch.randn(1, 1, 5, 5))
    assert (out[:, 1] == 0).all()  # not the bias
    assert torch.equal(conv.bias.detach(), torch.tensor([source.bias[0].item(), 0.0]))


def test_bias_zero_ignores_a_checkpoints_bias_mask() -> None:
    source = apply_mask(nn.Conv2d(1, 2, 3), PLUS, bias_mode="channel")
    conv = apply_mask(nn.Conv2d(1, 2, 3), PLUS, bias_mode="zero")
    conv.load_state_dict(source.state_dict(), strict=True)
    assert (conv.bias == 0).all()


def test_inference_mode_apply_then_train() -> None:
    model = _net()
    with torch.inference_mode():
        apply_masks(model, PLUS, include=nn.Conv2d, bias_mode="channel")
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    model(torch.randn(2, 2, 5, 5)).square().mean().backward()
    opt.step()
    assert (model[0].weight[:, :, ~PLUS] == 0).all()


@pytest.mark.parametrize("kind", ["sparse", "nested", "complex", "meta"])
def test_masks_without_plain_values_are_refused(kind: str) -> None:
    mask = {
        "sparse": lambda: PLUS.to_sparse(),
        "nested": lambda: torch.nested.nested_tensor([PLUS.float()]),
        "complex": lambda: PLUS.to(torch.complex64),
        "meta": lambda: PLUS.to("meta"),
    }[kind]()
    conv = nn.Conv2d(1, 1, 3)
    error = ValueError if kind == "meta" else TypeError
    with pytest.raises(
        error,
        match={
            "sparse": "dense",
            "nested": "dense",
            "complex": "bool mask",
            "meta": "meta device",
        }[kind],
    ):
        apply_mask(conv, mask)
    assert type(conv) is nn.Conv2d


def test_bias_channel_on_zero_output_channels_is_refused() -> None:
    conv = nn.Conv2d(1, 0, 3)
    with pytest.raises(ValueError, match="at least one output channel"):
        apply_mask(conv, PLUS, bias_mode="channel")
    assert type(conv) is nn.Conv2d


@pytest.mark.parametrize("bake", ["no", 0, 1, None])
def test_bake_must_be_a_bool(bake: object) -> None:
    conv = apply_mask(nn.Conv2d(1, 1, 3), PLUS)
    with pytest.raises(TypeError, match="bake to be True"):
        remove_mask(conv, bake=bake)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bake to be True"):
        remove_masks(nn.Sequential(conv), bake=bake)  # type: ignore[arg-type]
    assert type(conv).__name__ == "ParametrizedConv2d"


@pytest.mark.parametrize("bias_mode", ["keep", "zero", "channel", "valid", "partial"])
@pytest.mark.parametrize("execution", ["dense", "taps", "auto"])
def test_zero_input_channels_work_where_the_plain_conv_does(
    bias_mode: str, execution: str
) -> None:
    conv = nn.Conv2d(0, 2, 3, padding=1)
    x = torch.randn(1, 0, 4, 4)
    expected = conv(x)
    try:
        apply_mask(conv, PLUS, bias_mode=bias_mode, execution=execution)  # type: ignore[arg-type]
    except ValueError:
        return  # refused when applied, never in forward
    out = conv(x)
    assert out.shape == expected.shape
    assert torch.isfinite(out).all()


def test_legacy_pickle_with_hidden_values_gives_them_back(tmp_path: object) -> None:
    # maskparam 0.1 pickled FixedMask.hidden: the values the mask hid, zero at kept taps,
    # while the original had drifted there.
    import io

    conv = apply_mask(nn.Conv2d(1, 2, 3), PLUS)
    pretrained = torch.randn(2, 1, 3, 3)
    with torch.no_grad():
        conv.parametrizations.weight.original.copy_(torch.where(PLUS, pretrained, 0.5))
    fixed = conv.parametrizations.weight[0]
    fixed.__dict__["hidden"] = torch.where(PLUS, 0, pretrained)
    buffer = io.BytesIO()
    torch.save(conv, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert "hidden" not in vars(loaded.parametrizations.weight[0])
    assert torch.equal(loaded.parametrizations.weight.original, pretrained)
    remove_mask(loaded, bake=False)
    assert torch.equal(loaded.weight.detach(), pretrained)
