"""Contrastive and rotation methods (simclr, mocov3, byol, rotnet, swinssl): losses with known answers,
EMA targets, gradient flow and hyperparameter errors (the DDP path: test_methods_contrastive_ddp.py)."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from monai.losses import ContrastiveLoss

from nnssl.errors import NnsslError
from nnssl.losses.contrastive import byol_loss, infonce_loss, ntxent_loss
from nnssl.losses.rotation import ROTATION_CLASSES, rotation_labels, rotation_loss
from nnssl.data.spec import ViewSpec
from nnssl.methods.registry import build_method, get_method, list_methods
from nnssl.networks import build_encoder, get_preset
from nnssl.networks.heads import SwinSSLDecoder, update_momentum
from nnssl.pretrain.config import resolve_config

METHODS = ["simclr", "mocov3", "byol", "rotnet", "swinssl"]
SMALL_HEADS = {"simclr": {"hidden_dim": 32, "proj_dim": 16}, "mocov3": {"hidden_dim": 32, "proj_dim": 16},
               "byol": {"hidden_dim": 32, "proj_dim": 16}, "rotnet": {}, "swinssl": {"contrastive_dim": 16}}
# swinssl's rotation and contrastive heads read two different last-stage tokens: one side of 64 voxels
CROP = {"swinssl": (64, 32, 32)}


def tiny_method(name: str, **hyperparameters):
    torch.manual_seed(0)
    return build_method(name, build_encoder(get_preset("tiny")), **{**SMALL_HEADS[name], **hyperparameters})


def batch_for(spec: ViewSpec, shape: tuple[int, int, int], batch_size: int = 2) -> dict[str, torch.Tensor]:
    """A batch as the loader delivers it for ``spec`` (base.py's batch contract), with random content."""
    g = torch.Generator().manual_seed(1)
    batch = {}
    for v in range(1, spec.global_views + 1):
        batch[f"view{v}"] = torch.rand(batch_size, 1, *shape, generator=g)
        if spec.rotate:
            batch[f"rot{v}"] = torch.randint(0, 4, (batch_size,), generator=g)
        if spec.rotate == "any":
            batch[f"rot_axis{v}"] = torch.randint(0, 3, (batch_size,), generator=g)
        if spec.cutout:
            batch[f"clean{v}"] = torch.rand(batch_size, 1, *shape, generator=g)
    return batch


# ---------------------------------------------------------------- losses with known answers

def test_ntxent_orthogonal_pairs_match_closed_form():
    # Two identical views of 4 orthogonal unit vectors: each anchor has one positive with cosine 1 and
    # 2N-2 negatives with cosine 0, so loss = -log(e^(1/t) / (e^(1/t) + 2N - 2)).
    n, t = 4, 0.5
    z = torch.eye(n, 8)
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * n - 2))  # 0.5944...
    assert ntxent_loss(z, z.clone(), temperature=t).item() == pytest.approx(expected, rel=1e-5)
    # orthogonal views of orthogonal samples: the positive is no closer than any negative
    assert ntxent_loss(torch.eye(8)[:4], torch.eye(8)[4:], temperature=t).item() == pytest.approx(math.log(2 * n - 1))


def test_ntxent_of_equal_embeddings_is_log_2n_minus_1_and_scale_free():
    z = torch.ones(5, 3)
    assert ntxent_loss(z, 7 * z, temperature=0.1).item() == pytest.approx(math.log(9), rel=1e-6)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_ntxent_equals_monai_contrastive_loss(temperature):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    reference = ContrastiveLoss(temperature=temperature)(z1, z2)  # MONAI, = Tang et al.'s Contrast
    torch.testing.assert_close(ntxent_loss(z1, z2, temperature), reference, rtol=1e-5, atol=1e-6)


