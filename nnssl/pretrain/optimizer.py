"""The pretraining optimizer: AdamW with weight decay on weight matrices and kernels only."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

FUSED_ADAMW_DEVICES = ("cuda", "cpu")  # one kernel over all parameters instead of ~10 ops per tensor


def param_groups(method: nn.Module) -> list[dict[str, Any]]:
    """Weight decay on weight matrices and kernels only; not on biases, norms, tokens or position tables.
    ``apply_wd`` marks the group the weight-decay schedule sets."""
    decay, no_decay = [], []
    for name, p in method.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(("mask_token", "relative_position_bias_table")) else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


def make_adamw(method: nn.Module, device: torch.device, lr: float, betas: Sequence[float] = (0.9, 0.999),
               weight_decay: float = 1e-2) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (defaults: torch's), fused where torch has the kernel."""
    return torch.optim.AdamW(param_groups(method), lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                             fused=device.type in FUSED_ADAMW_DEVICES)
