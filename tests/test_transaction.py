"""All or nothing under faults: every mutating call completes or leaves the model as it was.

The fault injector traces the call line by line (maskparam's own code and torch's
parametrize) and raises at the n-th line, for every n the call passes through, once with an
exception and once with KeyboardInterrupt. After each failure the model must match a
snapshot taken before the call (classes and the properties on them, parameter objects and
their order, what each attribute reads, buffers, hooks and state_dict), or the snapshot of a
finished call, and it must still run forward, backward and ``state_dict``.

The fast tier injects at every few lines; the slow tier at every line.
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import torch
from torch import nn

import maskparam
from maskparam import (
    FixedMask,
    _module_class,
    apply_mask,
    apply_masks,
    get_mask,
    masks,
    remove_mask,
    remove_masks,
    set_mask,
)
from tests.helpers import run_python

PLUS = masks.cross(3, ndim=2)
TRACED = (
    str(Path(maskparam.__file__).parent),
    os.path.join("torch", "nn", "utils", "parametrize"),
)
UNTRACED = ("_transaction.py",)  # the rollback itself runs only after the fault


@pytest.fixture(params=[31, pytest.param(1, marks=pytest.mark.slow, id="every-line")])
def every(request: pytest.FixtureRequest) -> int:
    """Fail at every n-th traced line: every few in the fast tier, every one in the slow."""
    return int(request.param)


def _whole_model(every: int) -> int:
    """The stride for calls over a whole model, which pass many more lines."""
    return every if every == 1 else every * 4


class Injected(Exception):
    pass


def _model(**options: Any) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3), nn.Conv1d(1, 1, 3)
    )
    model[2].register_forward_hook(lambda *args: None)
    return model


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a failed call must leave as it was."""
    state = {}
    for name, module in model.named_modules():
        state[f"{name}:class"] = type(module)
        state[f"{name}:params"] = [(n, id(p)) for n, p in module.named_parameters(recurse=False)]
        state[f"{name}:buffers"] = [(n, id(b)) for n, b in module.named_buffers(recurse=False)]
        for hooks in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_load_state_dict_post_hooks",
            "_state_dict_hooks",
            "_load_state_dict_pre_hooks",
        ):
            state[f"{name}:{hooks}"] = list(getattr(module, hooks))
        state[f"{name}:attrs"] = sorted(k for k in vars(module) if k.startswith("_maskparam"))
        cls = type(module)
        state[f"{name}:properties"] = sorted(
            key
            for klass in cls.__mro__
            for key, value in vars(klass).items()
            if isinstance(value, property) and issubclass(klass, nn.Module)
        )
        state[f"{name}:reads"] = {
            key: _read(module, key)
            for key in ("weight", "bias")
            if key in state[f"{name}:properties"] or key in module._parameters
        }
    state["named_parameters"] = [(n, id(p)) for n, p in model.named_parameters()]
    state["state_dict"] = {k: v.clone() for k, v in model.state_dict().items()}
    state["storage"] = [p.data_ptr() for p in model.parameters()]
    return state


def _read(module: nn.Module, name: str) -> object:
    """What ``module.<name>`` reads: a tensor's values, or the error reading it raises."""
    try:
        value = getattr(module, name)
    except AttributeError as err:
        return f"AttributeError: {err}"
    return None if value is None else tuple(value.detach().flatten().tolist())


def assert_usable(model: nn.Module) -> None:
    """The model runs forward and backward and gives its state_dict."""
    torch.manual_seed(1)
    out = model[2](model[1](model[0](torch.randn(1, 2, 5, 5)))).sum()
    out = out + model[3](torch.randn(1, 1, 5)).sum()
    out.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.zero_grad()
    assert model.state_dict()


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before.keys() == after.keys()
    for key in before:
        if key == "state_dict":
            assert before[key].keys() == after[key].keys()
            for name, value in before[key].items():
                assert torch.equal(value, after[key][name]), name
        else:
            assert before[key] == after[key], key


def _count_lines(call: Callable[[], object]) -> int:
    count = 0

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal count
        if not _traced(frame):
            return None
        if event == "line":
            count += 1
        return tracer

    previous = sys.gettrace()  # coverage's, under pytest --cov
    sys.settrace(tracer)
    try:
        call()
    finally:
        sys.settrace(previous)
    return count


