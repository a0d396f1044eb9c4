"""SimCLR (Chen et al. ICML 2020, https://arxiv.org/abs/2002.05709) on 3D CT views."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from nnssl.losses.contrastive import check_temperature, ntxent_loss
from nnssl.data.spec import ViewSpec
from nnssl.methods.base import SSLMethod
from nnssl.methods.registry import register_method
from nnssl.networks.heads import MLPHead, PooledEncoder
from nnssl.networks.swin import SwinEncoder

# Two strongly augmented 3D random resized crops of one region 1.25 patch sides wide, each covering 80-100%
# of its side (zoomed to the patch size). SimCLR's 2D crops cover 8-100% of an object-centric image; a CT
# region is not object-centric, so the views are kept overlapping (at least 60% of the side on every axis).
CONTRASTIVE_VIEWS = ViewSpec(global_views=2, region_factor=1.25, global_scale=(0.8, 1.0), augment="strong")


@register_method("simclr", trainer="SwinUNETR_SimCLR_Trainer")
class SimCLR(SSLMethod):
    """SimCLR: NT-Xent between the projections of two augmented views; all other views in the (global)
    batch are negatives (2N - 2 per anchor, gathered across GPUs under DDP).

    Projector: "We use a MLP with one hidden layer to obtain z_i = g(h_i) = W(2) sigma(W(1) h_i) where sigma
    is a ReLU non-linearity" (Sec. 2.1), with batch norm as in the authors' code, on the average-pooled
    last-stage Swin tokens (768-d for the paper backbone). Hidden 2048 and output 128 are the paper's
    ResNet-50 values; temperature 0.1 its ImageNet setting (tuned for batches of thousands). MONAI and
    Tang et al. use 0.5, which may suit small 3D batches better: one plan override away.
    """

    family = "contrastive"
    description = "SimCLR: NT-Xent over two strongly augmented views, all in-batch negatives"

    def __init__(self, encoder: SwinEncoder, hidden_dim: int = 2048, proj_dim: int = 128, temperature: float = 0.1):
        super().__init__(encoder)
        self.temperature = check_temperature(temperature, "simclr")
        self.projector = nn.Sequential(PooledEncoder(encoder), MLPHead(encoder.out_channels[-1], hidden_dim, proj_dim))

    def view_spec(self) -> ViewSpec:
        return CONTRASTIVE_VIEWS

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        # Both views in one pass, as the authors' code does: batch norm in the projector sees all 2B views.
        z1, z2 = self.projector(torch.cat([batch["view1"], batch["view2"]])).chunk(2)  # (B, proj_dim) each
        ntxent = ntxent_loss(z1, z2, self.temperature)
        return {"loss": ntxent, "ntxent": ntxent.detach()}
