"""torch.distributed helpers that are no-ops in a single process."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the gradient of its own slice (summed over ranks)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, ...]:
        gathered = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, x.contiguous())
        return tuple(gathered)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> Tensor:
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (``(B, ...)``) from all ranks along dim 0, keeping gradients for the local part.

    SimCLR/MoCo use it so every GPU's embeddings are negatives for every other (Chen et al. 2020).
    Returns ``x`` unchanged in a single process.
    """
    if not is_distributed() or world_size() == 1:
        return x
    return torch.cat(_GatherWithGrad.apply(x), dim=0)
