"""The fast Swin / SwinUNETR path computes MONAI's network: same weights, same outputs and gradients.

Equality is checked in float64, where two orders of summation agree to ~1e-12, so any difference is a
different function; float32 outputs are then checked against the stock network within fp32 rounding.
(float32 *gradients* are not compared: a leaky ReLU input within rounding of 0 flips its slope between
0.01 and 1 in one path and not the other, which moves a low-resolution weight gradient by percents.)
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import window_partition

from nnssl.errors import NnsslError
from nnssl.networks import build_encoder, build_swinunetr, get_preset
from nnssl.networks import fast_decoder, fast_swin
from nnssl.networks.fast_swin import FastSwinUNETR

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pair(network: str, preset_name: str, dtype: torch.dtype, **kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, stock) with the same weights; stock runs MONAI's own forward."""
    preset = get_preset(preset_name)
    torch.manual_seed(0)
    if network == "encoder":
        ours, stock = build_encoder(preset, **kwargs), build_encoder(preset, fast=False)
    else:
        ours, stock = build_swinunetr(preset, 1, 2, **kwargs), build_swinunetr(preset, 1, 2, fast=False)
    stock.load_state_dict(ours.state_dict())
    return ours.to(dtype), stock.to(dtype)


def _outputs_and_grads(net: torch.nn.Module, x: torch.Tensor, **kwargs) -> tuple[list[torch.Tensor], dict]:
    net.zero_grad()
    x = x.clone().requires_grad_()
    out = net(x, **kwargs)
    outs = out if isinstance(out, list) else [out]
    # a fixed, non-symmetric loss so every output element gets its own gradient
    loss = sum((o * torch.linspace(-1, 2, o.numel(), dtype=o.dtype).view(o.shape)).sum() for o in outs)
    loss.backward()
    grads = {name: p.grad for name, p in net.named_parameters() if p.grad is not None}
    return [o.detach() for o in outs], {**grads, "input": x.grad}


def _assert_same(ours: tuple, stock: tuple, atol: float = 1e-10) -> None:
    for a, b in zip(ours[0], stock[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=atol * max(1.0, b.abs().max().item()))
    assert ours[1].keys() == stock[1].keys()
    for name in stock[1]:
        scale = max(stock[1][name].abs().max().item(), 1e-30)
        torch.testing.assert_close(ours[1][name], stock[1][name], rtol=0, atol=atol * scale, msg=name)


def test_fast_swinunetr_equals_monai_in_float64():
    # 32x32x64: decoder1 takes the folded-upsampling, channels-last path, decoder2 the plain one; tiny's
    # window 4 fits the stage-3 grid (4, 4, 8) in two dims (shift 0 there, 2 in the third) and is cut to the
    # stage-4 grid (2, 2, 4)
    ours, stock = _pair("swinunetr", "tiny", torch.float64)
    assert isinstance(ours, FastSwinUNETR) and type(stock) is SwinUNETR
    x = torch.randn(2, 1, 32, 32, 64, dtype=torch.float64)
    _assert_same(_outputs_and_grads(ours, x), _outputs_and_grads(stock, x))


def test_fast_encoder_equals_monai_with_padding_and_mask_token_in_float64():
    # monai preset, window 7: stages 1-3 are padded to multiples of 7 (16 -> 21, 8 -> 14), stage 3 is cut
    # to 4 in two dims, stage 4 to (2, 2, 4); the mask token replaces half the patch embeddings
    ours, stock = _pair("encoder", "monai", torch.float64)
    x = torch.randn(1, 1, 32, 32, 64, dtype=torch.float64)
    mask = torch.zeros(1, 16, 16, 32, dtype=torch.bool)
    mask[:, :, 5:, ::2] = True
    token = torch.randn(48, dtype=torch.float64, requires_grad=True)
    ours_result = _outputs_and_grads(ours, x, mask=mask, mask_token=token)
    token_grad, token.grad = token.grad.clone(), None
    stock_result = _outputs_and_grads(stock, x, mask=mask, mask_token=token)
    _assert_same(ours_result, stock_result)
    torch.testing.assert_close(token_grad, token.grad, rtol=1e-10, atol=0)


def test_fused_attention_path_equals_matmul_path():
    # the CUDA path (scaled_dot_product_attention with the bias + shift mask as attn_mask) runs here
    # on PyTorch's reference kernel
    ours, _ = _pair("encoder", "tiny", torch.float64)
    x = torch.randn(2, 1, 32, 32, 64, dtype=torch.float64)
    matmul = [o.detach() for o in fast_swin.encoder_forward(ours, x, sdpa=False)]
    sdpa = [o.detach() for o in fast_swin.encoder_forward(ours, x, sdpa=True)]
    for a, b in zip(sdpa, matmul):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("network", ["swinunetr", "encoder"])
def test_float32_outputs_match_stock(network):
    ours, stock = _pair(network, "tiny", torch.float32)
    x = torch.randn(1, 1, 32, 32, 64)
    with torch.no_grad():
        for a, b in zip(*(o if isinstance(o, list) else [o] for o in (ours(x), stock(x)))):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_weights_and_names_are_monais():
    ours, stock = _pair("swinunetr", "tiny", torch.float32)
    monai = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4),
                      window_size=4)
    assert list(ours.state_dict()) == list(stock.state_dict()) == list(monai.state_dict())
    assert ours.swinViT.fast and not stock.swinViT.fast


