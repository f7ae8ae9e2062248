"""Tensors sharded over the processes by FSDP2 (DTensors), seen whole or in parts: gathered whole for rank 0 to
write, a whole tensor read from a file placed as a parameter is sharded, stacks of equally shaped matrices for Muon.
Without FSDP every one of these returns its tensor as it is."""

from __future__ import annotations

import sys

import torch

from potion.parallel.world import is_main


def is_sharded(tensor) -> bool:
    if "torch.distributed.tensor" not in sys.modules:  # no DTensor can exist yet, and importing it takes seconds
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (sharing its memory, outside autograd), or the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole on every rank (a collective: every rank calls it, in the same order)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def whole_on_main(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank 0: every tensor whole, on the CPU, ready to be written; the other ranks take part and get {}."""
    gathered = {}
    for name, value in tensors.items():
        value = whole(value)
        if is_main():
            gathered[name] = value.detach().cpu()
    return gathered


def placed_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A whole tensor read from a file, as `like` holds it: this rank's shard when `like` is sharded. Every rank
    read the same file, so each takes its part without sending anything."""
    if not is_sharded(like):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def stacked_whole(parts: list[torch.Tensor], like: list[torch.Tensor]) -> torch.Tensor:
    """The whole matrices of equally shaped sharded parameters, stacked (k, m, n): one all-gather for all."""
    stacked = torch.stack(parts)
    if not is_sharded(like[0]):
        return stacked
    from torch.distributed.tensor import DTensor

    first = like[0]
    shape, placements = (len(like), *first.shape), stacked_placements(first)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(stacked, first.device_mesh, placements, shape=shape, stride=stride).full_tensor()


def stacked_parts(full: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each rank's part of stacked whole matrices (k, m, n), as the parameters in `like` are sharded."""
    if not is_sharded(like[0]):
        return list(full.unbind(0))
    from torch.distributed.tensor import distribute_tensor

    first = like[0]
    mine = distribute_tensor(full, first.device_mesh, stacked_placements(first), src_data_rank=None)
    return list(mine.to_local().unbind(0))


def stacked_placements(like) -> tuple:
    """A parameter's placements, for a stack of such parameters (one dimension in front)."""
    from torch.distributed.tensor import Shard

    return tuple(Shard(p.dim + 1) if isinstance(p, Shard) else p for p in like.placements)