def _traced(frame: FrameType) -> bool:
    # Garbage-collection callbacks (maskparam names them on_free) run at any moment, and
    # Python reports and ignores what they raise: faults there test nothing of the call.
    filename = frame.f_code.co_filename
    return (
        any(part in filename for part in TRACED)
        and not filename.endswith(UNTRACED)
        and frame.f_code.co_name != "on_free"
    )


def _fail_at(n: int, error: type[BaseException], call: Callable[[], object]) -> bool:
    """Run ``call``, raising ``error`` at its n-th traced line; whether it was raised."""
    seen = 0
    fired = False

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal seen, fired
        if fired or not _traced(frame):
            return None
        if event == "line":
            seen += 1
            if seen == n:
                fired = True
                raise error("injected")
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        call()
    except error:
        pass
    finally:
        sys.settrace(previous)
    return fired


def _every_step(
    setup: Callable[[], nn.Module], call: Callable[[nn.Module], object], stride: int = 1
) -> None:
    """Fail at every traced line; the model must be as before, or as a finished call leaves it.

    A fault after the last change (at the ``return``, say) reaches the caller although the
    call is complete: the model is then exactly as a successful call leaves it.
    """
    done = setup()
    lines = _count_lines(lambda: call(done))
    assert lines > 20  # the tracer really sees the call
    finished = _shape(snapshot(done))
    for error in (Injected, KeyboardInterrupt):
        for n in range(1, lines + 1, stride):
            model = setup()
            before = snapshot(model)
            if _fail_at(n, error, lambda m=model: call(m)):
                after = snapshot(model)
                if _shape(after) != finished:
                    assert_same(before, after)
                assert_usable(model)


def _shape(state: dict[str, Any]) -> dict[str, Any]:
    """A snapshot with object ids and hook ids left out, to compare two models' states."""
    shaped: dict[str, Any] = {}
    for key, value in state.items():
        if key.endswith(":class"):
            shaped[key] = [cls.__name__ for cls in value.__mro__]
        elif key.endswith((":params", ":buffers")) or key == "named_parameters":
            shaped[key] = [name for name, _ in value]
        elif key == "state_dict":
            shaped[key] = {k: (v.dtype, v.shape, v.tolist()) for k, v in value.items()}
        elif key.endswith(":reads"):
            shaped[key] = {
                k: v if isinstance(v, str) or v is None else len(v) for k, v in value.items()
            }
        elif key != "storage":
            shaped[key] = len(value) if isinstance(value, list) and "hooks" in key else value
    return shaped


def _masked(**options: Any) -> Callable[[], nn.Module]:
    def setup() -> nn.Module:
        model = _model()
        apply_masks(model, PLUS, include=nn.Conv2d, **options)
        apply_mask(model[3], [1, 0, 1])
        return model

    return setup


# execution="taps" plans its blocks inside the call: many more lines, so the slow tier only.
TAPS = pytest.param({"execution": "taps"}, marks=pytest.mark.slow)
OPTIONS = [{}, {"bias_mode": "channel"}, {"bias_mode": "valid"}, TAPS]


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_apply_mask_is_all_or_nothing(options: dict[str, Any], every: int) -> None:
    _every_step(_model, lambda m: apply_mask(m[0], PLUS, **options), stride=every)


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_apply_masks_is_all_or_nothing(options: dict[str, Any], every: int) -> None:
    _every_step(
        _model, lambda m: apply_masks(m, PLUS, include=nn.Conv2d, **options), _whole_model(every)
    )


REMOVABLE = [{}, {"bias_mode": "channel"}, {"bias_mode": "zero"}, TAPS]


@pytest.mark.parametrize("bake", [True, False])
@pytest.mark.parametrize("options", REMOVABLE, ids=str)
def test_remove_mask_is_all_or_nothing(options: dict[str, Any], bake: bool, every: int) -> None:
    _every_step(_masked(**options), lambda m: remove_mask(m[0], bake=bake), stride=every)


@pytest.mark.parametrize("bake", [True, False])
def test_remove_masks_is_all_or_nothing(bake: bool, every: int) -> None:
    _every_step(
        _masked(bias_mode="channel"), lambda m: remove_masks(m, bake=bake), _whole_model(every)
    )


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_set_mask_is_all_or_nothing(options: dict[str, Any], every: int) -> None:
    _every_step(_masked(**options), lambda m: set_mask(m[0], torch.eye(3)), stride=every)


