"""The fast SwinUNETR under ``torch.compile`` (issue 17): one graph, few recompiles, eager's numbers.

nnU-Net compiles the network on CUDA by default; dynamo's tracing and the ``aot_eager`` backend (AOTAutograd
forward and backward graphs, run by eager kernels) need no GPU, so every graph break a GPU run would hit
shows up here. Inputs are 32 x 32 x 64, the smallest a SwinUNETR trains on (a 1 x 1 x 1 bottleneck breaks
instance norm).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from bench.bench_gpu import sliding_window_predictor
from nnssl.networks import build_swinunetr, get_preset

PATCH = (32, 32, 64)


@pytest.fixture(autouse=True)
def fresh_dynamo(one_torch_thread):
    dynamo.reset()
    counters.clear()
    yield
    dynamo.reset()


def _network(preset: str = "tiny", use_checkpoint: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_swinunetr(get_preset(preset), 1, 2, use_checkpoint=use_checkpoint)


def _input(shape: tuple[int, ...] = PATCH, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(seed))


def _graph_breaks() -> int:
    return sum(counters["graph_break"].values())


@pytest.mark.parametrize("preset, use_checkpoint, grad", [
    ("tiny", True, True),  # training with activation checkpointing (the backward recomputes the blocks)
    ("monai", False, False),  # window 7: padded windows, windows cut to small stages; no_grad inference
])
def test_forward_traces_as_one_graph(preset, use_checkpoint, grad):
    net = _network(preset, use_checkpoint)
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explanation = dynamo.explain(net)(_input())
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_compiled_training_step_equals_eager_under_aot_eager():
    # forward and backward as AOTAutograd graphs: one graph means the custom autograd functions' backwards
    # (window permutation, layout change, parity interleave) traced too
    eager, compiled_net = _network(), _network()
    compiled_net.load_state_dict(eager.state_dict())
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_net, backend=backend)
    x, weights = _input(), torch.linspace(-1, 2, 2 * PATCH[0] * PATCH[1] * PATCH[2]).view(1, 2, *PATCH)
    outputs = {}
    for name, net, module in (("eager", eager, eager), ("compiled", compiled, compiled_net)):
        out = net(x)
        (out * weights).sum().backward()
        outputs[name] = (out.detach(), {k: p.grad for k, p in module.named_parameters()})
    assert backend.frame_count == 1 and _graph_breaks() == 0, dict(counters["graph_break"])
    torch.testing.assert_close(outputs["compiled"][0], outputs["eager"][0], rtol=1e-4, atol=1e-5)
    for name, grad in outputs["eager"][1].items():
        scale = grad.abs().max().item() or 1.0
        torch.testing.assert_close(outputs["compiled"][1][name], grad, rtol=0, atol=1e-4 * scale, msg=name)


def test_sliding_window_inference_of_two_cases_compiles_once_without_graph_breaks():
    eager, compiled_net = _network(), _network()
    compiled_net.load_state_dict(eager.state_dict())
    backend = CompileCounterWithBackend("aot_eager")
    predictors = {name: sliding_window_predictor(net, PATCH, "cpu", mirroring=False)
                  for name, net in (("eager", eager), ("compiled", torch.compile(compiled_net, backend=backend)))}
    # two cases of different sizes: one smaller than the patch along x (nnU-Net pads it), one needing 3 x 2 x 2 tiles
    cases = [torch.randn(1, 24, 40, 70, generator=torch.Generator().manual_seed(2)),
             torch.randn(1, 60, 48, 96, generator=torch.Generator().manual_seed(3))]
    for case in cases:
        logits = {name: p.predict_sliding_window_return_logits(case) for name, p in predictors.items()}
        assert logits["compiled"].shape == (2, *case.shape[1:])
        # nnU-Net accumulates the tiles' logits in float16: compare at that precision
        torch.testing.assert_close(logits["compiled"].float(), logits["eager"].float(), rtol=2e-3, atol=2e-3)
    assert _graph_breaks() == 0, dict(counters["graph_break"])
    # every tile has the patch's shape, so the first tile compiles and no other tile or case recompiles
    assert backend.frame_count == 1
    with torch.inference_mode():  # the same network, tile by tile: equal to eager within fp32 rounding
        tile = _input(seed=4)
        torch.testing.assert_close(predictors["compiled"].network(tile), eager(tile), rtol=1e-4, atol=1e-5)