def test_activation_checkpointing_gives_the_same_gradients():
    plain, _ = _pair("swinunetr", "tiny", torch.float32)
    checkpointed, _ = _pair("swinunetr", "tiny", torch.float32, use_checkpoint=True)
    assert checkpointed.use_checkpoint and checkpointed.swinViT.layers1[0].blocks[0].use_checkpoint
    x = torch.randn(1, 1, 32, 32, 64)  # the full-resolution decoder block takes its segmented, folded path
    expected, got = _outputs_and_grads(plain, x), _outputs_and_grads(checkpointed, x)
    # the backward recomputes every block with the same kernels on the same inputs: identical, bit for bit
    # (nnssl_checkpointing=1, nnssl_pretrain --grad-checkpointing)
    _assert_same(got, expected, atol=0)
    # what the forward keeps for the backward: recomputed blocks and segments keep no activations of their own
    # (a fifth of the plain network's bytes remain here: block outputs, patch merging, output norms)
    plain_bytes, checkpointed_bytes = _saved_bytes(plain, x), _saved_bytes(checkpointed, x)
    assert checkpointed_bytes < 0.25 * plain_bytes, (checkpointed_bytes, plain_bytes)


def _saved_bytes(net: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for the backward in one forward (outside checkpointed regions)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        net(x.clone().requires_grad_())
    return sum(saved)


def test_bf16_autocast_runs_the_fast_path():
    # the GPU recipe's mixed precision, on CPU: every fast op accepts bf16 activations next to fp32 weights
    ours, _ = _pair("swinunetr", "tiny", torch.float32)
    x = torch.randn(1, 1, 32, 32, 64)
    with torch.no_grad():
        reference = ours(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x)
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)
    torch.testing.assert_close(out.float(), reference, rtol=0.1, atol=0.1 * reference.abs().max().item())


def test_window_order_is_monais_roll_and_partition():
    grid, window, shift = (4, 6, 2), (2, 3, 2), (1, 1, 0)
    tokens = torch.arange(4 * 6 * 2, dtype=torch.float32).view(1, *grid, 1)
    expected = window_partition(torch.roll(tokens, shifts=tuple(-s for s in shift), dims=(1, 2, 3)), window)
    order, inverse = fast_swin._window_index(grid, window, shift, torch.device("cpu"))
    assert order.tolist() == expected.flatten().long().tolist()
    assert order[inverse].tolist() == list(range(48))


def test_folded_upsampling_equals_transposed_then_3x3_convolution():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 4, 2, dtype=torch.float64)
    up = torch.randn(5, 7, 2, 2, 2, dtype=torch.float64)  # ConvTranspose3d weight (C_in, C_mid, 2, 2, 2)
    conv = torch.randn(3, 7, 3, 3, 3, dtype=torch.float64)
    expected = F.conv3d(F.conv_transpose3d(x, up, stride=2), conv, padding=1)
    got = torch.zeros_like(expected)
    fast_decoder._InterleaveAdd.apply(got, F.conv3d(x, fast_decoder.upconv_weight(up, conv), padding=1))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_relative_bias_cache_follows_the_weights_at_inference():
    attn = build_encoder(get_preset("tiny")).layers1[0].blocks[0].attn
    with torch.no_grad():
        first = fast_swin.relative_bias(attn, 64)
        assert fast_swin.relative_bias(attn, 64) is first  # gathered once per weight version
        attn.relative_position_bias_table.add_(1.0)
        torch.testing.assert_close(fast_swin.relative_bias(attn, 64), first + 1.0)
    assert fast_swin.relative_bias(attn, 64).requires_grad  # training: gathered afresh, with gradient