def _bias_masked_too() -> nn.Module:
    model = _masked()()
    apply_mask(model[0], [1, 0, 1], name="bias")
    return model


@pytest.mark.parametrize("bake", [True, False])
def test_removing_one_of_two_masks_is_all_or_nothing(bake: bool, every: int) -> None:
    _every_step(_bias_masked_too, lambda m: remove_mask(m[0], name="bias", bake=bake), every)


def test_masking_the_bias_of_a_masked_layer_is_all_or_nothing(every: int) -> None:
    _every_step(_masked(), lambda m: apply_mask(m[0], [1, 0, 1], name="bias"), every)


def test_an_interrupted_load_keeps_bias_masks_following_their_weight(every: int) -> None:
    # load_state_dict copies tensor after tensor, so it is not all or nothing; but a channel
    # bias mask must always match its weight's mask, and the model must keep working.
    source = _masked(bias_mode="channel")()
    empty_filter = PLUS.expand(3, 2, 3, 3).clone()
    empty_filter[1] = False
    set_mask(source[0], empty_filter)
    checkpoint = source.state_dict()
    lines = _count_lines(lambda: _masked(bias_mode="channel")().load_state_dict(checkpoint))
    assert lines > 20
    for error in (Injected, KeyboardInterrupt):
        for n in range(1, lines + 1, every):
            model = _masked(bias_mode="channel")()
            if not _fail_at(n, error, lambda m=model: m.load_state_dict(checkpoint)):
                continue
            weight_mask = get_mask(model[0]).expand(3, 2, 3, 3)
            bias_mask = model[0].parametrizations.bias[0].mask
            assert torch.equal(bias_mask, weight_mask.flatten(1).any(1)), n
            assert_usable(model)


def test_a_failure_on_the_second_layer_of_remove_masks_leaves_all_masked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _masked()()
    before = snapshot(model)
    real = torch.nn.utils.parametrize.remove_parametrizations
    calls = []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils.parametrize, "remove_parametrizations", flaky)
    with pytest.raises(KeyboardInterrupt):
        remove_masks(model)
    assert_same(before, snapshot(model))


def test_remove_mask_keeps_parameter_order_and_identity() -> None:
    for bake in (True, False):
        conv = nn.Conv2d(1, 2, 3)
        before = [(n, id(p)) for n, p in conv.named_parameters()]
        apply_mask(conv, PLUS, bias_mode="channel")
        remove_mask(conv, bake=bake)
        assert [(n, id(p)) for n, p in conv.named_parameters()] == before
        norm = nn.LayerNorm(4)
        before = [(n, id(p)) for n, p in norm.named_parameters()]
        apply_mask(norm, [1, 0, 1, 1])
        remove_mask(norm, bake=bake)
        assert [(n, id(p)) for n, p in norm.named_parameters()] == before


