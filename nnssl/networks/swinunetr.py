"""SwinUNETR (Hatamizadeh et al. 2022; MONAI) whose encoder is nnssl's ``SwinEncoder``."""
from __future__ import annotations

from monai.networks.nets import SwinUNETR

from nnssl.errors import NnsslError

from nnssl.networks.fast_swin import FastSwinUNETR
from nnssl.networks.presets import BackbonePreset
from nnssl.networks.swin import build_encoder
from nnssl.swin_bottleneck import widen_single_voxel_bottleneck


def build_swinunetr(preset: BackbonePreset, in_channels: int, out_channels: int,
                    drop_path_rate: float = 0.0, use_checkpoint: bool = False, fast: bool = True) -> SwinUNETR:
    """A MONAI ``SwinUNETR`` shaped by ``preset``; its ``swinViT`` is a :class:`SwinEncoder`.

    The state dict is key-for-key MONAI's, so weights move between this network, plain MONAI
    ``SwinUNETR(feature_size=..., depths=..., num_heads=..., window_size=...)`` and nnssl encoders.
    Inputs: ``(B, in_channels, X, Y, Z)`` with each side a multiple of ``preset.divisor`` (32).
    ``fast`` (default) builds a :class:`~nnssl.networks.fast_swin.FastSwinUNETR`, a subclass whose forward
    gives the same output faster; ``fast=False`` builds MONAI's class running MONAI's code (the baseline).
    """
    net = (FastSwinUNETR if fast else SwinUNETR)(
        in_channels=in_channels,
        out_channels=out_channels,
        patch_size=preset.patch_size,
        depths=preset.depths,
        num_heads=preset.num_heads,
        window_size=preset.window_size,
        qkv_bias=preset.qkv_bias,
        mlp_ratio=preset.mlp_ratio,
        feature_size=preset.feature_size,
        dropout_path_rate=drop_path_rate,
        use_checkpoint=use_checkpoint,
        spatial_dims=3,
    )
    # Same modules and names as MONAI's SwinTransformer; ours adds the mask-token input path.
    net.swinViT = build_encoder(preset, in_channels, drop_path_rate=drop_path_rate,
                                use_checkpoint=use_checkpoint, fast=fast)
    if fast:
        net.use_checkpoint = use_checkpoint
    return net


def swin_patch_size(planned: list[int] | tuple[int, ...], divisor: int = 32) -> list[int]:
    """The nearest patch SwinUNETR accepts: each side rounded to a multiple of ``divisor`` (ties down).

    Rounding to the nearest multiple keeps the voxel budget nnU-Net planned. A 1x1x1 bottleneck breaks
    instance norm in training, so if every side comes out as ``divisor`` the longest is doubled.
    """
    if len(planned) != 3:
        raise NnsslError(
            f"SwinUNETR trainers need a 3D configuration (3d_fullres or 3d_lowres); this one has a "
            f"{len(planned)}D patch {list(planned)}. Train with: nnUNetv2_train DATASET 3d_fullres FOLD -tr ..."
        )
    if min(planned) <= 0:
        raise NnsslError(f"The planned patch size {list(planned)} has a non-positive side; re-run "
                         f"nnUNetv2_plan_and_preprocess for this dataset.")
    def nearest(side: int) -> int:
        lower = side // divisor * divisor
        return lower + divisor if side - lower > divisor / 2 else lower

    fixed = [max(divisor, nearest(int(side))) for side in planned]
    return widen_single_voxel_bottleneck(fixed, planned, divisor)
