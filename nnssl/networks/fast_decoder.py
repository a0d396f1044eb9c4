"""The fast path of SwinUNETR's convolutional decoder (MONAI ``UnetResBlock`` / ``UnetrUpBlock``), weight-for-weight
MONAI's: the functions take MONAI's modules and return their outputs within fp32 rounding.

- Maps of at least ``CHANNELS_LAST_MIN_VOXELS`` voxels per sample run channels-last (oneDNN / cuDNN are faster
  there); instance norm runs as ``group_norm`` with one group per channel, the same statistic without
  ``instance_norm``'s reshape copies.
- At high resolution a 2x transposed convolution followed by a 3x3x3 convolution is one 2x2x2 convolution of the
  coarse map (:func:`upconv_weight`), so the upsampled map and the concatenation are never built.
- A block is a chain of segments (conv-norm-lrelu, conv-norm, shortcut) run through a ``segment`` function:
  :func:`run_segment` runs them, :func:`checkpointed_segment` recomputes each in the backward pass, so that only
  one segment's activations exist at a time (``FastSwinUNETR`` uses it for the full-resolution decoder block).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetResBlock, UnetrUpBlock
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

Segment = Callable[..., Tensor]


def run_segment(fn: Callable[..., Tensor], *args) -> Tensor:
    """``fn(*args)``: a segment whose activations autograd stores, as usual."""
    return fn(*args)


def checkpointed_segment(fn: Callable[..., Tensor], *args) -> Tensor:
    """``fn(*args)`` with only its inputs stored; the backward pass recomputes its activations (identical
    values: the same kernels on the same inputs)."""
    return checkpoint(fn, *args, use_reentrant=False)


# Convolutions on maps of at least this many voxels per sample run channels-last: oneDNN's 3x3x3 kernels
# are ~1.3x faster there on CPU (fwd + bwd, bench/RESULTS.md), which outweighs the copies to and from
# the layout instance norm needs; smaller maps stay channels-first, where PyTorch may pick its
# im2col kernel, which copies channels-last input back.
CHANNELS_LAST_MIN_VOXELS = 32**3


def _transpose_copy(x: Tensor, channels_last: bool) -> Tensor:
    """``x`` ``(B, C, D, H, W)`` copied into the other memory layout, one blocked 2D transpose per sample
    (PyTorch's generic strided copy is ~2x slower for this on CPU)."""
    b, c = x.shape[:2]
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    out = torch.empty_like(x, memory_format=fmt)
    src = x.view(b, c, -1) if channels_last else x.permute(0, 2, 3, 4, 1).reshape(b, -1, c)
    dst = out.permute(0, 2, 3, 4, 1).view(b, -1, c) if channels_last else out.view(b, c, -1)
    for i in range(b):
        dst[i].copy_(src[i].t())
    return out


class _ToLayout(torch.autograd.Function):
    """Change the memory layout of a ``(B, C, D, H, W)`` tensor; the gradient goes back to the input's."""

    @staticmethod
    def forward(ctx, x: Tensor, channels_last: bool) -> Tensor:
        ctx.channels_last = channels_last
        return _transpose_copy(x, channels_last)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        if _is_channels_last(grad) == ctx.channels_last:
            return _transpose_copy(grad, not ctx.channels_last), None
        fmt = torch.contiguous_format if ctx.channels_last else torch.channels_last_3d
        return grad.contiguous(memory_format=fmt), None


def _is_channels_last(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()


def _channels_last(x: Tensor) -> Tensor:
    if _is_channels_last(x) or x.shape[1] == 1:
        return x
    return _ToLayout.apply(x.contiguous(), True)


def _channels_first(x: Tensor) -> Tensor:
    if x.is_contiguous():
        return x
    return _ToLayout.apply(x.contiguous(memory_format=torch.channels_last_3d), False)


def _layout(x: Tensor) -> Tensor:
    """Channels-last for large maps (see ``CHANNELS_LAST_MIN_VOXELS``), channels-first otherwise."""
    if x[0, 0].numel() >= CHANNELS_LAST_MIN_VOXELS:
        return _channels_last(x)
    return _channels_first(x)


def _instance_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """MONAI's ``InstanceNorm3d`` as ``group_norm`` with one group per channel: the same statistic, without
    ``instance_norm``'s reshape copies (about 2x faster, fwd + bwd, on CPU). Channels-first input, because
    PyTorch's channels-last group norm computes the variance in one pass (errors of 1e-3 when the mean
    is large against the spread).

    Under autocast it normalises in the activation's dtype (the kernel accumulates its statistics in fp32)
    instead of on an fp32 copy: that copy, kept for the backward, and the fp32 output would double the
    memory of every full-resolution decoder activation.
    """
    if x[0, 0].numel() == 1:  # as InstanceNorm3d: one voxel per channel would normalise to 0
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {list(x.shape)}")
    x = _channels_first(x)
    weight, bias = (None if p is None else p.to(x.dtype) for p in (norm.weight, norm.bias))
    with torch.autocast(x.device.type, enabled=False):
        return F.group_norm(x, x.shape[1], weight, bias, norm.eps)


def pointwise_conv(conv: nn.Conv3d, x: Tensor) -> Tensor:
    """A 1x1x1 convolution as a matrix product over channels, in ``x``'s memory layout (PyTorch would run
    it as im2col + GEMM, or convert a channels-last input)."""
    weight = conv.weight.flatten(1)  # (C_out, C_in)
    if _is_channels_last(x):
        return F.linear(x.permute(0, 2, 3, 4, 1), weight, conv.bias).permute(0, 4, 1, 2, 3)
    out = torch.matmul(weight, x.flatten(2))  # (B, C_out, D * H * W)
    if conv.bias is not None:
        out = out + conv.bias[:, None]
    return out.view(x.shape[0], -1, *x.shape[2:])


def _conv_norm(conv: nn.Module, norm: nn.Module, x: Tensor) -> Tensor:
    return _instance_norm(norm, conv(x))


def _conv_norm_lrelu(block: UnetResBlock, x: Tensor) -> Tensor:
    out = _instance_norm(block.norm1, block.conv1(x))
    return block.lrelu(_layout(out))


def _res_shortcut(block: UnetResBlock, x: Tensor) -> Tensor:
    """The 1x1 convolution and norm on the shortcut (MONAI builds them when the channels change)."""
    return _instance_norm(block.norm3, pointwise_conv(block.conv3.conv, x))


def res_block(block: UnetResBlock, x: Tensor, segment: Segment = run_segment) -> Tensor:
    """MONAI ``UnetResBlock.forward`` (conv-norm-lrelu-conv-norm + [1x1 conv-norm] shortcut, lrelu).

    Activations change layout before the (in-place) leaky ReLU, so the tensor the ReLU keeps for its
    backward is the one the next convolution keeps: no activation is stored in both layouts. The segments
    (conv-norm-lrelu, conv-norm, shortcut) run through ``segment`` (:func:`checkpointed_segment`: recomputed
    in the backward pass); the sum and the last leaky ReLU store only the block's output.
    """
    x = _layout(x)
    out = segment(_conv_norm_lrelu, block, x)
    out = segment(_conv_norm, block.conv2, block.norm2, out)
    out += segment(_res_shortcut, block, x) if hasattr(block, "conv3") else _channels_first(x)
    return block.lrelu(_layout(out))


# _UPCONV_TAPS[p, t, k, a] = 1 when, along one axis, output parity p of a 3-tap convolution applied after a
# stride-2 transposed convolution reads, through kernel tap k, the transposed kernel's tap a at coarse
# offset t - 1 + p: fine voxel 2i + p + (k - 1) is coarse voxel i + t - 1 + p, transposed-kernel tap a.
_UPCONV_TAPS = torch.zeros(2, 2, 3, 2)
for _p, _t, _k, _a in ((0, 0, 0, 1), (0, 1, 1, 0), (0, 1, 2, 1), (1, 0, 0, 0), (1, 0, 1, 1), (1, 1, 2, 0)):
    _UPCONV_TAPS[_p, _t, _k, _a] = 1.0


def upconv_weight(up: Tensor, conv: Tensor) -> Tensor:
    """One kernel for ``conv3d(conv_transpose3d(x, up, stride=2), conv, padding=1)``.

    ``up``: ``(C_in, C_mid, 2, 2, 2)``, ``conv``: ``(C_out, C_mid, 3, 3, 3)``. Returns ``(8 * C_out, C_in,
    2, 2, 2)``: a 2x2x2 convolution of the *coarse* map (padding 1) whose output channel block
    ``p = 4 pd + 2 ph + pw`` holds the fine voxels of parity ``(pd, ph, pw)``; see :func:`_interleave_add`.
    27 taps at the fine resolution become 8 at the coarse one, and the upsampled map is never stored.
    """
    s = _UPCONV_TAPS.to(conv)
    a = torch.einsum("moxyz,ptxa->moyzpta", conv, s)
    a = torch.einsum("moyzpta,quyb->mozptaqub", a, s)
    a = torch.einsum("mozptaqub,rvzc->moptaqubrvc", a, s)
    k = torch.einsum("moptaqubrvc,koabc->pqrmktuv", a, up)  # (2, 2, 2, C_out, C_in, 2, 2, 2)
    return k.reshape(8 * conv.shape[0], up.shape[0], 2, 2, 2)


_PARITIES = [(pd, ph, pw) for pd in range(2) for ph in range(2) for pw in range(2)]


class _InterleaveAdd(torch.autograd.Function):
    """``base += fine map of parity blocks``: ``base`` ``(B, C, 2d, 2h, 2w)`` (modified in place),
    ``parts`` ``(B, 8 * C, d + 1, h + 1, w + 1)`` from a :func:`upconv_weight` convolution.

    The backward gathers the 8 parity blocks into one zero-initialised gradient (autograd's slicing would
    allocate a full-size zero tensor per block)."""

    @staticmethod
    def forward(ctx, base: Tensor, parts: Tensor) -> Tensor:
        ctx.mark_dirty(base)
        ctx.parts_shape, ctx.parts_channels_last = parts.shape, _is_channels_last(parts)
        return _add_parity_blocks(base, parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        fmt = torch.channels_last_3d if ctx.parts_channels_last else torch.contiguous_format
        parts = grad.new_zeros(ctx.parts_shape).contiguous(memory_format=fmt)
        for fine, coarse in _parity_views(grad, parts):
            coarse.copy_(fine)
        return grad, parts


def _interleave_add(base: Tensor, parts: Tensor) -> Tensor:
    """:class:`_InterleaveAdd` where autograd records it; a plain in-place add without autograd (inference),
    where ``torch.compile`` cannot trace the autograd function's ``mark_dirty``."""
    if torch.is_grad_enabled() and (base.requires_grad or parts.requires_grad):
        return _InterleaveAdd.apply(base, parts)
    return _add_parity_blocks(base, parts)


def _add_parity_blocks(base: Tensor, parts: Tensor) -> Tensor:
    for fine, coarse in _parity_views(base, parts):
        fine.add_(coarse)
    return base


def _parity_views(fine: Tensor, parts: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Matching views (fine voxels of one parity, that parity's block of ``parts``), any memory layout."""
    b, c, d2, h2, w2 = fine.shape
    d, h, w = d2 // 2, h2 // 2, w2 // 2
    grid = fine.unflatten(2, (d, 2)).unflatten(4, (h, 2)).unflatten(6, (w, 2))  # (B, C, d, 2, h, 2, w, 2)
    blocks = parts.unflatten(1, (8, c))  # (B, 8, C, d + 1, h + 1, w + 1)
    return [(grid[:, :, :, pd, :, ph, :, pw], blocks[:, i, :, pd:pd + d, ph:ph + h, pw:pw + w])
            for i, (pd, ph, pw) in enumerate(_PARITIES)]


def _add_upsampled(base: Tensor, x: Tensor, up: Tensor) -> Tensor:
    """``base + conv_transpose3d(x, up, stride=2)`` for a 2x2x2 kernel: one matrix product, added in place."""
    b, c, d, h, w = x.shape
    fine = torch.matmul(x.permute(0, 2, 3, 4, 1), up.flatten(1))  # (B, d, h, w, C_out * 8)
    fine = fine.view(b, d, h, w, -1, 2, 2, 2).permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, C_out, d, 2, h, 2, w, 2)
    grid = base.unflatten(2, (d, 2)).unflatten(4, (h, 2)).unflatten(6, (w, 2))
    grid.add_(fine)
    return base


def _folded_up_conv_norm_lrelu(block: UnetrUpBlock, x: Tensor, skip: Tensor) -> Tensor:
    """lrelu(norm1(conv1([transp_conv(x) | skip]))) with the transposed convolution folded into conv1."""
    res = block.conv_block
    up = block.transp_conv.conv.weight  # (C_in, C, 2, 2, 2)
    c = up.shape[1]
    conv1 = res.conv1.conv.weight  # (C, 2C, 3, 3, 3): [upsampled | skip] input channels
    out = F.conv3d(skip, conv1[:, c:], padding=1)
    out = _interleave_add(out, F.conv3d(x, upconv_weight(up, conv1[:, :c]), padding=1))
    out = _instance_norm(res.norm1, out)  # rebound: the convolution's output is freed before the layout copy
    return res.lrelu(_layout(out))


def _folded_up_shortcut(block: UnetrUpBlock, x: Tensor, skip: Tensor) -> Tensor:
    """norm3(conv3([transp_conv(x) | skip])), the 1x1 shortcut with the transposed convolution folded in."""
    res = block.conv_block
    up = block.transp_conv.conv.weight  # (C_in, C, 2, 2, 2)
    c = up.shape[1]
    shortcut = res.conv3.conv.weight.flatten(1)  # (C, 2C)
    folded = torch.einsum("coxyz,mo->cmxyz", up, shortcut[:, :c])  # the 1x1 conv after the upsampling
    skip_part = F.linear(skip.permute(0, 2, 3, 4, 1), shortcut[:, c:]).permute(0, 4, 1, 2, 3)
    return _instance_norm(res.norm3, _add_upsampled(skip_part, x, folded))


def up_block(block: UnetrUpBlock, x: Tensor, skip: Tensor, segment: Segment = run_segment) -> Tensor:
    """MONAI ``UnetrUpBlock.forward``: 2x transposed conv, concatenation with ``skip``, ``UnetResBlock``.

    At high resolution the transposed convolution is folded into the residual block's first
    convolution and 1x1 shortcut (:func:`upconv_weight`), so the upsampled map and the concatenation
    are never built: the 3x3x3 convolution over the concatenation costs 27 (upsampled) + 27 (skip)
    multiply-adds per voxel and channel pair; folded, 8 + 27. Segments as in :func:`res_block`.
    """
    if skip[0, 0].numel() < CHANNELS_LAST_MIN_VOXELS:
        return res_block(block.conv_block, torch.cat((block.transp_conv(x), skip), dim=1), segment)
    res = block.conv_block
    x, skip = _layout(x), _layout(skip)
    out = segment(_folded_up_conv_norm_lrelu, block, x, skip)
    out = segment(_conv_norm, res.conv2, res.norm2, out)
    out += segment(_folded_up_shortcut, block, x, skip)
    return res.lrelu(_layout(out))
