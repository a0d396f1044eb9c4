"""BYOL (Grill et al. NeurIPS 2020, https://arxiv.org/abs/2006.07733) on 3D CT views."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from nnssl.errors import NnsslError
from nnssl.losses.contrastive import byol_loss
from nnssl.data.spec import ViewSpec
from nnssl.methods.base import SSLMethod
from nnssl.methods.registry import register_method
from nnssl.methods.simclr import contrastive_views
from nnssl.networks.heads import MLPHead, PooledEncoder, frozen_copy, without_drop_path
from nnssl.networks.swin import SwinEncoder


@register_method("byol", trainer="SwinUNETR_BYOL_Trainer")
class BYOL(SSLMethod):
    """BYOL: the online network (encoder + projector) and a predictor regress the EMA target network's
    projection of the other view with ``2 - 2 cos``, symmetrised over the two views; no negatives.

    "The projection MLP ... a linear layer with output size 4096 followed by batch normalization,
    rectified linear units, and a final linear layer with output dimension 256. ... the predictor q_theta
    uses the same architecture as g_theta" (Sec. 3.3). The target is a deep copy of the online network
    that the shared loop moves by EMA (``momentum`` 0.996, raised to 1 on a cosine schedule).

    Views (Appendix B, Table 6): two random resized crops of one region, augmented asymmetrically: Gaussian
    blur always on view 1 and with p 0.1 on view 2, solarization never on view 1 and with p 0.2 on view 2,
    flips and colour jitter (p 0.8) on both; in 3D as :mod:`nnssl.data.augmentations` ``asymmetric`` maps them.

    MoCo v3 (``mocov3``) reuses this structure with other heads and InfoNCE: subclasses override
    :meth:`build_heads` and :meth:`loss`.
    """

    family = "contrastive"
    description = "BYOL: online predictor regresses an EMA target's projection of the other view (2-2cos)"

    def __init__(self, encoder: SwinEncoder, hidden_dim: int = 4096, proj_dim: int = 256, momentum: float = 0.996,
                 crop_volume: Sequence[float] = (0.08, 1.0), region_factor: float = 1.25):
        super().__init__(encoder)
        # BYOL's asymmetric views (Table 6), which MoCo v3 takes unchanged
        self.views = contrastive_views(self.name, crop_volume, region_factor, augment="asymmetric")
        if not (isinstance(momentum, (int, float)) and math.isfinite(momentum) and 0 <= momentum <= 1):
            raise NnsslError(f"{self.name}: momentum must be in [0, 1] (the EMA teacher's base momentum), got "
                             f"{momentum!r}. Set \"momentum\" under \"method\" in plans/pretrain/{self.name}.json "
                             f"or with --plans-override method.momentum=VALUE.")
        self.momentum = float(momentum)
        projector, self.predictor = self.build_heads(encoder.out_channels[-1], hidden_dim, proj_dim)
        self.online = nn.Sequential(PooledEncoder(encoder), projector)
        # the shared loop updates it from ema_pairs(); no stochastic depth in the target, as in both references
        self.target = without_drop_path(frozen_copy(self.online))

    @staticmethod
    def build_heads(embed_dim: int, hidden_dim: int, proj_dim: int) -> tuple[nn.Module, nn.Module]:
        """(projector, predictor): both 2-layer MLPs, ``embed_dim`` / ``proj_dim`` -> 4096 -> 256."""
        return MLPHead(embed_dim, hidden_dim, proj_dim), MLPHead(proj_dim, hidden_dim, proj_dim)

    def view_spec(self) -> ViewSpec:
        return self.views

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.online, self.target)]

    def teacher_encoder(self) -> SwinEncoder:
        return self.target[0].encoder

    def predictions_and_targets(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Online predictions ``p1, p2`` and target projections ``z1, z2`` (no gradient), ``(B, proj_dim)``."""
        v1, v2 = batch["view1"], batch["view2"]  # (B, C, X, Y, Z) each
        p1, p2 = self.predictor(self.online(v1)), self.predictor(self.online(v2))
        with torch.no_grad():
            z1, z2 = self.target(v1), self.target(v2)
        return p1, p2, z1, z2

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        p1, p2, z1, z2 = self.predictions_and_targets(batch)
        terms = {"byol_12": byol_loss(p1, z2), "byol_21": byol_loss(p2, z1)}
        return {"loss": sum(terms.values()), **{k: v.detach() for k, v in terms.items()}}
