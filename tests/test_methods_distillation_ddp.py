"""DINO/iBOT/SMIT centers under DDP: every rank gets the EMA of the mean over all ranks' teacher outputs
(2 gloo processes on CPU). Kept apart so the spawned processes import only torch and the losses."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnssl.losses.distillation import updated_center

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, logits: torch.Tensor, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        rows = logits.shape[0] // WORLD
        torch.save(updated_center(torch.ones(logits.shape[1]), logits[rank * rows:(rank + 1) * rows], 0.9),
                   out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_center_update_averages_over_all_ranks(tmp_path):
    logits = torch.arange(12.0).reshape(4, 3)  # rank 0 holds rows 0-1, rank 1 rows 2-3; mean (4.5, 5.5, 6.5)
    mp.spawn(_worker, args=(_free_port(), logits, tmp_path), nprocs=WORLD)
    expected = 0.9 * torch.ones(3) + 0.1 * torch.tensor([4.5, 5.5, 6.5])
    for rank in range(WORLD):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt"), expected)
