"""SimCLR (Chen et al. ICML 2020, https://arxiv.org/abs/2002.05709) on 3D CT views."""
from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from nnssl.data.spec import ViewSpec
from nnssl.errors import NnsslError
from nnssl.losses.contrastive import check_temperature, ntxent_loss
from nnssl.methods.base import SSLMethod
from nnssl.methods.dino import as_pair
from nnssl.methods.registry import register_method
from nnssl.networks.heads import MLPHead, PooledEncoder
from nnssl.networks.swin import SwinEncoder


def contrastive_views(method: str, crop_volume: Sequence[float], region_factor: float,
                      augment: Literal["strong", "asymmetric"]) -> ViewSpec:
    """Two augmented 3D random resized crops of one region ``region_factor`` patch sides wide, each
    covering a volume fraction of it drawn uniformly from ``crop_volume`` (zoomed to the patch size): the 3D
    analogue of RandomResizedCrop(scale=(0.08, 1)), which SimCLR (google-research/simclr data_util.py,
    area_range 0.08-1), BYOL and MoCo v3 (facebookresearch/moco-v3 main_moco.py) use. ``region_factor`` bounds
    how far apart the two views can lie, i.e. their least overlap (1: both from one patch-sized region).
    ``augment``: SimCLR's one distribution for both views (``strong``) or BYOL's asymmetric pair
    (``asymmetric``, :mod:`nnssl.data.augmentations`)."""
    low, high = as_pair(crop_volume, "crop_volume", method)
    if high > 1 or region_factor < 1:
        raise NnsslError(f"{method}: crop_volume must lie in (0, 1] (a fraction of the region's volume) and "
                         f"region_factor be >= 1; got {crop_volume!r} and {region_factor!r}. Fix it in "
                         f"plans/pretrain/{method}.json or --plans-override.")
    return ViewSpec(global_views=2, region_factor=float(region_factor), global_scale=(low, high), scale_by="volume",
                    augment=augment)


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

    def __init__(self, encoder: SwinEncoder, hidden_dim: int = 2048, proj_dim: int = 128, temperature: float = 0.1,
                 crop_volume: Sequence[float] = (0.08, 1.0), region_factor: float = 1.25):
        super().__init__(encoder)
        self.temperature = check_temperature(temperature, "simclr")
        self.views = contrastive_views("simclr", crop_volume, region_factor, augment="strong")
        self.projector = nn.Sequential(PooledEncoder(encoder), MLPHead(encoder.out_channels[-1], hidden_dim, proj_dim))

    def view_spec(self) -> ViewSpec:
        return self.views

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        # Both views in one pass, as the authors' code does: batch norm in the projector sees all 2B views.
        z1, z2 = self.projector(torch.cat([batch["view1"], batch["view2"]])).chunk(2)  # (B, proj_dim) each
        ntxent = ntxent_loss(z1, z2, self.temperature)
        return {"loss": ntxent, "ntxent": ntxent.detach()}
