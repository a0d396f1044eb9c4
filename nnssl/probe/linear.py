"""The linear voxel probe: a frozen Swin encoder's multi-scale features, one 1x1x1 convolution, Dice per class.

Features are the four Swin stages' outputs (strides 4, 8, 16, 32; layer-normalised, as SwinUNETR's decoder
receives them). The classifier is a 1x1x1 convolution over all stages' features, each upsampled
(trilinear) to the patch and concatenated. Upsampling is linear, so that convolution equals the sum over
stages of a per-stage 1x1x1 convolution at the stage's own resolution, upsampled; inference computes it that
way, which keeps memory at the size of the logits instead of ``sum(C_s) * X*Y*Z``.

Training: the frozen encoder runs once over the training patches; at the sampled voxels of each patch the
upsampled features are read with ``grid_sample`` (the same trilinear values ``interpolate`` gives there), so
the classifier is fitted on a ``(voxels, sum(C_s))`` matrix with nnU-Net's loss (cross-entropy + soft Dice,
``DC_and_CE_loss``) by AdamW for a fixed number of seeded minibatch steps. Evaluation: MONAI's sliding-window
inference at the patch size (overlap 0.5, Gaussian weighting, as nnU-Net predicts) on every validation case,
argmax, and Dice per class from nnU-Net's ``compute_tp_fp_fn_tn`` (a class absent from reference and
prediction of a case has no Dice there; per class, the mean over the cases where it has one).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm import tqdm

from nnssl.networks.swin import SwinEncoder
from nnssl.probe.options import ProbeSettings

PROBE_STAGES = slice(1, 5)  # encoder outputs 1-4: the Swin stages (0 is the patch embedding)


class LinearProbe(nn.Module):
    """``b + sum_s upsample(W_s f_s)``: one 1x1x1 convolution ``W = [W_1 .. W_4]`` over the upsampled,
    concatenated stage features."""

    def __init__(self, stage_channels: Sequence[int], num_classes: int):
        super().__init__()
        self.stage_channels = list(stage_channels)
        self.linear = nn.Linear(sum(stage_channels), num_classes)

    def forward(self, features: Sequence[Tensor], size: Sequence[int]) -> Tensor:
        """``features``: ``(B, C_s, x_s, y_s, z_s)`` per stage -> logits ``(B, K, *size)``."""
        logits = self.linear.bias.view(1, -1, 1, 1, 1)
        for weight, feature in zip(self.linear.weight.split(self.stage_channels, dim=1), features):
            stage_logits = F.conv3d(feature, weight[:, :, None, None, None])
            logits = logits + F.interpolate(stage_logits, size=tuple(size), mode="trilinear", align_corners=False)
        return logits


def voxel_features(features: Sequence[Tensor], voxels: Tensor, size: Sequence[int]) -> Tensor:
    """The upsampled, concatenated features of ``features`` (per stage ``(B, C_s, ...)``) at ``voxels``
    (``(B, V, 3)`` indices into a patch of ``size``): ``(B * V, sum(C_s))``.

    Equal to ``F.interpolate(f, size, mode="trilinear", align_corners=False)`` read at those voxels: voxel i of
    n maps to the normalised coordinate ``(2i + 1) / n - 1``, and ``border`` padding clamps as interpolate does.
    """
    sides = torch.tensor(list(size), dtype=torch.float32, device=voxels.device)
    grid = (2 * voxels.float() + 1) / sides - 1  # (B, V, 3) in (x, y, z) order of the tensor axes
    grid = grid.flip(-1)[:, :, None, None, :]  # grid_sample wants (W, H, D) order: (B, V, 1, 1, 3)
    sampled = [F.grid_sample(f.float(), grid.to(f.device), mode="bilinear", padding_mode="border",
                             align_corners=False)[..., 0, 0] for f in features]  # (B, C_s, V)
    return torch.cat(sampled, 1).transpose(1, 2).reshape(-1, sum(f.shape[1] for f in features))


def training_matrix(encoder: SwinEncoder, images: Tensor, voxels: Tensor, batch: int,
                    device: torch.device) -> Tensor:
    """``(N * V, sum(C_s))`` features of the frozen encoder at the sampled voxels of every training patch."""
    rows = []
    with torch.no_grad():
        for first in range(0, len(images), batch):
            features = encoder(images[first:first + batch].to(device))[PROBE_STAGES]
            rows.append(voxel_features(features, voxels[first:first + batch].to(device), images.shape[2:]).cpu())
    return torch.cat(rows)


def fit_probe(matrix: Tensor, labels: Tensor, stage_channels: Sequence[int], num_classes: int,
              settings: ProbeSettings, device: torch.device, progress: bool = True) -> LinearProbe:
    """Fit the probe to ``labels`` ``(M,)`` of the rows of ``matrix`` ``(M, sum(C_s))``."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    torch.manual_seed(settings.seed)
    probe = LinearProbe(stage_channels, num_classes).to(device)
    matrix, labels = matrix.to(device), labels.to(device)
    # nnU-Net's fine-tuning loss (nnUNetTrainer._build_loss without deep supervision), on a (1, K, voxels) batch
    loss_fn = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                             weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=settings.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(settings.seed)
    for _ in tqdm(range(settings.steps), desc="linear probe", disable=not progress, leave=False):
        index = torch.randint(len(labels), (min(settings.batch_voxels, len(labels)),), generator=generator).to(device)
        logits = probe.linear(matrix[index]).T[None].contiguous()  # (1, K, voxels)
        loss = loss_fn(logits, labels[index][None, None])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return probe.eval()


def predict_case(encoder: SwinEncoder, probe: LinearProbe, image: Tensor, patch_size: Sequence[int],
                 settings: ProbeSettings, device: torch.device) -> Tensor:
    """Label map ``(X, Y, Z)`` of a whole case ``(C, X, Y, Z)`` by sliding-window inference at ``patch_size``."""
    from monai.inferers import sliding_window_inference

    probe = probe.to(device)

    def predictor(window: Tensor) -> Tensor:
        return probe([f.float() for f in encoder(window)[PROBE_STAGES]], window.shape[2:])

    with torch.no_grad():
        logits = sliding_window_inference(image[None].to(device), roi_size=tuple(patch_size),
                                          sw_batch_size=settings.feature_batch, predictor=predictor,
                                          overlap=settings.overlap, mode="gaussian")
    return logits[0].argmax(0).cpu()


def dice_per_class(predictions: Sequence[Tensor], references: Sequence[Tensor], num_classes: int) -> list[float]:
    """Dice of classes 1..K-1, each averaged over the cases where it is defined (NaN if it never is)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

    per_class: list[list[float]] = [[] for _ in range(1, num_classes)]
    for prediction, reference in zip(predictions, references):
        pred, ref = prediction.numpy(), reference.numpy()
        for k in range(1, num_classes):
            tp, fp, fn, _ = compute_tp_fp_fn_tn(ref == k, pred == k)
            if tp + fp + fn:
                per_class[k - 1].append(2 * tp / (2 * tp + fp + fn))
    return [float(np.mean(values)) if values else math.nan for values in per_class]
