"""Rotation prediction (RotNet, Gidaris et al. ICLR 2018, https://arxiv.org/abs/1803.07728) in 3D."""
from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from nnssl.losses.rotation import ROTATION_CLASSES, check_rotation_axes, rotation_labels, rotation_loss
from nnssl.data.spec import ViewSpec
from nnssl.methods.base import SSLMethod
from nnssl.methods.registry import register_method
from nnssl.networks.heads import PooledEncoder
from nnssl.networks.swin import SwinEncoder


@register_method("rotnet", trainer="SwinUNETR_RotNet_Trainer")
class RotNet(SSLMethod):
    """RotNet in 3D: each crop is turned by k x 90 degrees and a linear head on the average-pooled
    last-stage tokens classifies the rotation with cross entropy.

    Rotation scheme (``axes``): ``"any"`` (default) turns about a random axis (x, y or z) and classifies
    the 10 distinct results, identity plus 3 turns about each axis (Taleb et al. NeurIPS 2020, the 3D
    extension of Gidaris et al.); ``"axial"`` turns in the axial plane only, 4 classes, as Gidaris et al.
    do in 2D. The loader draws k uniformly and the axis uniformly, so with ``"any"`` the identity is 1/4
    of the views and each other rotation 1/12. See :mod:`nnssl.losses.rotation`.
    """

    family = "rotation"
    description = "RotNet 3D: a linear head classifies quarter turns of a crop (10 classes: any axis)"

    def __init__(self, encoder: SwinEncoder, axes: Literal["any", "axial"] = "any"):
        super().__init__(encoder)
        self.axes = check_rotation_axes(axes, "rotnet")
        self.classifier = nn.Sequential(PooledEncoder(encoder),
                                        nn.Linear(encoder.out_channels[-1], ROTATION_CLASSES[self.axes]))

    def view_spec(self) -> ViewSpec:
        return ViewSpec(global_views=1, augment="light", rotate=self.axes)

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        logits = self.classifier(batch["view1"])  # (B, 4 or 10)
        axis = batch["rot_axis1"] if self.axes == "any" else None
        ce = rotation_loss(logits, batch["rot1"], axis)
        accuracy = (logits.argmax(dim=1) == rotation_labels(batch["rot1"], axis)).float().mean()
        return {"loss": ce, "rotation_ce": ce.detach(), "rotation_acc": accuracy.detach()}
