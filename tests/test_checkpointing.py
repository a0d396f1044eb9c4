"""Activation checkpointing (``nnssl_checkpointing=1``, ``nnssl_pretrain --grad-checkpointing``) changes memory,
not the math: the backward recomputes each block with the same kernels, so outputs and gradients are identical.

The knob's path through a real fine-tuning is in ``test_finetune.py``, the flag's through a real pretraining
(identical losses) in ``test_pretrain_engine.py``.
"""
from __future__ import annotations

import torch

from nnssl.networks import build_swinunetr, get_preset


def test_gradients_are_identical_with_and_without_checkpointing():
    torch.set_num_threads(1)  # a tiny network: on a shared 2-core machine a second thread mostly waits
    # SwinUNETR: the Swin blocks (encoder checkpointing, as in pretraining) and the decoder blocks
    x = torch.randn(1, 1, 32, 32, 64, generator=torch.Generator().manual_seed(1))
    results = {}
    for use_checkpoint in (False, True):
        torch.manual_seed(0)
        net = build_swinunetr(get_preset("tiny"), 1, 2, use_checkpoint=use_checkpoint)
        assert net.swinViT.layers2[0].blocks[1].use_checkpoint == use_checkpoint
        out = net(x)
        # a fixed, non-symmetric loss so every output element gets its own gradient
        (out * torch.linspace(-1, 2, out.numel()).view(out.shape)).sum().backward()
        results[use_checkpoint] = (out.detach(), {k: p.grad for k, p in net.named_parameters()})
    assert torch.equal(results[True][0], results[False][0])
    assert results[True][1].keys() == results[False][1].keys()
    for name, grad in results[False][1].items():
        assert torch.equal(results[True][1][name], grad), name
