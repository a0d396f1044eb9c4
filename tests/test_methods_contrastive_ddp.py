"""The contrastive losses under DDP: negatives come from every rank (2 gloo processes on CPU).

Kept apart from test_methods_contrastive.py so the spawned processes import only torch and the losses.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnssl.losses.contrastive import infonce_loss, ntxent_loss

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return ntxent_loss(z1, z2, 0.5), infonce_loss(z1, z2.detach(), 0.2)


def _worker(rank: int, port: int, full: dict[str, torch.Tensor], out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        b = full["z1"].shape[0] // WORLD
        z1, z2 = (full[k][rank * b:(rank + 1) * b].clone().requires_grad_(True) for k in ("z1", "z2"))
        ntxent, infonce = _losses(z1, z2)
        (ntxent + infonce).backward()
        torch.save({"ntxent": ntxent.item(), "infonce": infonce.item(), "g1": z1.grad, "g2": z2.grad},
                   out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_contrastive_losses_use_negatives_from_every_rank(tmp_path):
    # Each rank holds half of a batch of 8: the mean of the per-rank losses is the single-process loss of
    # the whole batch, and each rank's gradient (what DDP averages) is WORLD times its share of it.
    g = torch.Generator().manual_seed(0)
    full = {"z1": torch.randn(8, 16, generator=g), "z2": torch.randn(8, 16, generator=g)}
    mp.spawn(_worker, args=(_free_port(), full, tmp_path), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    z1, z2 = (full[k].clone().requires_grad_(True) for k in ("z1", "z2"))
    ntxent, infonce = _losses(z1, z2)
    (ntxent + infonce).backward()
    assert sum(r["ntxent"] for r in ranks) / WORLD == pytest.approx(ntxent.item(), rel=1e-5)
    assert sum(r["infonce"] for r in ranks) / WORLD == pytest.approx(infonce.item(), rel=1e-5)
    torch.testing.assert_close(torch.cat([r["g1"] for r in ranks]) / WORLD, z1.grad)
    torch.testing.assert_close(torch.cat([r["g2"] for r in ranks]) / WORLD, z2.grad)