def test_optimizer_state_saved_before_masking_loads_after_unmasking() -> None:
    norm = nn.LayerNorm(4)
    with torch.no_grad():
        norm.bias.fill_(1.0)
    opt = torch.optim.SGD(norm.parameters(), lr=0.1, momentum=0.9)
    norm(torch.randn(3, 4)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    apply_mask(norm, [1, 0, 1, 1])
    remove_mask(norm, bake=False)
    fresh = torch.optim.SGD(norm.parameters(), lr=0.1, momentum=0.9)
    fresh.load_state_dict(saved)
    for param in norm.parameters():
        assert torch.equal(
            fresh.state[param]["momentum_buffer"], opt.state[param]["momentum_buffer"]
        )


@pytest.mark.slow
def test_sigint_in_the_middle_leaves_the_model_fully_masked_or_not_at_all() -> None:
    # A real SIGINT, sent by a thread at a random moment while the main thread masks and
    # unmasks a model in a loop. Each KeyboardInterrupt must find the model consistent.
    script = textwrap.dedent(
        """
        import os, random, signal, threading, time
        import torch
        from torch import nn
        from maskparam import apply_masks, is_masked, masks, remove_masks

        random.seed(0)
        model = nn.Sequential(*[nn.Conv2d(4, 4, 3) for _ in range(12)])
        interrupts = 0
        for round in range(60):
            timer = threading.Timer(random.uniform(0, 0.004),
                                    lambda: os.kill(os.getpid(), signal.SIGINT))
            try:
                timer.start()
                for _ in range(50):
                    apply_masks(model, masks.cross(3, ndim=2), include=nn.Conv2d,
                                bias_mode="channel")
                    remove_masks(model, bake=False)
                timer.join()
                time.sleep(0.05)  # a signal not yet delivered lands here, inside the try
            except KeyboardInterrupt:
                interrupts += 1
            timer.join()
            state = {is_masked(layer) for layer in model}
            assert len(state) == 1, f"half masked: {state}"
            if state == {True}:
                remove_masks(model)
            assert all(type(layer) is nn.Conv2d for layer in model)
            names = [n for n, _ in model.named_parameters()]
            assert names == [f"{i}.{p}" for i in range(12) for p in ("weight", "bias")], names
        print("interrupts", interrupts)
        """
    )
    words = run_python(script)
    assert int(words[-1]) > 30  # the signals really landed inside the calls


def test_sigint_is_held_only_in_the_main_thread() -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            model = _model()
            apply_masks(model, PLUS, include=nn.Conv2d)
            remove_masks(model)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert not errors
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_an_alarm_at_random_moments_of_remove_masks_leaves_every_layer_working() -> None:
    # A signal handler that raises (SIGALRM) at a random moment of remove_masks over 50
    # convs: each model must still read its weights, run forward and backward, and save.
    script = textwrap.dedent(
        """
        import random, signal
        import torch
        from torch import nn
        from maskparam import apply_masks, masks, remove_masks

        class Alarm(Exception):
            pass

        def handler(*args):
            raise Alarm()

        signal.signal(signal.SIGALRM, handler)
        random.seed(0)
        interrupted = 0
        for trial in range(60):
            model = nn.Sequential(*[nn.Conv2d(4, 4, 3) for _ in range(50)])
            bias_mode = random.choice(["keep", "channel", "zero"])
            apply_masks(model, masks.cross(3, ndim=2), include=nn.Conv2d, bias_mode=bias_mode)
            signal.setitimer(signal.ITIMER_REAL, random.uniform(0, 0.02))
            try:
                remove_masks(model, bake=random.choice([True, False]))
            except Alarm:
                interrupted += 1
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            x = torch.randn(1, 4, 5, 5)
            for layer in model:
                assert layer.weight is not None and layer.bias is not None
                layer(x).sum().backward()
            assert model.state_dict()
        print("interrupted", interrupted)
        """
    )
    words = run_python(script)
    assert int(words[-1]) > 10  # the alarms really landed inside the calls


def test_a_failure_while_a_load_changes_masks_puts_every_mask_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _masked(bias_mode="channel")()
    source = _masked(bias_mode="channel")()
    empty_filter = PLUS.expand(3, 2, 3, 3).clone()
    empty_filter[1] = False
    set_mask(source[0], empty_filter)
    checkpoint = source.state_dict()
    weight_mask = model[0].parametrizations.weight[0].mask
    bias_mask = model[0].parametrizations.bias[0].mask
    real = FixedMask.set_mask
    calls = []

    def flaky(self: FixedMask, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 2:  # the weight's mask is in; the bias's fails
            raise MemoryError("injected")
        real(self, *args, **kwargs)

    monkeypatch.setattr(FixedMask, "set_mask", flaky)
    with pytest.raises(MemoryError):
        model.load_state_dict(checkpoint)
    assert model[0].parametrizations.weight[0].mask is weight_mask
    assert model[0].parametrizations.bias[0].mask is bias_mask
    assert_usable(model)


def test_a_failure_after_parametrize_added_a_property_takes_it_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _masked()()
    cls = type(model[0])

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(_module_class, "adopt", fail)
    with pytest.raises(RuntimeError, match="injected"):
        apply_mask(model[0], [1, 0, 1], name="bias")  # parametrize adds "bias" to cls first
    assert type(model[0]) is cls
    assert "bias" not in vars(cls)
    assert "bias" in model[0]._parameters
    assert_usable(model)
