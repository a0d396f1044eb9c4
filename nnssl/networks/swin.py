"""The Swin encoder every nnssl model shares: MONAI's ``SwinTransformer`` plus masked-token input.

Parameter names are exactly MONAI's (``patch_embed.*``, ``layers1.0.blocks.0.*``, ...), so the encoder's
state dict, prefixed with ``swinViT.``, loads into ``monai.networks.nets.SwinUNETR`` unchanged. The forward
runs :mod:`nnssl.networks.fast_swin` (same result, faster); ``fast=False`` runs MONAI's own code.
"""
from __future__ import annotations

from typing import Sequence

from monai.networks.nets.swin_unetr import SwinTransformer
from torch import Tensor, nn

from nnssl.errors import NnsslError
from nnssl.networks import fast_swin
from nnssl.networks.presets import BackbonePreset

ENCODER_PREFIX = "swinViT."


class SwinEncoder(SwinTransformer):
    """MONAI's 3D Swin Transformer with an optional mask token (SimMIM, iBOT, SMIT).

    ``forward(x)`` takes ``(B, C, X, Y, Z)`` with every side a multiple of ``preset.divisor`` and returns
    the five feature maps MONAI's ``SwinUNETR`` consumes: the patch embedding and stages 1-4, each
    ``(B, feature_size * 2**i, X / (2 * 2**i), ...)``, layer-normalised over channels.

    With ``mask`` (``(B, X/p, Y/p, Z/p)`` bool on the patch-embedding grid, p = patch size) and
    ``mask_token`` (``(C,)``), masked patch embeddings are replaced by the token before stage 1, so the
    encoder still sees the full token grid, as shifted windows require (SimMIM, Xie et al. 2022).

    ``fast`` (default) runs :func:`nnssl.networks.fast_swin.encoder_forward`, equal to MONAI's forward
    within fp32 rounding and faster (``bench/RESULTS.md``); its outputs are channels-last in memory.
    ``fast=False`` runs MONAI's ``BasicLayer`` code, the benchmarks' baseline.
    """

    def __init__(self, preset: BackbonePreset, in_channels: int = 1, drop_path_rate: float = 0.0,
                 use_checkpoint: bool = False, fast: bool = True):
        super().__init__(
            in_chans=in_channels,
            embed_dim=preset.feature_size,
            window_size=(preset.window_size,) * 3,
            patch_size=(preset.patch_size,) * 3,
            depths=preset.depths,
            num_heads=preset.num_heads,
            mlp_ratio=preset.mlp_ratio,
            qkv_bias=preset.qkv_bias,
            drop_path_rate=drop_path_rate,
            use_checkpoint=use_checkpoint,
            spatial_dims=3,
        )
        self.preset = preset
        self.in_channels = in_channels
        self.fast = fast

    @property
    def out_channels(self) -> list[int]:
        return self.preset.stage_channels

    def check_input_shape(self, spatial_shape: Sequence[int]) -> None:
        bad = [s for s in spatial_shape if s % self.preset.divisor]
        if bad or len(spatial_shape) != 3:
            raise NnsslError(
                f"Swin encoder '{self.preset.name}' needs a 3D input whose sides are multiples of "
                f"{self.preset.divisor}; got spatial shape {tuple(spatial_shape)}."
            )

    def forward(self, x: Tensor, normalize: bool = True, mask: Tensor | None = None,
                mask_token: Tensor | None = None) -> list[Tensor]:
        if self.fast:
            return fast_swin.encoder_forward(self, x, normalize, mask, mask_token)
        x0 = self.pos_drop(self.patch_embed(x))
        if mask is not None:
            if mask_token is None:
                raise ValueError("SwinEncoder.forward: a mask needs a mask_token")
            w = mask.unsqueeze(1).to(x0.dtype)  # (B, 1, x, y, z)
            x0 = x0 * (1.0 - w) + mask_token.view(1, -1, 1, 1, 1).to(x0.dtype) * w
        outs = [self.proj_out(x0, normalize)]
        for stage in (self.layers1, self.layers2, self.layers3, self.layers4):
            x0 = stage[0](x0.contiguous())
            outs.append(self.proj_out(x0, normalize))
        return outs


def build_encoder(preset: BackbonePreset, in_channels: int = 1, drop_path_rate: float = 0.0,
                  use_checkpoint: bool = False, fast: bool = True) -> SwinEncoder:
    return SwinEncoder(preset, in_channels=in_channels, drop_path_rate=drop_path_rate,
                       use_checkpoint=use_checkpoint, fast=fast)


def encoder_state_dict(encoder: nn.Module) -> dict[str, Tensor]:
    """The encoder's weights under MONAI SwinUNETR names (``swinViT.*``), detached, on CPU."""
    return {ENCODER_PREFIX + k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}


def global_pool(features: Tensor) -> Tensor:
    """Average-pool a ``(B, C, x, y, z)`` feature map to ``(B, C)``: the image-level representation."""
    return features.mean(dim=(2, 3, 4))


def token_grid(preset: BackbonePreset, spatial_shape: Sequence[int], stage: int = 0) -> tuple[int, int, int]:
    """Token grid of encoder output ``stage`` (0 = patch embedding) for an input of ``spatial_shape``."""
    factor = preset.patch_size * 2**stage
    return tuple(int(s) // factor for s in spatial_shape)  # type: ignore[return-value]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
