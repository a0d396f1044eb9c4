"""Small heads SSL methods put on the Swin encoder, and helpers for teachers.

Heads are data: each is a few lines naming its layers and citing the sentence that defines it.
"""
from __future__ import annotations

import copy

import torch
from monai.networks.layers import DropPath
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from nnssl.networks.swin import SwinEncoder, global_pool


class MLPHead(nn.Sequential):
    """``num_layers`` linear layers with optional BatchNorm and GELU/ReLU between them (none after the last).

    SimCLR: "a MLP with one hidden layer" (2 layers, ReLU); MoCo v3: 3-layer projector and 2-layer
    predictor with BN (the projector's last BN without affine); BYOL: 2 layers, 4096 hidden, BN, ReLU.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2,
                 batch_norm: bool = True, last_batch_norm: bool = False, activation: type[nn.Module] = nn.ReLU):
        if num_layers < 1:
            raise ValueError(f"MLPHead needs at least 1 layer, got num_layers={num_layers}")
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == num_layers - 1
            norm_follows = (batch_norm and not last) or (last and last_batch_norm)
            layers.append(nn.Linear(d_in, d_out, bias=not norm_follows))  # a norm makes the bias redundant
            if not last:
                if batch_norm:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(activation())
            elif last_batch_norm:
                layers.append(nn.BatchNorm1d(d_out, affine=False))
        super().__init__(*layers)


class DINOHead(nn.Module):
    """DINO projection head (Caron et al. 2021, Sec. 3.1 / Appendix): "a 3-layer multi-layer perceptron
    (MLP) with hidden dimension 2048 followed by l2 normalization and a weight normalized fully connected
    layer with K dimensions". Also iBOT's and SMIT's patch and global heads.

    ``(..., in_dim) -> (..., out_dim)`` logits. The last layer's norm (``weight_g``) is fixed to 1.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), nn.GELU()]
        layers.append(nn.Linear(dims[-1], bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        self.last_layer.parametrizations.weight.original0.requires_grad = False

    def forward(self, x: Tensor) -> Tensor:
        # float32 from the l2 normalization on, also under autocast: the logits are cosines (|l| <= 1) that
        # the losses divide by temperatures down to 0.04, where bf16's rounding of 2^-9 would move each
        # softmax argument by up to 0.05
        x = self.mlp(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.last_layer(nn.functional.normalize(x.float(), dim=-1))


class PooledEncoder(nn.Module):
    """Encoder -> average-pooled last-stage tokens ``(B, C_last)``: the image-level representation."""

    def __init__(self, encoder: SwinEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> Tensor:
        return global_pool(self.encoder(x)[-1])


class PixelShuffle3d(nn.Module):
    """3D pixel shuffle: ``(B, C * r**3, X, Y, Z) -> (B, C, rX, rY, rZ)``."""

    def __init__(self, upscale_factor: int):
        super().__init__()
        self.r = upscale_factor

    def forward(self, x: Tensor) -> Tensor:
        b, c, nx, ny, nz = x.shape
        r = self.r
        out_c = c // r**3
        x = x.reshape(b, out_c, r, r, r, nx, ny, nz)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # (B, C, X, r, Y, r, Z, r)
        return x.reshape(b, out_c, nx * r, ny * r, nz * r)


class ReconstructionHead(nn.Sequential):
    """SimMIM's light decoder in 3D: a 1x1x1 conv from a feature map to ``stride**3 * out_channels``
    values per token, then a pixel shuffle back to voxels (Xie et al. 2022, Sec. 3.3)."""

    def __init__(self, in_channels: int, stride: int, out_channels: int = 1):
        super().__init__(nn.Conv3d(in_channels, stride**3 * out_channels, kernel_size=1), PixelShuffle3d(stride))


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with gradients off: the EMA teacher/target network (updated by the loop, not the optimizer)."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad = False
    return teacher


def without_drop_path(module: nn.Module) -> nn.Module:
    """``module`` with stochastic depth off (every DropPath's rate set to 0), in place. EMA targets run so in
    BYOL and MoCo v3 (their target/momentum encoders have no drop path) while batch norm keeps its train mode."""
    for layer in module.modules():
        if isinstance(layer, DropPath):
            layer.drop_prob = 0.0
    return module


@torch.no_grad()
def update_momentum(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter; buffers copied."""
    for p_s, p_t in zip(student.parameters(), teacher.parameters()):
        p_t.mul_(momentum).add_(p_s.detach(), alpha=1.0 - momentum)
    for b_s, b_t in zip(student.buffers(), teacher.buffers()):
        b_t.copy_(b_s)


class SwinSSLDecoder(nn.Sequential):
    """Swin UNETR SSL's inpainting decoder (Tang et al. CVPR 2022; ``upsample="vae"`` in the reference
    ``SSLHead``): ``num_upsamplings`` x [3x3x3 conv, instance norm, leaky ReLU, x2 trilinear upsampling],
    then a 1x1x1 conv to the image channels. Channels halve from ``in_channels`` down to a floor of
    ``in_channels // 16`` (768 -> 384 -> 192 -> 96 -> 48 -> 48 -> 1 for the 48-feature Swin).

    ``(B, in_channels, x, y, z) -> (B, out_channels, x * 2**n, y * 2**n, z * 2**n)``, n = ``num_upsamplings``
    (5 for the last Swin stage at stride 32).
    """

    def __init__(self, in_channels: int, out_channels: int = 1, num_upsamplings: int = 5):
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(num_upsamplings):
            next_channels = in_channels // 2 ** min(i + 1, 4)
            layers += [nn.Conv3d(channels, next_channels, kernel_size=3, padding=1), nn.InstanceNorm3d(next_channels),
                       nn.LeakyReLU(), nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)]
            channels = next_channels
        layers.append(nn.Conv3d(channels, out_channels, kernel_size=1))
        super().__init__(*layers)
