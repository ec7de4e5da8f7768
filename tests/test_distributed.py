"""Masked models under DDP and FSDP2: two CPU processes talking over gloo.

Each test spawns two processes (a few seconds each). A worker checks what it can see on its
own rank and saves its weights; the test then compares them with one process that trained
the same model on both ranks' data.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from maskparam.apply import apply_mask, get_mask
from maskparam.checkpoint import bake_state_dict
from maskparam.model import apply_masks

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(),
        reason="needs torch.distributed with the gloo backend",
    ),
]

PLUS = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
WORLD = 2
STEPS = 3


def build() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1), nn.Flatten()
    )
    apply_masks(model, {"0": PLUS})
    element = torch.rand(2, 4, 3, 3) > 0.5
    element[1] = False  # Output channel 1 keeps no tap: bias_mode="channel" holds its bias.
    apply_mask(model[2], element, bias_mode="channel")
    return model


def batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(100 + rank)
    return [
        (torch.randn(2, 2, 5, 5, generator=gen), torch.randn(2, 50, generator=gen))
        for _ in range(STEPS)
    ]


def train(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for x, y in data:
        loss = (model(x) - y).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def reference() -> nn.Sequential:
    """One process, both ranks' samples in each batch: what DDP and FSDP must reproduce."""
    model = build()
    per_rank = [batches(rank) for rank in range(WORLD)]
    joined = [
        (
            torch.cat([data[i][0] for data in per_rank]),
            torch.cat([data[i][1] for data in per_rank]),
        )
        for i in range(STEPS)
    ]
    train(model, joined)
    return model


def assert_masked_taps_zero(model: nn.Module) -> None:
    for layer in (model[0], model[2]):
        full = get_mask(layer).expand(layer.weight.shape)
        assert torch.all(layer.weight[~full] == 0)
    assert model[2].bias[1].item() == 0.0


def init_group(init: str, rank: int) -> None:
    # A bounded wait: a rank that fails leaves the other one waiting at most this long.
    timeout = timedelta(seconds=60)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD, timeout=timeout)


def run(worker: Callable[[int, str, str], None], tmp_path: Path) -> None:
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_entry, args=(worker, init, str(tmp_path)), nprocs=WORLD, join=True)


def _entry(rank: int, worker: Callable[[int, str, str], None], init: str, folder: str) -> None:
    """Run ``worker``, then leave the process at once.

    A process that used gloo can abort while it shuts down, in a C++ destructor ("terminate
    called without an active exception"), after its worker has done and saved everything:
    rarely, but often enough under load to fail a test. ``os._exit`` skips that teardown. A
    worker that raises still fails the test as before.
    """
    worker(rank, init, folder)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def compare_with_reference(state: dict[str, torch.Tensor]) -> None:
    expected = reference().state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.equal(
        state["0.parametrizations.weight.original"],
        build().state_dict()["0.parametrizations.weight.original"],
    )


# -- DDP ---------------------------------------------------------------------------------------


def _ddp_worker(rank: int, init: str, folder: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    init_group(init, rank)
    try:
        model = build()
        ddp = DistributedDataParallel(model)
        train(ddp, batches(rank))
        assert_masked_taps_zero(model)
        for key, value in model.state_dict().items():
            everyone = [torch.empty_like(value) for _ in range(WORLD)]
            dist.all_gather(everyone, value)
            assert all(torch.equal(other, value) for other in everyone), key
        torch.save(model.state_dict(), Path(folder) / f"ddp{rank}.pt")
        dist.barrier()
        del ddp  # Before the process group goes: its reducer still holds it.
    finally:
        dist.destroy_process_group()


def test_ddp_trains_a_masked_model(tmp_path: Path) -> None:
    run(_ddp_worker, tmp_path)
    states = [torch.load(tmp_path / f"ddp{rank}.pt") for rank in range(WORLD)]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    compare_with_reference(states[0])


# -- FSDP2 -------------------------------------------------------------------------------------


def _fsdp_worker(rank: int, init: str, folder: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    init_group(init, rank)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        model = build()
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        train(model, batches(rank))

        # Outside forward the originals are shards (DTensors): unshard to read the weights.
        for layer in (model[0], model[2]):
            layer.unshard()  # type: ignore[operator]
        assert_masked_taps_zero(model)
        for layer in (model[0], model[2]):
            layer.reshard()  # type: ignore[operator]

        sharded = model.state_dict()
        with pytest.raises(ValueError, match="sharded as a DTensor"):
            bake_state_dict(sharded)
        model.load_state_dict(sharded)  # A masked model's load, under FSDP's classes too.

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(model, options=options)
        if rank == 0:
            torch.save(full, Path(folder) / "fsdp.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp2_fully_shard_trains_a_masked_model(tmp_path: Path) -> None:
    run(_fsdp_worker, tmp_path)
    state = torch.load(tmp_path / "fsdp.pt")
    compare_with_reference(state)
    # Weight decay reached every shard, yet the values under the masks are as built.
    initial = build()
    for name in ("0", "2"):
        key = f"{name}.parametrizations.weight.original"
        off = ~get_mask(initial.get_submodule(name)).expand(state[key].shape)
        assert torch.equal(state[key][off], initial.state_dict()[key][off])
    plain = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1), nn.Flatten()
    )
    plain.load_state_dict(bake_state_dict(state), strict=True)
    masked = build()
    masked.load_state_dict(state, strict=True)
    x = torch.randn(2, 2, 5, 5)
    assert torch.equal(plain(x), masked(x))
