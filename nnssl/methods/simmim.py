"""SimMIM (Xie et al. 2022, https://arxiv.org/abs/2111.09886) for 3D CT with a Swin encoder."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from nnssl.losses.reconstruction import masked_l1, upsample_mask
from nnssl.data.spec import MaskSpec, ViewSpec
from nnssl.methods.base import SSLMethod
from nnssl.methods.registry import register_method
from nnssl.networks.heads import ReconstructionHead
from nnssl.networks.swin import SwinEncoder


@register_method("simmim", trainer="SwinUNETR_SimMIM_Trainer")
class SimMIM(SSLMethod):
    """Masked image modelling: block-masked patch embeddings are replaced by a learned mask token (the Swin
    encoder still sees the full token grid), a light 1x1x1-conv + 3D pixel-shuffle head predicts the voxels
    from the last stage, and an L1 loss is taken on masked voxels only.

    ``mask_ratio``: fraction of ``mask_block_size``^3-voxel blocks masked (0.6 in SimMIM; SMIT uses 0.7 with
    16^3 blocks in 3D). Blocks align with the Swin token grid.
    """

    family = "mim"
    description = "SimMIM: masked voxel reconstruction (L1) with a mask token and a light decoder"

    def __init__(self, encoder: SwinEncoder, mask_ratio: float = 0.6, mask_block_size: int = 16):
        super().__init__(encoder)
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.mask_ratio, self.mask_block_size = mask_ratio, mask_block_size
        preset = encoder.preset
        self.mask_token = nn.Parameter(torch.zeros(preset.feature_size))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = ReconstructionHead(preset.stage_channels[-1], stride=preset.stride,
                                          out_channels=encoder.in_channels)

    def view_spec(self) -> ViewSpec:
        return ViewSpec(mask=MaskSpec(ratio=(self.mask_ratio, self.mask_ratio), block_size=self.mask_block_size))

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        image, mask = batch["view1"], batch["mask1"]  # (B, C, X, Y, Z), (B, X/p, Y/p, Z/p)
        features = self.encoder(image, mask=mask, mask_token=self.mask_token)
        reconstruction = self.decoder(features[-1])  # (B, C, X, Y, Z)
        voxel_mask = upsample_mask(mask, self.encoder.preset.patch_size)
        recon = masked_l1(reconstruction, image, voxel_mask)
        return {"loss": recon, "recon": recon.detach()}
