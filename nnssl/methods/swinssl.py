"""Swin UNETR self-supervised pretraining (Tang et al. CVPR 2022, https://arxiv.org/abs/2111.14791)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnssl.errors import NnsslError
from nnssl.losses.contrastive import check_temperature, ntxent_loss
from nnssl.losses.rotation import ROTATION_CLASSES, rotation_loss
from nnssl.data.spec import ViewSpec
from nnssl.methods.base import SSLMethod
from nnssl.methods.registry import register_method
from nnssl.networks.heads import SwinSSLDecoder
from nnssl.networks.swin import SwinEncoder


@register_method("swinssl", trainer="SwinUNETR_SwinSSL_Trainer")
class SwinSSL(SSLMethod):
    """Swin UNETR SSL: three proxy tasks on two views of one crop, each view turned by k x 90 degrees in
    the axial plane and corrupted for inpainting by the loader, summed with equal weights (the reference's
    ``alpha1 = alpha2 = alpha3 = 1``):

    - rotation: a linear head on the first last-stage token classifies k (4 classes, cross entropy);
    - contrastive: a linear head on the second last-stage token gives a 512-d embedding; NT-Xent with
      temperature 0.5 between the two views (negatives gathered across GPUs under DDP; the reference
      uses each GPU's batch only);
    - inpainting: :class:`~nnssl.networks.heads.SwinSSLDecoder` (the reference's 5 x [conv, instance norm,
      leaky ReLU, x2 upsampling] decoder) reconstructs the rotated view before cutout from the last stage;
      L1 over all voxels.

    Heads, token choice and losses follow the authors' code (MONAI research-contributions,
    ``SwinUNETR/Pretrain``: ``models/ssl_head.py``, ``losses/loss.py``, ``utils/ops.py``). The corruption
    is ops.py's ``aug_rand``: per view, boxes filled with noise over U(0, 0.3) of the voxels, then boxes
    pasted from another sample of the batch, about a quarter of the voxels in all
    (:mod:`nnssl.data.inpainting`, applied when the loader stacks the batch). The final token grid needs at least 2 tokens, i.e. one side of the crop at least 64 voxels
    (the paper uses 96^3).

    Family: ``"rotation"``. Two of its three tasks are image-level, one of them the rotation prediction it
    shares with RotNet; its contrastive term is an auxiliary on a single token per view, without projector
    or momentum encoder, whereas SimCLR, MoCo v3 and BYOL are nothing but two-view embedding agreement,
    which is what "contrastive" names here. Grouping it with RotNet keeps that family pure.
    """

    family = "rotation"
    description = "Swin UNETR SSL: axial rotation (4-way) + contrastive (t=0.5) + inpainting (L1), two views"

    def __init__(self, encoder: SwinEncoder, contrastive_dim: int = 512, temperature: float = 0.5,
                 rotation_weight: float = 1.0, contrastive_weight: float = 1.0, reconstruction_weight: float = 1.0):
        super().__init__(encoder)
        self.temperature = check_temperature(temperature, "swinssl")
        self.weights = {"rotation": rotation_weight, "contrastive": contrastive_weight,
                        "reconstruction": reconstruction_weight}
        embed_dim = encoder.out_channels[-1]
        self.rotation_head = nn.Linear(embed_dim, ROTATION_CLASSES["axial"])
        self.contrastive_head = nn.Linear(embed_dim, contrastive_dim)
        # one x2 upsampling per halving: the last stage (stride 32) back to voxels
        self.decoder = SwinSSLDecoder(embed_dim, encoder.in_channels,
                                      num_upsamplings=int(math.log2(encoder.preset.stride)))

    def view_spec(self) -> ViewSpec:
        # Two views of one crop (region_factor 1, no rescaling), as the reference's rot_rand/aug_rand do.
        return ViewSpec(global_views=2, augment="light", rotate="axial", cutout=True)

    def _heads(self, view: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rotation logits ``(B, 4)``, contrastive embedding ``(B, D)`` and reconstruction ``(B, C, X, Y, Z)``."""
        features = self.encoder(view)[-1]  # (B, C, x, y, z)
        tokens = features.flatten(2)  # (B, C, x*y*z), the reference's token order
        if tokens.shape[2] < 2:
            raise NnsslError(f"swinssl puts its rotation and contrastive heads on two different last-stage tokens, "
                             f"but a crop of {tuple(view.shape[2:])} voxels has only {tokens.shape[2]}. Use a patch "
                             f"size with at least one side of 64 voxels or more (the paper uses 96^3).")
        return self.rotation_head(tokens[:, :, 0]), self.contrastive_head(tokens[:, :, 1]), self.decoder(features)

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        (rot1, emb1, rec1), (rot2, emb2, rec2) = self._heads(batch["view1"]), self._heads(batch["view2"])
        terms = {
            "rotation": rotation_loss(torch.cat([rot1, rot2]), torch.cat([batch["rot1"], batch["rot2"]])),
            "contrastive": ntxent_loss(emb1, emb2, self.temperature),
            "reconstruction": F.l1_loss(torch.cat([rec1, rec2]), torch.cat([batch["clean1"], batch["clean2"]])),
        }
        total = sum(self.weights[name] * value for name, value in terms.items())
        return {"loss": total, **{k: v.detach() for k, v in terms.items()}}
