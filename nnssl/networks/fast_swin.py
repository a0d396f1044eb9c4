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
  (oneDNN / cuDNN) run faster on; the decoder's own fast path is :mod:`nnssl.networks.fast_decoder`.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetrBasicBlock
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import SwinTransformer, WindowAttention, compute_mask, get_window_size
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from nnssl.networks.fast_decoder import checkpointed_segment, pointwise_conv, res_block, up_block


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


class FastSwinUNETR(SwinUNETR):
    """MONAI ``SwinUNETR`` (Hatamizadeh et al. 2022) whose forward runs the fast path of this module.

    Same constructor, modules, parameter names and outputs (within fp32 rounding) as MONAI's. Expects the
    MONAI defaults ``norm_name="instance"``, ``res_block`` blocks and ``downsample="merging"``, as
    ``build_swinunetr`` builds it. ``(B, C_in, X, Y, Z)`` -> ``(B, C_out, X, Y, Z)`` logits.
    ``use_checkpoint`` (set by ``build_swinunetr``) also recomputes the decoder blocks in the backward
    pass instead of storing their activations, the largest part of a step's memory (the full-resolution
    block segment by segment, :func:`~nnssl.networks.fast_decoder.checkpointed_segment`).
    """

    use_checkpoint: bool = False

    def _block(self, block: nn.Module, fast_forward, *args: Tensor, segments: bool = False) -> Tensor:
        """``block(*args)`` on the fast path; a block with forward hooks (CKA's layer taps) runs its own
        module call instead, so the hooks see it (the same output within fp32 rounding). With checkpointing
        the block is recomputed whole in the backward pass, or, with ``segments``, segment by segment."""
        hooked = bool(block._forward_hooks or block._forward_pre_hooks)
        module = block.layer if isinstance(block, UnetrBasicBlock) else block
        fn = block if hooked else functools.partial(fast_forward, module)
        if not (self.use_checkpoint and torch.is_grad_enabled()):
            return fn(*args)
        if segments and not hooked:
            return fast_forward(module, *args, segment=checkpointed_segment)
        return checkpoint(fn, *args, use_reentrant=False)

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
        # the full-resolution decoder block is the last of the forward and the first of the backward: recomputed
        # whole, all its full-resolution activations would exist at once there, the step's peak; recomputed
        # segment by segment, one segment's do, and its segments' outputs are stored only for that moment
        out = self._block(self.decoder1, up_block, dec0, enc0, segments=True)
        return pointwise_conv(self.out.conv.conv, out).contiguous()


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
