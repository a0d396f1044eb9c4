"""bf16 and fp16 autocast on the CPU (issue 17): the fast SwinUNETR and every SSL method's loss stay finite and
close to float32.

Pretraining autocasts to bf16 (or fp16 with a GradScaler) on CUDA and nnU-Net's fine-tuning to fp16; CPU
autocast runs the same casting rules, so dtype mismatches and overflow show up here.

Tolerances, relative to the float32 result with the same weights and input (largest difference over the scale
of the float32 value): bf16 keeps 8 significant bits (rounding 2^-9 = 0.2%), fp16 11 bits (2^-12), and a
network's dozens of rounded layers drift to a few times that. The network's output and loss: 5% (bf16) and 1%
(fp16). Method losses: 8% (bf16) and 2% (fp16); the largest measured are MoCo v3's (6% under bf16, 1.4% under
fp16), whose five batch norms over a batch of 4 turn rounding in the embeddings into larger changes. Loss maths that needs
float32 runs in float32 explicitly: softmax at temperatures down to 0.04 and centering (DINO, iBOT, SMIT: the
head's cosine logits and the losses), cosine logits over a temperature (SimCLR, MoCo v3, Swin UNETR SSL), the
masked-voxel count of SimMIM/SMIT's L1 (over 65504 voxels it overflowed fp16, and the loss became 0).
"""
from __future__ import annotations

from copy import deepcopy

import numpy as np
import pytest
import torch

from nnssl.data.views import ViewMaker
from nnssl.methods.registry import build_method, list_methods
from nnssl.networks import build_encoder, build_swinunetr, get_preset

TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 1e-2}
LOSS_TOLERANCE = {torch.bfloat16: 8e-2, torch.float16: 2e-2}
# small heads: the heads' sizes do not change the casting, only the cost
SMALL_HEADS = {"simclr": {"hidden_dim": 32, "proj_dim": 16}, "mocov3": {"hidden_dim": 32, "proj_dim": 16},
               "byol": {"hidden_dim": 32, "proj_dim": 16}, "swinssl": {"contrastive_dim": 16},
               "dino": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "local_views": 1, "local_size": 32},
               "ibot": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "patch_out_dim": 48},
               "smit": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "patch_out_dim": 48}}
CROP = {"swinssl": (64, 32, 32)}  # swinssl's heads need two last-stage tokens; others take the smallest crop


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _relative_difference(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.float() - reference).abs().max() / reference.abs().max().clamp_min(1e-6)).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fast_swinunetr_under_autocast_is_finite_and_close_to_fp32(dtype):
    torch.manual_seed(0)
    net = build_swinunetr(get_preset("tiny"), 1, 2)
    x = torch.randn(1, 1, 32, 32, 64, generator=torch.Generator().manual_seed(1))
    results = {}
    for name, autocast in (("fp32", False), ("autocast", True)):
        net.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            out = net(x)
        assert out.dtype == (dtype if autocast else torch.float32)
        loss = torch.nn.functional.cross_entropy(out.float(), (x[:, 0] > 0).long())
        loss.backward()
        results[name] = (out.detach().float(), loss.detach(), {k: p.grad.clone() for k, p in net.named_parameters()})
    out, loss, grads = results["autocast"]
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for r in results.values() for g in r[2].values())
    assert _relative_difference(out, results["fp32"][0]) < TOLERANCE[dtype]
    assert _relative_difference(loss, results["fp32"][1]) < TOLERANCE[dtype]
    # single weights' gradients are not compared: where a leaky ReLU's input is within rounding of 0 its slope
    # flips between 0.01 and 1, which moves small deep-layer gradients by their own size; the gradient as a
    # whole keeps its direction
    flat = {name: torch.cat([g.flatten() for g in result[2].values()]) for name, result in results.items()}
    cosine = torch.nn.functional.cosine_similarity(flat["autocast"], flat["fp32"], dim=0)
    # the parts of the cosine in the message: one CI run saw exactly 0 for gradients that print alike
    assert cosine > 1 - TOLERANCE[dtype], (f"dot {flat['autocast'] @ flat['fp32']}, norms "
                                           f"{flat['autocast'].norm()} {flat['fp32'].norm()}, {flat['fp32'].numel()} "
                                           f"values, torch threads {torch.get_num_threads()}")


def _batch(name: str, method: torch.nn.Module, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """A batch made by the real view maker for the method's ``ViewSpec`` from one random region."""
    views = ViewMaker(method.view_spec(), CROP.get(name, (32, 32, 32)), get_preset("tiny").patch_size)
    rng, generator = np.random.default_rng(0), torch.Generator().manual_seed(2)
    np.random.seed(0)  # batchgeneratorsv2's transforms draw from the global generators
    torch.manual_seed(0)
    # one region per sample, each with its own intensity offset, so that the samples' embeddings differ well
    # beyond bf16 rounding (crops of one noise region pool to nearly equal vectors, whose contrastive logits
    # and batch norms would then measure rounding, not the loss)
    samples = [views(torch.randn(1, *views.region_size, generator=generator) + i, rng) for i in range(batch_size)]
    return views.collate(samples)


@pytest.mark.parametrize("name", list_methods())
def test_method_loss_under_autocast_is_finite_and_close_to_fp32(name):
    torch.manual_seed(0)
    method = build_method(name, build_encoder(get_preset("tiny")), **SMALL_HEADS.get(name, {}))
    method.on_step(0.0)  # start of training: the smallest teacher temperatures (0.04)
    batch = _batch(name, method)
    reference = None
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        copy = deepcopy(method)  # the loss updates state (DINO centers): every precision starts from the same
        torch.manual_seed(3)  # any randomness inside the loss draws the same numbers
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            terms = copy.loss(batch)
        if reference is None:
            reference = {term: value.detach() for term, value in terms.items()}
            continue
        assert terms["loss"].dtype == torch.float32, "the total loss is reduced in float32"
        terms["loss"].backward()
        assert all(torch.isfinite(p.grad).all() for p in copy.encoder.parameters() if p.grad is not None)
        for term, value in terms.items():
            assert torch.isfinite(value).all(), (dtype, term)
            difference = _relative_difference(value.detach(), reference[term].float())
            assert difference < LOSS_TOLERANCE[dtype], (dtype, term, difference)
