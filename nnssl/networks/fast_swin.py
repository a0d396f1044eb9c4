"""A faster forward path for MONAI's 3D Swin Transformer and SwinUNETR, weight-for-weight identical.

The functions here run the *same modules* MONAI builds (``patch_embed``, ``layers{1..4}.0.blocks.*``,
``encoder1`` ... ``out``), so parameter and buffer names, initialisation and state dicts are MONAI's;
only the order of the work changes. Outputs equal the stock network within fp32 rounding
(``tests/test_fast_swin.py``). What differs from ``monai.networks.nets.swin_unetr`` (Liu et al. 2021,
Swin Transformer; Hatamizadeh et al. 2022, Swin UNETR) and why:

- Tokens stay in one ``(B, D, H, W, C)`` buffer for the whole encoder. MONAI rearranges to
  ``(B, C, D, H, W)`` and back around every stage and every output norm (two copies each).
- A (shifted) window partition is one gather with a cached index, and its reverse one gather with the
  inverse index (forward and backward), instead of ``torch.roll`` + ``permute().contiguous()`` each way.
- Attention adds the relative position bias in place on the score matrix and the shift mask on the
  windows that need it, without materialising ``(B * nW, heads, n, n)`` sums; on CUDA it calls
  ``scaled_dot_product_attention`` with the bias (+ shift mask) as additive mask, in training too.
- Patch merging is one strided copy; MONAI's order of the 8 neighbours is applied to the (small)
  norm/reduction weights instead of the (large) feature map.
- Encoder outputs are ``(B, C, D, H, W)`` views of channels-last memory, which the decoder convolutions
  (oneDNN / cuDNN) run faster on; instance norm runs as ``group_norm`` with one group per channel, the
  same statistic without ``instance_norm``'s reshape copies.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetrBasicBlock, UnetResBlock, UnetrUpBlock
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import SwinTransformer, WindowAttention, compute_mask, get_window_size
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


# ---------------------------------------------------------------------------------------------------
# window partition as a gather


def _cached_constant(maxsize: int):
    """``functools.lru_cache`` for index and mask tensors, always built outside inference mode: a tensor
    cached under ``torch.inference_mode`` (nnssl_cka, nnU-Net's prediction) could not take part in a later
    training step in the same process. Under ``torch.compile`` the cache is bypassed: the tensors are built
    inside the graph (constants to the compiler), where a Python-side cache would only be a guard hazard."""
    def decorate(fn):
        @functools.lru_cache(maxsize=maxsize)
        def cached(*args):
            with torch.inference_mode(False):
                return fn(*args)

        @functools.wraps(fn)
        def lookup(*args):
            if torch.compiler.is_compiling():
                return fn(*args)
            return cached(*args)
        lookup.cache_clear = cached.cache_clear
        return lookup
    return decorate


@_cached_constant(maxsize=128)
def _window_index(grid: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int],
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """Token order of MONAI's ``window_partition(torch.roll(x, -shift))`` on a padded ``grid``.

    Returns ``(order, inverse)``, both ``(prod(grid),)`` long: ``x.flatten(1, 3)[:, order]`` lists the
    tokens window by window (windows in ``d, h, w`` order, tokens in ``d, h, w`` order inside each), and
    ``inverse`` undoes it.
    """
    axes = [(torch.arange(g).view(g // w, w) + s) % g for g, w, s in zip(grid, window, shift)]  # (nb, w)
    d, h, w = axes
    hp, wp = grid[1], grid[2]
    order = (d[:, None, None, :, None, None] * hp + h[None, :, None, None, :, None]) * wp \
        + w[None, None, :, None, None, :]
    order = order.reshape(-1)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return order.to(device), inverse.to(device)


class _Permute(torch.autograd.Function):
    """``x[:, order]`` along dim 1 whose backward is the inverse gather (not a scatter-add)."""

    @staticmethod
    def forward(ctx, x: Tensor, order: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(1, order)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


@_cached_constant(maxsize=64)
def _shift_mask(grid: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int],
                device: torch.device) -> Tensor:
    """MONAI's shifted-window mask ``(nW, n, n)`` (0 or -100), computed once per shape."""
    return compute_mask(list(grid), window, shift, device)


# ---------------------------------------------------------------------------------------------------
# attention


def relative_bias(attn: WindowAttention, n: int) -> Tensor:
    """The relative position bias ``(heads, n, n)`` of a window of ``n`` tokens, exactly as MONAI gathers it
    (``relative_position_index[:n, :n]``, also when the window is cut to a smaller feature map).

    Without autograd (inference) the gathered bias is cached on the module per ``n`` and table version;
    not under ``torch.compile``, where the key (``_version``, ``data_ptr()``) would break the graph and
    the compiler keeps the gather in the graph anyway.
    """
    table = attn.relative_position_bias_table
    index = attn.relative_position_index[:n, :n].reshape(-1)
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return table.index_select(0, index).view(n, n, -1).permute(2, 0, 1)
    cache = attn.__dict__.setdefault("_nnssl_bias_cache", {})
    key = (n, table._version, table.data_ptr())
    if key not in cache:
        cache.clear()
        cache[key] = table.index_select(0, index).view(n, n, -1).permute(2, 0, 1).contiguous()
    return cache[key]


def window_attention(attn: WindowAttention, x: Tensor, mask: Tensor | None, sdpa: bool) -> Tensor:
    """MONAI ``WindowAttention.forward`` on windows ``x`` ``(B * nW, n, C)``; ``mask`` ``(nW, n, n)`` or None.

    With ``sdpa`` the scores never materialise in the forward (``scaled_dot_product_attention`` with
    the bias, plus the shift mask, as additive ``attn_mask``; the bias keeps its gradient).
    """
    b, n, c = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    bias = relative_bias(attn, n).to(qkv.dtype)  # (heads, n, n)
    if sdpa:
        q, k, v = qkv.unbind(0)  # (B * nW, heads, n, c / heads) each
        if mask is not None:
            nw = mask.shape[0]
            bias = (bias.unsqueeze(0) + mask.to(q.dtype).unsqueeze(1)).repeat(b // nw, 1, 1, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
    else:
        # contiguous q, k, v (one copy each, scaled in place for q) feed the batched matmuls without the
        # further copies MONAI's strided views cost; the bias and mask are added in place (a matmul's
        # backward does not need its output), saving two score-sized buffers
        q, k, v = (t.contiguous() for t in qkv.unbind(0))  # (B * nW, heads, n, c / heads) each
        scores = torch.matmul(q.mul_(attn.scale), k.transpose(-2, -1))  # (B * nW, heads, n, n)
        scores += bias
        if mask is not None:  # (nW, n, n) -> (B * nW, 1, n, n); added to the base tensor, not a view of it,
            scores += mask.to(q.dtype).repeat(b // mask.shape[0], 1, 1).unsqueeze(1)  # so no grad copy
        out = torch.matmul(scores.softmax(dim=-1), v)
    return attn.proj(out.transpose(1, 2).reshape(b, n, c))


# ---------------------------------------------------------------------------------------------------
# blocks and stages


def _attention_part(block: nn.Module, x: Tensor, window: tuple[int, int, int], shift: tuple[int, int, int],
                    sdpa: bool) -> Tensor:
    """``SwinTransformerBlock.forward_part1``: norm, (shifted) window attention, reverse; ``(B, D, H, W, C)``."""
    b, d, h, w, c = x.shape
    y = block.norm1(x)
    pads = [(ws - s % ws) % ws for s, ws in zip((d, h, w), window)]
    if any(pads):
        y = F.pad(y, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
    grid = tuple(s + p for s, p in zip((d, h, w), pads))
    n = window[0] * window[1] * window[2]
    order, inverse = _window_index(grid, window, shift, y.device)
    windows = _Permute.apply(y.reshape(b, -1, c), order, inverse).view(-1, n, c)
    mask = _shift_mask(grid, window, shift, y.device) if any(shift) else None
    out = window_attention(block.attn, windows, mask, sdpa)
    out = _Permute.apply(out.view(b, -1, c), inverse, order).view(b, *grid, c)
    if any(pads):
        out = out[:, :d, :h, :w].contiguous()
    return out


def _mlp_part(block: nn.Module, x: Tensor) -> Tensor:
    return block.mlp(block.norm2(x))


def swin_block(block: nn.Module, x: Tensor, window: tuple[int, int, int], shift: tuple[int, int, int],
               sdpa: bool) -> Tensor:
    """``SwinTransformerBlock.forward`` on ``(B, D, H, W, C)`` tokens (drop path and checkpointing included)."""
    if block.use_checkpoint and torch.is_grad_enabled():
        x = x + block.drop_path(checkpoint(_attention_part, block, x, window, shift, sdpa, use_reentrant=False))
        return x + block.drop_path(checkpoint(_mlp_part, block, x, use_reentrant=False))
    x = x + block.drop_path(_attention_part(block, x, window, shift, sdpa))
    return x + block.drop_path(_mlp_part(block, x))


# MONAI's PatchMerging concatenates the 8 neighbours in this (d, h, w) offset order; the natural order of
# a strided view is (0,0,0), (0,0,1), (0,1,0), ... We permute the weights, not the feature map.
_MONAI_MERGE_ORDER = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1))
_NATURAL_TO_MONAI = [_MONAI_MERGE_ORDER.index((i >> 2 & 1, i >> 1 & 1, i & 1)) for i in range(8)]


def patch_merging(merge: nn.Module, x: Tensor) -> Tensor:
    """MONAI ``PatchMerging`` (v0.9 order) on ``(B, D, H, W, C)`` -> ``(B, D/2, H/2, W/2, 2C)``."""
    b, d, h, w, c = x.shape
    if d % 2 or h % 2 or w % 2:
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        b, d, h, w, c = x.shape
    x = x.view(b, d // 2, 2, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(
        b, d // 2, h // 2, w // 2, 8 * c)
    cols = torch.tensor(_NATURAL_TO_MONAI, device=x.device).repeat_interleave(c) * c \
        + torch.arange(c, device=x.device).repeat(8)
    weight = merge.norm.weight.index_select(0, cols) if merge.norm.weight is not None else None
    bias = merge.norm.bias.index_select(0, cols) if merge.norm.bias is not None else None
    x = F.layer_norm(x, (8 * c,), weight, bias, merge.norm.eps)
    return F.linear(x, merge.reduction.weight.index_select(1, cols))


def swin_stage(layer: nn.Module, x: Tensor, sdpa: bool) -> Tensor:
    """MONAI ``BasicLayer.forward`` on ``(B, D, H, W, C)`` tokens, without its layout round trips."""
    window, shift = get_window_size(tuple(x.shape[1:4]), layer.window_size, layer.shift_size)
    for i, block in enumerate(layer.blocks):
        x = swin_block(block, x, window, shift if i % 2 else (0, 0, 0), sdpa)
    if layer.downsample is not None:
        x = patch_merging(layer.downsample, x)
    return x


def _stage_output(x: Tensor, normalize: bool) -> Tensor:
    """``(B, D, H, W, C)`` tokens -> ``(B, C, D, H, W)`` output (a view), layer-normalised if asked."""
    if normalize:
        x = F.layer_norm(x, x.shape[-1:])
    return x.permute(0, 4, 1, 2, 3)


def encoder_forward(encoder: SwinTransformer, x: Tensor, normalize: bool = True, mask: Tensor | None = None,
                    mask_token: Tensor | None = None, sdpa: bool | None = None) -> list[Tensor]:
    """``SwinEncoder.forward`` (MONAI ``SwinTransformer.forward`` + mask token), fast path.

    ``x``: ``(B, C_in, X, Y, Z)``. Returns the 5 maps ``(B, C_i, X/2^(i+1), ...)``, channels-last in memory.
    ``sdpa`` defaults to True on CUDA, where the fused kernels win, and False on CPU, where PyTorch's
    kernels cannot return the bias gradient and fall back to a slower unfused path.
    """
    if sdpa is None:
        sdpa = x.is_cuda
    tokens = encoder.pos_drop(encoder.patch_embed(x)).permute(0, 2, 3, 4, 1).contiguous()  # (B, D, H, W, C)
    if mask is not None:
        if mask_token is None:
            raise ValueError("SwinEncoder.forward: a mask needs a mask_token")
        tokens = torch.where(mask.unsqueeze(-1), mask_token.to(tokens.dtype), tokens)
    outs = [_stage_output(tokens, normalize)]
    for stage in (encoder.layers1, encoder.layers2, encoder.layers3, encoder.layers4):
        tokens = swin_stage(stage[0], tokens, sdpa)
        outs.append(_stage_output(tokens, normalize))
    return outs


# ---------------------------------------------------------------------------------------------------
# decoder

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


def _pointwise(conv: nn.Conv3d, x: Tensor) -> Tensor:
    """A 1x1x1 convolution as a matrix product over channels, in ``x``'s memory layout (PyTorch would run
    it as im2col + GEMM, or convert a channels-last input)."""
    weight = conv.weight.flatten(1)  # (C_out, C_in)
    if _is_channels_last(x):
        return F.linear(x.permute(0, 2, 3, 4, 1), weight, conv.bias).permute(0, 4, 1, 2, 3)
    out = torch.matmul(weight, x.flatten(2))  # (B, C_out, D * H * W)
    if conv.bias is not None:
        out = out + conv.bias[:, None]
    return out.view(x.shape[0], -1, *x.shape[2:])


def res_block(block: UnetResBlock, x: Tensor) -> Tensor:
    """MONAI ``UnetResBlock.forward`` (conv-norm-lrelu-conv-norm + [1x1 conv-norm] shortcut, lrelu).

    Activations change layout before the (in-place) leaky ReLU, so the tensor the ReLU keeps for its
    backward is the one the next convolution keeps: no activation is stored in both layouts.
    """
    x = _layout(x)
    out = block.lrelu(_layout(_instance_norm(block.norm1, block.conv1(x))))
    out = _instance_norm(block.norm2, block.conv2(out))
    if hasattr(block, "conv3"):
        out += _instance_norm(block.norm3, _pointwise(block.conv3.conv, x))
    else:
        out += _channels_first(x)
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


def up_block(block: UnetrUpBlock, x: Tensor, skip: Tensor) -> Tensor:
    """MONAI ``UnetrUpBlock.forward``: 2x transposed conv, concatenation with ``skip``, ``UnetResBlock``.

    At high resolution the transposed convolution is folded into the residual block's first
    convolution and 1x1 shortcut (:func:`upconv_weight`), so the upsampled map and the concatenation
    are never built: the 3x3x3 convolution over the concatenation costs 27 (upsampled) + 27 (skip)
    multiply-adds per voxel and channel pair; folded, 8 + 27.
    """
    if skip[0, 0].numel() < CHANNELS_LAST_MIN_VOXELS:
        return res_block(block.conv_block, torch.cat((block.transp_conv(x), skip), dim=1))
    res = block.conv_block
    up = block.transp_conv.conv.weight  # (C_in, C, 2, 2, 2)
    c = up.shape[1]
    conv1 = res.conv1.conv.weight  # (C, 2C, 3, 3, 3): [upsampled | skip] input channels
    x, skip = _layout(x), _layout(skip)
    out = F.conv3d(skip, conv1[:, c:], padding=1)
    out = _interleave_add(out, F.conv3d(x, upconv_weight(up, conv1[:, :c]), padding=1))
    out = res.lrelu(_layout(_instance_norm(res.norm1, out)))
    out = _instance_norm(res.norm2, res.conv2(out))
    shortcut = res.conv3.conv.weight.flatten(1)  # (C, 2C)
    folded = torch.einsum("coxyz,mo->cmxyz", up, shortcut[:, :c])  # the 1x1 conv after the upsampling
    skip_part = F.linear(skip.permute(0, 2, 3, 4, 1), shortcut[:, c:]).permute(0, 4, 1, 2, 3)
    out += _instance_norm(res.norm3, _add_upsampled(skip_part, x, folded))
    return res.lrelu(_layout(out))


class FastSwinUNETR(SwinUNETR):
    """MONAI ``SwinUNETR`` (Hatamizadeh et al. 2022) whose forward runs the fast path of this module.

    Same constructor, modules, parameter names and outputs (within fp32 rounding) as MONAI's. Expects the
    MONAI defaults ``norm_name="instance"``, ``res_block`` blocks and ``downsample="merging"``, as
    ``build_swinunetr`` builds it. ``(B, C_in, X, Y, Z)`` -> ``(B, C_out, X, Y, Z)`` logits.
    ``use_checkpoint`` (set by ``build_swinunetr``) also recomputes the decoder blocks in the backward
    pass instead of storing their activations, the largest part of a step's memory.
    """

    use_checkpoint: bool = False

    def _block(self, block: nn.Module, fast_forward, *args: Tensor) -> Tensor:
        """``block(*args)`` on the fast path; a block with forward hooks (CKA's layer taps) runs its own
        module call instead, so the hooks see it (the same output within fp32 rounding)."""
        if block._forward_hooks or block._forward_pre_hooks:
            fn = block
        else:
            fn = functools.partial(fast_forward, block.layer if isinstance(block, UnetrBasicBlock) else block)
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, x_in: Tensor) -> Tensor:
        if not (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()):
            self._check_input_size(x_in.shape[2:])  # numpy: a graph break under torch.compile
        hidden = self.swinViT(x_in, self.normalize)
        enc0 = self._block(self.encoder1, res_block, x_in)
        enc1 = self._block(self.encoder2, res_block, hidden[0])
        enc2 = self._block(self.encoder3, res_block, hidden[1])
        enc3 = self._block(self.encoder4, res_block, hidden[2])
        dec4 = self._block(self.encoder10, res_block, hidden[4])
        dec3 = self._block(self.decoder5, up_block, dec4, hidden[3])
        dec2 = self._block(self.decoder4, up_block, dec3, enc3)
        dec1 = self._block(self.decoder3, up_block, dec2, enc2)
        dec0 = self._block(self.decoder2, up_block, dec1, enc1)
        out = self._block(self.decoder1, up_block, dec0, enc0)
        return _pointwise(self.out.conv.conv, out).contiguous()


# ---------------------------------------------------------------------------------------------------
# the rest of a fast training step


def adamw(params, lr: float, weight_decay: float = 0.01, **kwargs) -> torch.optim.AdamW:
    """AdamW with PyTorch's fused kernel: one pass over all parameters instead of ~10 elementwise ops per
    tensor (CUDA, and CPU since torch 2.4). Same update rule as ``torch.optim.AdamW``."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True, **kwargs)


def training_autocast(device: torch.device | str) -> torch.autocast:
    """bf16 autocast on CUDA (tensor cores, half the activation memory); disabled elsewhere, so CPU
    training stays fp32 and equal to the stock network."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
