"""Self-distillation losses of DINO, iBOT and SMIT as pure functions of logits.

DINO (Caron et al. 2021, https://arxiv.org/abs/2104.14294, Eq. 1 and Algorithm 1): the teacher's output is
centered and sharpened, ``P_t = softmax((g_t(x) - c) / tau_t)``, the student's is ``P_s = softmax(g_s(x') /
tau_s)``, and the loss is the cross-entropy ``-sum_k P_t log P_s`` averaged over every (teacher view, student
view) pair of *different* views. iBOT (Zhou et al. 2022, https://arxiv.org/abs/2111.07832, Eq. 2) adds the same
cross-entropy between the teacher's patch tokens of the full view and the student's patch tokens of the
masked view, on masked tokens only. SMIT (Jiang et al. MICCAI 2022) uses both on 3D Swin tokens.

Centers are the EMA of the teacher's mean logits (DINO Eq. 4), computed over all GPUs. Logits are cast to
float32 here, so the losses are the same under autocast.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from nnssl.collectives import is_distributed, world_size


def validate_temperature(name: str, value: float) -> None:
    """Reject a softmax temperature that is not a finite number > 0 (it divides the logits)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0 (a softmax temperature), got {value!r}")


def validate_momentum(name: str, value: float) -> None:
    """Reject an EMA momentum outside [0, 1)."""
    if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1) (an EMA momentum), got {value!r}")


def teacher_probabilities(teacher_logits: Tensor, center: Tensor, temperature: float) -> Tensor:
    """Centered, sharpened teacher distribution ``softmax((t - c) / tau)``, without gradient.

    ``teacher_logits``: ``(..., K)``; ``center``: ``(K,)``. Returns float32 ``(..., K)``.
    """
    validate_temperature("teacher temperature", temperature)
    return F.softmax((teacher_logits.detach().float() - center.float()) / temperature, dim=-1)


def _cross_entropy(teacher_probs: Tensor, student_logits: Tensor, student_temperature: float) -> Tensor:
    """``-sum_k P_t log softmax(s / tau_s)`` over the last dimension: ``(..., K) -> (...)``."""
    return torch.sum(-teacher_probs * F.log_softmax(student_logits.float() / student_temperature, dim=-1), dim=-1)


def dino_loss(student_logits: Sequence[Tensor], teacher_logits: Sequence[Tensor], center: Tensor,
              student_temperature: float, teacher_temperature: float) -> Tensor:
    """DINO's multi-crop cross-entropy over pairs of different views.

    Args:
        student_logits: V tensors ``(B, K)``, one per view; the first ``len(teacher_logits)`` are the global
            views the teacher saw, in the same order, the rest local crops.
        teacher_logits: G tensors ``(B, K)`` (G <= V), the teacher's head outputs for the global views.
        center: ``(K,)`` EMA of the teacher's mean logits.
        student_temperature, teacher_temperature: softmax temperatures (DINO: 0.1 and 0.04 -> 0.07).

    Returns:
        Scalar: the mean over the G * (V - 1) pairs (i, j), i != j, of the batch-mean cross-entropy between
        teacher view i and student view j. Gradients flow to the student only.

    Example::

        >>> s, t = [torch.randn(4, 16) for _ in range(3)], [torch.randn(4, 16) for _ in range(2)]
        >>> dino_loss(s, t, torch.zeros(16), 0.1, 0.04).shape
        torch.Size([])
    """
    validate_temperature("student temperature", student_temperature)
    if not 1 <= len(teacher_logits) <= len(student_logits) or len(student_logits) < 2:
        raise ValueError(f"dino_loss needs 1 <= teacher views <= student views and >= 2 student views; got "
                         f"{len(teacher_logits)} teacher and {len(student_logits)} student views")
    terms = [
        _cross_entropy(teacher_probabilities(t, center, teacher_temperature), s, student_temperature).mean()
        for i, t in enumerate(teacher_logits) for j, s in enumerate(student_logits) if i != j
    ]
    return torch.stack(terms).mean()


