"""Every use of torch internals in maskparam, in one place, each with why and since when.

maskparam depends on ``torch>=2.13``. Each shim below names the torch release it was written
against; ``tests/test_compat.py`` checks each one, so a torch release that changes one
fails there, loudly, rather than somewhere deep in a forward.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["local_shard"]


def local_shard(full: Tensor, like: Tensor) -> Tensor:
    """The part of ``full`` (global-shaped, or broadcasting to it) this rank holds of ``like``.

    Why: an optimizer step writes a sharded parameter through its local shard, and the
    values to keep under a mask must be cut the same way. DTensor has no public call for
    the offset of the local shard. Since torch 2.13:
    ``torch.distributed.tensor._utils.compute_local_shape_and_global_offset``.
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        like.shape,
        like.device_mesh,  # type: ignore[attr-defined]
        like.placements,  # type: ignore[attr-defined]
    )
    # ``full`` may broadcast (size 1 where ``like`` is larger): those dims are not cut.
    full = full.reshape((1,) * (len(shape) - full.dim()) + tuple(full.shape))
    index = tuple(
        slice(None) if whole == 1 else slice(start, start + size)
        for whole, start, size in zip(full.shape, offset, shape, strict=True)
    )
    return full[index]
