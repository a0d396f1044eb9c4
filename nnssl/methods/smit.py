"""SMIT, self-distilled masked image transformer (Jiang et al. MICCAI 2022, https://arxiv.org/abs/2205.10342),
on the Swin encoder."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from nnssl.losses.reconstruction import masked_l1, upsample_mask
from nnssl.data.spec import ViewSpec
from nnssl.methods.ibot import MaskedSelfDistillationMethod
from nnssl.methods.registry import register_method
from nnssl.networks.heads import ReconstructionHead
from nnssl.networks.swin import SwinEncoder


@register_method("smit", trainer="SwinUNETR_SMIT_Trainer")
class SMIT(MaskedSelfDistillationMethod):
    """SMIT: masked image reconstruction plus masked patch-token and global self-distillation, on two
    overlapping views cropped from one larger region (two 96^3 views from a 128^3 region in the lab's code).

    Each view is masked independently (70% of 16^3-voxel blocks, masked patch embeddings replaced by a learned
    mask token). The loss, as in the authors' ``train_self_supervised.py``, is

    - ``recon`` (weight 1): L1 on masked voxels of the view, predicted from the last Swin stage by SimMIM's
      decoder (1x1x1 conv to 32^3 voxels per token, pixel shuffle; shared with ``simmim``);
    - ``patch_distill`` (0.1): cross-entropy between the teacher's stage-3 tokens (384-d, stride 16; full
      view) and the student's (masked view), on masked tokens only, within each view;
    - ``global_distill`` (0.1): DINO's cross-view cross-entropy on the average-pooled stage-3 tokens.

    Heads: separate patch and global DINO heads (3 layers, hidden 2048, bottleneck 256, weight-normalised
    last layer, 8192 out; the authors' default ``ibot_head_share=0``). Student temperature 0.1; teacher
    0.04 -> 0.07 over 30 epochs, the patch teacher held at 0.04 for the first 30 epochs (``pred_start_epoch``)
    and then warmed up; centers momentum 0.9; last layers frozen in epoch 0; EMA 0.996 -> 1. One departure:
    the teacher runs in eval mode (no drop path), as DINO's and iBOT's teachers are built; the authors' script
    leaves its teacher in train mode with the student's drop path 0.3.

    Family: "self-distillation". SMIT is masked image modeling plus self-distillation; it is iBOT (itself
    filed under self-distillation) with a pixel-reconstruction term, and what defines the family in use, an
    EMA teacher with centers and temperature schedules, is what it shares with DINO and iBOT.
    """

    description = "SMIT: masked voxel reconstruction + masked patch-token and global self-distillation"

    def __init__(self, encoder: SwinEncoder, out_dim: int = 8192, patch_out_dim: int = 8192,
                 hidden_dim: int = 2048, bottleneck_dim: int = 256, patch_stage: int = 3,
                 mask_ratio: Sequence[float] = (0.7, 0.7), region_factor: float = 128 / 96,
                 momentum: float = 0.996, student_temperature: float = 0.1,
                 warmup_teacher_temperature: float = 0.04, teacher_temperature: float = 0.07,
                 warmup_teacher_patch_temperature: float = 0.04, teacher_patch_temperature: float = 0.07,
                 warmup_teacher_temperature_epochs: float = 30, patch_temperature_hold_epochs: float = 30,
                 center_momentum: float = 0.9, recon_weight: float = 1.0, patch_weight: float = 0.1,
                 global_weight: float = 0.1, freeze_last_layer_epochs: float = 1):
        super().__init__(encoder)
        hp = self._check_hyperparameters(locals())
        # the global representation is the pooled stage-3 tokens, as in the authors' code
        self._setup_masked_distillation(hp, global_stage=None)
        self.region_factor = float(region_factor)
        self.recon_weight, self.patch_weight, self.global_weight = recon_weight, patch_weight, global_weight
        preset = encoder.preset
        self.decoder = ReconstructionHead(preset.stage_channels[-1], stride=preset.stride,
                                          out_channels=encoder.in_channels)

    def view_spec(self) -> ViewSpec:
        # each view is a plain patch-sized crop of the shared region (scale = 1 / region_factor: no resizing)
        scale = 1.0 / self.region_factor
        return ViewSpec(global_views=2, region_factor=self.region_factor, global_scale=(scale, scale),
                        mask=self.mask_spec())

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        views, masks, student, teacher = self._masked_forward(batch)
        voxel_mask = upsample_mask(masks, self.encoder.preset.patch_size)  # (2B, 1, X, Y, Z)
        recon = masked_l1(self.decoder(student[-1]), views, voxel_mask)
        patch, patch_stats = self._patch_distillation(student, teacher, masks)
        glob, global_stats = self._global_distillation(student, teacher, batch)
        total = self.recon_weight * recon + self.patch_weight * patch + self.global_weight * glob
        return {"loss": total, "recon": recon.detach(), "patch_distill": patch.detach(),
                "global_distill": glob.detach(), **global_stats, **patch_stats}
