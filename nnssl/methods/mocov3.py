"""MoCo v3 (Chen, Xie & He, ICCV 2021, https://arxiv.org/abs/2104.02057) on 3D CT views."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from nnssl.losses.contrastive import check_temperature, infonce_loss
from nnssl.methods.byol import BYOL
from nnssl.methods.registry import register_method
from nnssl.networks.heads import MLPHead
from nnssl.networks.swin import SwinEncoder


@register_method("mocov3", trainer="SwinUNETR_MoCoV3_Trainer")
class MoCoV3(BYOL):
    """MoCo v3: a query encoder (encoder + projector) and predictor; a momentum key encoder (the EMA
    copy of encoder + projector, ``momentum`` 0.99 raised to 1 on a cosine schedule by the loop);
    symmetric InfoNCE of each view's queries against the other view's keys, scaled by ``2t``, with the
    keys of the whole (global) batch as negatives and no queue (Algorithm 1).

    Heads as in the authors' ViT code: "the projection head is a 3-layer MLP ... the prediction head is a
    2-layer MLP" with hidden 4096 and output 256, BN after every layer (the last one without affine
    parameters), ReLU between. The structure is BYOL's, hence the subclass, and so are the views
    (facebookresearch/moco-v3 main_moco.py: "follow BYOL's augmentation recipe", ``augmentation1`` /
    ``augmentation2`` with blur p 1.0 / 0.1 and solarization p 0 / 0.2). MoCo v3's frozen random patch
    projection (Sec. 4.2, a ViT stability trick for 16x16 patches) is not used: the Swin patch embedding is
    a 2x2x2 convolution and is pretrained with the rest of the encoder.
    """

    family = "contrastive"
    description = "MoCo v3: symmetric InfoNCE (t=0.2) of queries vs. momentum-encoder keys, no queue"

    def __init__(self, encoder: SwinEncoder, hidden_dim: int = 4096, proj_dim: int = 256, momentum: float = 0.99,
                 temperature: float = 0.2, crop_volume: Sequence[float] = (0.08, 1.0), region_factor: float = 1.25):
        super().__init__(encoder, hidden_dim=hidden_dim, proj_dim=proj_dim, momentum=momentum,
                         crop_volume=crop_volume, region_factor=region_factor)
        self.temperature = check_temperature(temperature, "mocov3")

    @staticmethod
    def build_heads(embed_dim: int, hidden_dim: int, proj_dim: int) -> tuple[nn.Module, nn.Module]:
        """(projector, predictor): 3 and 2 layers, BN everywhere, the last BN without affine parameters."""
        return (MLPHead(embed_dim, hidden_dim, proj_dim, num_layers=3, last_batch_norm=True),
                MLPHead(proj_dim, hidden_dim, proj_dim, num_layers=2, last_batch_norm=True))

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        q1, q2, k1, k2 = self.predictions_and_targets(batch)
        terms = {"infonce_12": infonce_loss(q1, k2, self.temperature),
                 "infonce_21": infonce_loss(q2, k1, self.temperature)}
        return {"loss": sum(terms.values()), **{k: v.detach() for k, v in terms.items()}}
