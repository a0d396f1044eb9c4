"""Contrastive and regression losses on image-level embeddings (SimCLR, MoCo v3, BYOL, Swin UNETR SSL).

Pure functions: tensors in, a scalar tensor out. The two contrastive losses gather their negatives
from every process with :func:`nnssl.collectives.gather_with_grad`, so under DDP each GPU's
anchors are contrasted with the whole global batch (SimCLR, Chen et al. 2020, Sec. 2.2: the negatives are the
other examples of the batch, aggregated over all devices); in a single process that is the local batch and
the functions are plain maths.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from nnssl.errors import NnsslError
from nnssl.losses.distillation import validate_temperature
from nnssl.collectives import gather_with_grad, rank


def check_temperature(temperature: float, method: str) -> float:
    """``temperature`` as a float if it is a positive finite number; otherwise an :class:`NnsslError`
    naming ``method``'s plan. Methods call this in their constructor, before any work."""
    try:
        validate_temperature("temperature", temperature)
    except ValueError:
        raise NnsslError(
            f"{method}: temperature must be a positive number (it divides cosine similarities), got "
            f"{temperature!r}. Set \"temperature\" under \"method\" in plans/pretrain/{method}.json or "
            f"with --plans-override method.temperature=VALUE.") from None
    return float(temperature)


def _logits(anchors: Tensor, candidates: Tensor, temperature: float) -> Tensor:
    """``anchors @ candidates.T / temperature`` in float32 even under autocast: bf16 keeps about 3 digits of
    a cosine, too few once divided by a temperature of 0.1. ``(B, D), (N, D) -> (B, N)``."""
    with torch.autocast(anchors.device.type, enabled=False):
        return anchors.float() @ candidates.float().T / temperature


def ntxent_loss(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """NT-Xent, SimCLR's normalised temperature-scaled cross entropy (Chen et al. 2020, Eq. 1,
    https://arxiv.org/abs/2002.05709).

    The 2N embeddings of N samples (two views each) are L2-normalised; each is the anchor of a
    (2N-1)-way classification whose positive is the other view of its sample and whose negatives are
    the other 2N-2 embeddings (itself excluded)::

        l(i, j) = -log( exp(sim(z_i, z_j) / t) / sum_{k != i} exp(sim(z_i, z_k) / t) ),
        loss    = mean over all 2N anchors.

    Under DDP, N is the global batch: candidates come from every rank, anchors are the local ones.
    Same value as MONAI's ``ContrastiveLoss`` and Tang et al.'s ``Contrast`` (tested), but computed
    with ``cross_entropy`` (log-sum-exp), so small temperatures do not overflow.

    Args:
        z1, z2: ``(B, D)`` embeddings of view 1 and view 2; row ``b`` of each comes from sample ``b``.
        temperature: ``t > 0``.

    Returns:
        scalar loss; ``log(2N - 1)`` when all embeddings are equal.

    Example::

        >>> ntxent_loss(torch.eye(4, 8), torch.eye(4, 8), temperature=0.5)  # 0.5944...
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"ntxent_loss needs two (B, D) tensors of one shape, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    local = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2B, D) anchors on this rank, float32 (see _logits)
    b = z1.shape[0]
    all1, all2 = gather_with_grad(local[:b]), gather_with_grad(local[b:])  # (N, D) each, N = B * world
    n = all1.shape[0]
    logits = _logits(local, torch.cat([all1, all2]), temperature)  # (2B, 2N)
    own = torch.arange(b, device=z1.device) + rank() * b  # this rank's samples among the N
    self_index = torch.cat([own, own + n])
    positive_index = torch.cat([own + n, own])
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[torch.arange(2 * b, device=z1.device), self_index] = True
    logits = logits.masked_fill(is_self, float("-inf"))  # an anchor is neither its own positive nor negative
    return F.cross_entropy(logits, positive_index)


def infonce_loss(q: Tensor, k: Tensor, temperature: float) -> Tensor:
    """MoCo v3's InfoNCE of queries against in-batch keys, scaled by ``2 * t`` (Chen, Xie & He 2021,
    Algorithm 1, https://arxiv.org/abs/2104.02057)::

        loss = CrossEntropy(normalize(q) @ normalize(k).T / t, labels = arange(N)) * 2t

    The positive of query ``b`` is key ``b`` (the momentum encoder's embedding of the other view of the
    same sample); the other keys of the (global, under DDP) batch are the negatives; there is no queue.
    The ``2t`` factor makes the gradient's scale independent of ``t`` (MoCo v3 code, ``ctr_loss``).

    Args:
        q: ``(B, D)`` predictor outputs of the query encoder for one view.
        k: ``(B, D)`` momentum-encoder outputs for the other view (normally computed without gradient).
        temperature: ``t > 0`` (0.2 in MoCo v3 for ViTs).

    Returns:
        scalar loss; ``2t * log(N)`` when all keys are equal.
    """
    if q.shape != k.shape or q.ndim != 2:
        raise ValueError(f"infonce_loss needs two (B, D) tensors of one shape, got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    q = F.normalize(q.float(), dim=1)  # float32, see _logits
    keys = gather_with_grad(F.normalize(k.float(), dim=1))  # (N, D), N = B * world
    logits = _logits(q, keys, temperature)  # (B, N)
    labels = torch.arange(q.shape[0], device=q.device) + rank() * q.shape[0]
    return F.cross_entropy(logits, labels) * (2 * temperature)


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's regression loss ``2 - 2 cos(p, z)``, averaged over the batch (Grill et al. 2020, Eq. 2,
    https://arxiv.org/abs/2006.07733): the squared distance of the L2-normalised prediction and target.

    Args:
        p: ``(B, D)`` online predictions for one view.
        z: ``(B, D)`` target projections of the other view (computed without gradient by the caller).

    Returns:
        scalar in [0, 4]: 0 for aligned, 2 for orthogonal, 4 for opposite vectors.
    """
    if p.shape != z.shape or p.ndim != 2:
        raise ValueError(f"byol_loss needs two (B, D) tensors of one shape, got {tuple(p.shape)} and "
                         f"{tuple(z.shape)}")
    return (2 - 2 * F.cosine_similarity(p.float(), z.float(), dim=1)).mean()