def moco_v3_ctr_loss(q, k, t):
    """MoCo v3's ``ctr_loss`` (moco/builder.py) transcribed, for one process."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = torch.einsum("nc,mc->nm", [q, k]) / t
    return F.cross_entropy(logits, torch.arange(q.shape[0])) * (2 * t)


def test_infonce_matches_moco_v3_and_closed_form():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    torch.testing.assert_close(infonce_loss(q, k, 0.2), moco_v3_ctr_loss(q, k, 0.2))
    n, t = 4, 0.2
    expected = 2 * t * -math.log(math.exp(1 / t) / (math.exp(1 / t) + n - 1))  # orthonormal q = k
    assert infonce_loss(torch.eye(n, 8), torch.eye(n, 8), t).item() == pytest.approx(expected, rel=1e-5)
    assert infonce_loss(torch.ones(n, 3), torch.ones(n, 3), t).item() == pytest.approx(2 * t * math.log(n))


def test_byol_loss_known_values():
    p = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    assert byol_loss(p, p).item() == 0.0  # identical (normalised) vectors
    assert byol_loss(p, 2 * p).item() == pytest.approx(0.0, abs=1e-7)  # scale-free
    assert byol_loss(p, p.flip(1)).item() == pytest.approx(2.0)  # orthogonal
    assert byol_loss(p, -p).item() == pytest.approx(4.0)  # opposite
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    squared_distance = (F.normalize(a, dim=1) - F.normalize(b, dim=1)).pow(2).sum(1).mean()  # BYOL Eq. 2
    torch.testing.assert_close(byol_loss(a, b), squared_distance)


def rotate(x: torch.Tensor, turns: int, axis: int) -> torch.Tensor:
    """``x`` (X, Y, Z) turned ``turns`` quarter turns about ``axis`` (in the plane of the other two)."""
    return torch.rot90(x, turns, [d for d in range(3) if d != axis])


def test_rotation_labels_name_the_ten_distinct_3d_rotations():
    x = torch.arange(27.0).reshape(3, 3, 3)  # all values distinct: distinct rotations give distinct arrays
    combos = [(k, a) for k in range(4) for a in range(3)]
    labels = rotation_labels(torch.tensor([k for k, _ in combos]), torch.tensor([a for _, a in combos]))
    assert sorted(set(labels.tolist())) == list(range(ROTATION_CLASSES["any"]))
    for (k1, a1), l1 in zip(combos, labels):
        for (k2, a2), l2 in zip(combos, labels):
            assert (l1 == l2) == torch.equal(rotate(x, k1, a1), rotate(x, k2, a2)), (k1, a1, k2, a2)
    assert rotation_labels(torch.tensor([0, 3, 1])).tolist() == [0, 3, 1]  # axial: k itself


def test_perfect_rotation_classifier_has_near_zero_cross_entropy():
    turns, axis = torch.tensor([0, 1, 2, 3, 2]), torch.tensor([1, 0, 2, 1, 0])
    perfect = 30 * F.one_hot(rotation_labels(turns, axis), 10).float()
    assert rotation_loss(perfect, turns, axis).item() < 1e-10
    assert rotation_loss(torch.zeros(5, 10), turns, axis).item() == pytest.approx(math.log(10))  # chance
    assert rotation_loss(30 * F.one_hot(turns, 4).float(), turns).item() < 1e-10
    with pytest.raises(ValueError, match=r"'axial' scheme has 4 classes.*\(5, 10\)"):
        rotation_loss(perfect, turns)


# ---------------------------------------------------------------- the methods

def test_methods_are_registered_with_family_and_one_line_description():
    assert set(METHODS) <= set(list_methods())
    families = {name: get_method(name).family for name in METHODS}
    assert families == {"simclr": "contrastive", "mocov3": "contrastive", "byol": "contrastive",
                        "rotnet": "rotation", "swinssl": "rotation"}
    for name in METHODS:
        description = get_method(name).description
        assert description and "\n" not in description and len(description) <= 110


@pytest.mark.parametrize("name", METHODS)
def test_paper_scale_plans_build(name):
    # plans/pretrain/<name>.json passes the loop's config checks and its hyperparameters build the method
    config = resolve_config(name, ["501"], {})
    assert config.backbone == "paper" and config.method_params
    method = build_method(name, build_encoder(get_preset("tiny")), **config.method_params)
    assert all(getattr(method, k, v) == v for k, v in config.method_params.items() if k in ("temperature", "momentum"))


@pytest.mark.parametrize("name, hyperparameters, match", [
    ("simclr", {"temperature": 0.0}, r"simclr: temperature must be a positive number.*got 0\.0.*simclr\.json"),
    ("mocov3", {"temperature": -0.2}, r"mocov3: temperature .*got -0\.2"),
    ("swinssl", {"temperature": float("nan")}, r"swinssl: temperature .*got nan"),
    ("byol", {"momentum": 1.5}, r"byol: momentum must be in \[0, 1\].*got 1\.5.*byol\.json"),
    ("mocov3", {"momentum": -0.1}, r"mocov3: momentum .*got -0\.1.*mocov3\.json"),
    ("rotnet", {"axes": "xy"}, r"rotnet: axes must be one of \['any', 'axial'\], got 'xy'"),
])
def test_bad_hyperparameters_are_named(name, hyperparameters, match):
    with pytest.raises(NnsslError, match=match):
        tiny_method(name, **hyperparameters)


@pytest.mark.parametrize("name", METHODS)
def test_every_encoder_parameter_gets_a_finite_nonzero_gradient(name):
    # Gradient flow after one step on a hand-made batch of what view_spec() asks for; no exceptions.
    method = tiny_method(name).train()
    batch = batch_for(method.view_spec(), CROP.get(name, (32, 32, 32)))
    out = method.loss(batch)
    assert out["loss"].requires_grad and all(not v.requires_grad for k, v in out.items() if k != "loss")
    out["loss"].backward()
    for param_name, p in method.encoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, param_name
    for teacher in [t for _, t in method.ema_pairs()]:
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())  # no gradient


def test_view_specs():
    # the same crops for the three; SimCLR augments both views alike, BYOL (and MoCo v3, which takes BYOL's
    # recipe) asymmetrically
    assert tiny_method("byol").view_spec() == tiny_method("mocov3").view_spec()
    assert (tiny_method("simclr").view_spec().augment, tiny_method("byol").view_spec().augment) == \
        ("strong", "asymmetric")
    contrastive = tiny_method("simclr").view_spec()
    assert replace(tiny_method("byol").view_spec(), augment="strong") == contrastive
    assert contrastive.global_views == 2 and contrastive.region_factor > 1
    # RandomResizedCrop(scale=(0.08, 1)) in 3D: a uniform fraction of the region's volume
    assert (contrastive.global_scale, contrastive.scale_by) == ((0.08, 1.0), "volume")
    assert tiny_method("simclr", crop_volume=[0.2, 0.5], region_factor=1.0).view_spec().global_scale == (0.2, 0.5)
    with pytest.raises(NnsslError, match="crop_volume must lie in"):
        tiny_method("byol", crop_volume=[0.5, 2])
    assert tiny_method("rotnet").view_spec().rotate == "any"
    assert tiny_method("rotnet", axes="axial").classifier[1].out_features == 4
    swinssl = tiny_method("swinssl").view_spec()
    assert (swinssl.global_views, swinssl.rotate, swinssl.cutout, swinssl.region_factor) == (2, "axial", True, 1.0)


@pytest.mark.parametrize("name, momentum", [("byol", 0.996), ("mocov3", 0.99)])
def test_ema_step_moves_the_target_by_one_minus_m_times_the_difference(name, momentum):
    method = tiny_method(name)
    assert method.momentum == momentum
    (student, target), = method.ema_pairs()
    assert method.teacher_encoder() is target[0].encoder
    torch.testing.assert_close(dict(student.state_dict()), dict(target.state_dict()))  # starts as a copy
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in target.parameters()]
    update_momentum(student, target, method.momentum)  # what the loop does after an optimizer step
    for p_s, p_old, p_new in zip(student.parameters(), before, target.parameters()):
        torch.testing.assert_close(p_new - p_old, (1 - momentum) * (p_s - p_old), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["byol", "mocov3"])
def test_target_runs_without_stochastic_depth(name):
    # the student keeps its drop path; the EMA target has none, so two target passes on one input agree
    torch.manual_seed(0)
    encoder = build_encoder(get_preset("tiny"), drop_path_rate=0.5)
    method = build_method(name, encoder, **SMALL_HEADS[name]).train()
    view = batch_for(method.view_spec(), (32, 32, 32))["view1"]
    with torch.no_grad():
        assert torch.equal(method.target(view), method.target(view))
        assert not torch.equal(method.online(view), method.online(view))


def test_optimizer_step_leaves_the_target_alone():
    method = tiny_method("byol").train()
    target_before = {k: v.clone() for k, v in method.target.named_parameters()}  # BN buffers do change
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=1.0)
    method.loss(batch_for(method.view_spec(), (32, 32, 32)))["loss"].backward()
    optimizer.step()
    for key, value in target_before.items():
        torch.testing.assert_close(method.target.get_parameter(key), value)
    assert not torch.equal(method.online[1][0].weight, method.target[1][0].weight)


def test_swinssl_terms_are_weighted_and_the_decoder_restores_the_crop_size():
    method = tiny_method("swinssl", rotation_weight=2.0, reconstruction_weight=0.5).train()
    out = method.loss(batch_for(method.view_spec(), (64, 32, 32)))
    expected = 2.0 * out["rotation"] + out["contrastive"] + 0.5 * out["reconstruction"]
    torch.testing.assert_close(out["loss"].detach(), expected)
    decoder = SwinSSLDecoder(768, out_channels=1)  # the reference's channels for the 48-feature Swin
    assert [m.out_channels for m in decoder if isinstance(m, torch.nn.Conv3d)] == [384, 192, 96, 48, 48, 1]
    assert decoder(torch.randn(1, 768, 2, 1, 1)).shape == (1, 1, 64, 32, 32)


def test_swinssl_rejects_crops_with_a_single_final_token():
    method = tiny_method("swinssl")
    with pytest.raises(NnsslError, match=r"only 1.*at least one side of 64 voxels"):
        method.loss(batch_for(method.view_spec(), (32, 32, 32)))
