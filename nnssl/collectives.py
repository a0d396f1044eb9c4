"""torch.distributed helpers that are no-ops in a single process: this process's rank, the world size, and a
gather that keeps gradients. Loss maths (nnssl.losses) and the pretraining loop both use them."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (``(B, ...)``) from all ranks along dim 0, keeping gradients for the local part
    (``torch.distributed.nn.functional.all_gather``: its backward sends each rank the summed gradient of its
    own slice).

    SimCLR/MoCo use it so every GPU's embeddings are negatives for every other (Chen et al. 2020).
    Returns ``x`` unchanged in a single process.
    """
    if world_size() == 1:
        return x
    return torch.cat(dist_autograd.all_gather(x), dim=0)