def test_fused_adamw_steps_like_torch_adamw():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.empty(10))
    b.data.copy_(a.data)
    fused, plain = fast_swin.adamw([a], lr=0.1), torch.optim.AdamW([b], lr=0.1, weight_decay=0.01)
    assert fused.defaults["fused"]
    for _ in range(3):
        for p, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            (p**2).sum().backward()
            opt.step()
    torch.testing.assert_close(a.data, b.data)


# --------------------------------------------------------------------------------------------------
# the benchmark harness (bench/run.py) sits at the top of the repository, beside nnssl/

@pytest.fixture
def bench_run(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    import bench.run

    return bench.run


def test_bench_only_rejects_unknown_names_with_a_suggestion(bench_run):
    assert "swin" in bench_run.discover()
    with pytest.raises(NnsslError, match=r"no benchmark 'swni'.*Did you mean 'swin'"):
        bench_run.select(bench_run.discover(), ["swni"])
    assert list(bench_run.select(bench_run.discover(), ["bench_swin"])) == ["swin"]


def test_bench_rows_are_checked_and_merged_by_name(bench_run, tmp_path):
    row = {"name": "swin_step_tiny_64", "ours": 1.0, "baseline": 2.0, "unit": "s/step", "ratio": 2.0, "config": {}}
    with pytest.raises(NnsslError, match="without \\['config'\\]"):
        bench_run.check_rows("bench.bench_x", [{k: v for k, v in row.items() if k != "config"}])
    with pytest.raises(NnsslError, match="finite numbers"):
        bench_run.check_rows("bench.bench_x", [{**row, "ratio": float("nan")}])
    results = tmp_path / "results.json"
    bench_run.merge([row, {**row, "name": "cka_time_50"}], results)
    merged = bench_run.merge([{**row, "ours": 0.5, "ratio": 4.0}], results)
    assert [(r["name"], r["ours"]) for r in merged] == [("cka_time_50", 1.0), ("swin_step_tiny_64", 0.5)]
    machine = {"cpu": "Xeon", "cores": 2, "gpu": None, "torch": "2.14.1", "threads": 2, "load_average": [0.5]}
    text = bench_run.markdown([{**r, "config": {"machine": machine, "measured": "today"}} for r in merged]
                              + [{**row, "name": "cka_time_400", "config": {}}])
    assert "## cka (`bench/bench_cka.py`)" in text and "## swin (`bench/bench_swin.py`)" in text
    assert text.index("| cka_time_50 |") < text.index("| cka_time_400 |")  # 50 before 400
    assert "| swin_step_tiny_64 | 0.5 | 2 | s/step | 4.00 | today | M1 | 0.5 |" in text
    assert "- M1: Xeon, 2 cores, no GPU, torch 2.14.1, 2 threads" in text and "- M2: ?" in text


def test_bench_swin_steps_ours_and_stock_from_the_same_start(bench_run):
    from bench.bench_swin import Case, time_steps

    timing = time_steps(Case("tiny", 64, 1, "encoder", "cpu"), repeats=1)
    assert timing["loss_difference"] < 1e-5  # the same network, weights and batch
    assert all(len(seconds) == 1 and seconds[0] > 0 for seconds in timing["seconds"].values())


def test_a_one_voxel_bottleneck_fails_as_in_monai():
    ours, stock = _pair("swinunetr", "tiny", torch.float32)
    x = torch.randn(1, 1, 32, 32, 32)  # the deepest map is 1x1x1: instance norm has nothing to normalise
    for net in (ours, stock):
        with pytest.raises(ValueError, match="more than 1 spatial element"):
            net(x)


def test_training_after_inference_mode_in_the_same_process():
    # nnssl_cka (inference mode) then a training step: cached window indices and masks must be normal tensors
    fast_swin._window_index.cache_clear()
    fast_swin._shift_mask.cache_clear()
    network = build_swinunetr(get_preset("tiny"), 1, 2)
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.inference_mode():
        network(x)
    network(x).sum().backward()
    assert network.swinViT.patch_embed.proj.weight.grad is not None