def masked_token_distillation_loss(student_logits: Sequence[Tensor], teacher_logits: Sequence[Tensor],
                                   masks: Sequence[Tensor], center: Tensor, student_temperature: float,
                                   teacher_temperature: float) -> Tensor:
    """iBOT's masked patch-token self-distillation (also SMIT's), within each view.

    Args:
        student_logits: G tensors ``(B, N, K)``: the student's patch-token outputs for the masked views.
        teacher_logits: G tensors ``(B, N, K)``: the teacher's outputs for the same views unmasked.
        masks: G bool tensors ``(B, N)``, True = token masked for the student.
        center: ``(K,)`` EMA of the teacher's mean patch-token logits.
        student_temperature, teacher_temperature: softmax temperatures (iBOT: 0.1 and 0.04 -> 0.07).

    Returns:
        Scalar: per image, the cross-entropy summed over its masked tokens and divided by their number (at
        least 1, so an image without masked tokens adds 0), averaged over the batch and then over the views.
        Unmasked tokens never contribute.
    """
    validate_temperature("student temperature", student_temperature)
    if not len(student_logits) == len(teacher_logits) == len(masks) >= 1:
        raise ValueError(f"masked_token_distillation_loss needs as many student views, teacher views and masks "
                         f"(>= 1); got {len(student_logits)}, {len(teacher_logits)}, {len(masks)}")
    terms = []
    for s, t, m in zip(student_logits, teacher_logits, masks):
        if m.shape != s.shape[:-1] or t.shape != s.shape:
            raise ValueError(f"student {tuple(s.shape)}, teacher {tuple(t.shape)} and mask {tuple(m.shape)} must be "
                             f"(B, N, K), (B, N, K) and (B, N)")
        ce = _cross_entropy(teacher_probabilities(t, center, teacher_temperature), s, student_temperature)  # (B, N)
        weight = m.float()
        terms.append((torch.sum(ce * weight, dim=-1) / weight.sum(dim=-1).clamp(min=1.0)).mean())
    return torch.stack(terms).mean()


def token_mask(mask: Tensor, factor: int) -> Tensor:
    """A patch-grid block mask on the token grid of a coarser Swin stage.

    ``mask``: bool ``(B, x, y, z)`` on the patch-embedding grid; ``factor``: how many patch tokens one
    stage token spans per side (2**stage). Returns bool ``(B, x/f * y/f * z/f)`` in the order of
    ``features.flatten(2)``; a token counts as masked only if every patch under it is (for block-aligned
    masks, any == all).
    """
    b, x, y, z = mask.shape
    if x % factor or y % factor or z % factor:
        raise ValueError(f"mask grid {(x, y, z)} is not divisible by the stage factor {factor}")
    blocks = mask.reshape(b, x // factor, factor, y // factor, factor, z // factor, factor)
    return blocks.all(dim=6).all(dim=4).all(dim=2).flatten(1)


@torch.no_grad()
def updated_center(center: Tensor, teacher_logits: Tensor, momentum: float) -> Tensor:
    """The new center ``momentum * c + (1 - momentum) * mean(teacher_logits)`` (DINO Eq. 4).

    ``center``: ``(K,)``; ``teacher_logits``: ``(M, K)`` rows (images or tokens) of this process; the mean is
    over the rows of all processes (all_reduce when distributed, as every rank holds the same M).
    """
    validate_momentum("center momentum", momentum)
    total = teacher_logits.detach().float().sum(dim=0)
    if is_distributed():
        dist.all_reduce(total)
    batch_mean = total / (teacher_logits.shape[0] * world_size())
    return center * momentum + batch_mean.to(center.dtype) * (1.0 - momentum)


@torch.no_grad()
def collapse_stats(teacher_logits: Tensor, teacher_probs: Tensor) -> tuple[Tensor, Tensor]:
    """Collapse guard (DINO Sec. 5.3): mean entropy of the teacher distribution and mean per-dimension std.

    ``teacher_logits``, ``teacher_probs``: ``(M, K)``. Returns ``(entropy, std)``: the entropy in nats of each
    row of ``teacher_probs`` averaged over rows (0 when one dimension dominates, ``log K`` when uniform) and
    the standard deviation over rows of each logit dimension averaged over dimensions (0 when the teacher
    gives every input the same output).
    """
    probs = teacher_probs.float()
    entropy = -(probs * torch.log(probs.clamp(min=1e-12))).sum(dim=-1).mean()
    std = teacher_logits.float().std(dim=0).mean() if teacher_logits.shape[0] > 1 else teacher_logits.new_zeros(())
    return entropy, std
