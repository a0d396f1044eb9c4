"""DINO, iBOT and SMIT: loss maths on hand-made inputs, the authors' losses as oracles, teacher/EMA/centering,
schedules, masks on the right token grid, and gradient flow through one step per method."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnssl.data.views import ViewMaker, block_mask
from nnssl.errors import NnsslError
from nnssl.losses.distillation import (collapse_stats, dino_loss, masked_token_distillation_loss, token_mask,
                                       updated_center)
from nnssl.data.spec import ViewSpec
from nnssl.methods.registry import build_method, method_defaults
from nnssl.networks import build_encoder, get_preset
from nnssl.networks.heads import update_momentum

METHODS = ["dino", "ibot", "smit"]
SMALL_HEADS = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}
SMALL = {"dino": {**SMALL_HEADS, "local_views": 1, "local_size": 32},
         "ibot": {**SMALL_HEADS, "patch_out_dim": 48, "local_views": 1, "local_size": 32, "pred_start_epoch": 0},
         "smit": {**SMALL_HEADS, "patch_out_dim": 48}}


# --- literal transcriptions of the authors' losses (facebookresearch/dino main_dino.py DINOLoss.forward and
# bytedance/ibot main_ibot.py iBOTLoss.forward, single process, schedule replaced by the temperature) ---

def reference_dino_loss(student_output, teacher_output, center, ncrops, student_temp, temp, center_momentum):
    student_out = student_output / student_temp
    student_out = student_out.chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / temp, dim=-1)
    teacher_out = teacher_out.detach().chunk(2)
    total_loss = 0
    n_loss_terms = 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    total_loss /= n_loss_terms
    batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
    batch_center = batch_center / len(teacher_output)
    new_center = center * center_momentum + batch_center * (1 - center_momentum)
    return total_loss, new_center


def reference_ibot_patch_loss(student_patch, teacher_patch, student_mask, center2, ngcrops, student_temp, temp2):
    student_patch = student_patch / student_temp
    student_patch_c = student_patch.chunk(ngcrops)
    teacher_patch_c = F.softmax((teacher_patch - center2) / temp2, dim=-1)
    teacher_patch_c = teacher_patch_c.detach().chunk(ngcrops)
    total_loss2, n_loss_terms2 = 0, 0
    for q in range(ngcrops):
        for v in range(ngcrops):
            if v == q:
                loss2 = torch.sum(-teacher_patch_c[q] * F.log_softmax(student_patch_c[v], dim=-1), dim=-1)
                mask = student_mask[v].flatten(-3, -1)
                loss2 = torch.sum(loss2 * mask.float(), dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
                total_loss2 += loss2.mean()
                n_loss_terms2 += 1
    return total_loss2 / n_loss_terms2


def test_dino_loss_matches_the_reference_dino_loss():
    torch.manual_seed(0)
    b, k, views = 3, 10, 5  # 2 global + 3 local crops
    student = torch.randn(views * b, k)
    teacher = torch.randn(2 * b, k)
    center = torch.randn(1, k) * 0.1
    expected, expected_center = reference_dino_loss(student, teacher, center, views, 0.1, 0.04, 0.9)
    ours = dino_loss(student.chunk(views), teacher.chunk(2), center[0], 0.1, 0.04)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(updated_center(center[0], teacher, 0.9), expected_center[0])


def test_dino_loss_of_identical_distributions_is_their_entropy():
    # every view gives softmax(z / T) = p = (1/2, 1/4, 1/8, 1/8), so each cross-entropy is H(p) = 1.75 ln 2
    temperature = 0.5
    z = temperature * torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]] * 2))
    loss = dino_loss([z, z, z], [z, z], torch.zeros(4), temperature, temperature)
    assert loss.item() == pytest.approx(1.75 * math.log(2), rel=1e-6)


def test_masked_token_loss_counts_masked_tokens_only_and_matches_ibot():
    torch.manual_seed(0)
    b, grid, k = 2, (2, 2, 2), 6
    n = math.prod(grid)
    student = torch.randn(2 * b, n, k)
    teacher = torch.randn(2 * b, n, k)
    masks = torch.zeros(2 * b, *grid, dtype=torch.bool)
    masks[0, 0], masks[1, :, 1], masks[2, 1, 1, 1] = True, True, True  # image 3 has no masked token
    center = torch.randn(k) * 0.1
    flat = masks.flatten(1)
    ours = masked_token_distillation_loss(student.chunk(2), teacher.chunk(2), flat.chunk(2), center, 0.1, 0.07)
    expected = reference_ibot_patch_loss(student, teacher, masks.chunk(2), center, 2, 0.1, 0.07)
    torch.testing.assert_close(ours, expected)
    changed = student.clone()
    changed[~flat] += 5 * torch.randn(int((~flat).sum()), k)  # every unmasked token of every image
    same = masked_token_distillation_loss(changed.chunk(2), teacher.chunk(2), flat.chunk(2), center, 0.1, 0.07)
    assert same.item() == ours.item()
    changed[0, 0] += 1.0  # a masked token
    assert masked_token_distillation_loss(changed.chunk(2), teacher.chunk(2), flat.chunk(2), center, 0.1,
                                          0.07).item() != ours.item()


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf")])
def test_bad_temperatures_are_rejected(bad):
    z = [torch.zeros(2, 4)] * 2
    with pytest.raises(ValueError, match="student temperature must be a finite number > 0"):
        dino_loss(z, z, torch.zeros(4), bad, 0.04)
    with pytest.raises(ValueError, match="teacher temperature must be a finite number > 0"):
        dino_loss(z, z, torch.zeros(4), 0.1, bad)
    with pytest.raises(ValueError, match="teacher temperature must be"):
        masked_token_distillation_loss([torch.zeros(2, 3, 4)], [torch.zeros(2, 3, 4)], [torch.ones(2, 3).bool()],
                                       torch.zeros(4), 0.1, bad)


def test_centering_is_an_ema_of_the_teacher_mean_without_gradient():
    logits = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    center = updated_center(torch.zeros(2), logits, 0.9)
    torch.testing.assert_close(center, torch.tensor([0.2, 0.3]))  # 0.9 * 0 + 0.1 * mean
    torch.testing.assert_close(updated_center(torch.tensor([1.0, 1.0]), logits, 0.5), torch.tensor([1.5, 2.0]))
    assert not center.requires_grad
    with pytest.raises(ValueError, match=r"center momentum must be in \[0, 1\)"):
        updated_center(center, logits, 1.5)


def test_collapse_stats_tell_constant_and_dominated_outputs_apart():
    varied = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    entropy, std = collapse_stats(varied, torch.full((2, 3), 1 / 3))
    assert entropy.item() == pytest.approx(math.log(3)) and std.item() == pytest.approx(math.sqrt(0.5) * 2 / 3)
    entropy, std = collapse_stats(torch.ones(2, 3), torch.tensor([[1.0, 0, 0]] * 2))
    assert entropy.item() == pytest.approx(0.0, abs=1e-6) and std.item() == 0.0


def test_token_mask_pools_patch_blocks_to_stage_tokens():
    mask = torch.zeros(1, 4, 4, 2, dtype=torch.bool)
    mask[0, :2, 2:, :] = True   # exactly the stage token (0, 1, 0) at factor 2
    mask[0, 2:, :2, 0] = True   # half of token (1, 0, 0): not masked
    assert token_mask(mask, 2).tolist() == [[False, True, False, False]]
    with pytest.raises(ValueError, match="not divisible by the stage factor 4"):
        token_mask(mask, 4)


def test_view_specs_follow_the_papers():
    encoder = build_encoder(get_preset("tiny"))  # Swin patch 2, as the paper backbone
    dino = build_method("dino", encoder, **SMALL_HEADS).view_spec()
    assert (dino.global_views, dino.local_views, dino.local_size, dino.mask) == (2, 8, None, None)
    # None: half the patch on the 32-voxel grid, 64^3 at the paper's 128^3
    assert ViewMaker(dino, (128, 128, 128), 2).local_size == (64, 64, 64)
    assert ViewMaker(dino, (64, 96, 160), 2).local_size == (32, 32, 64)
    assert dino.augment == "asymmetric"
    # iBOT's released Swin run: 10 local crops, pred_ratio 0 / 0.3 +- 0.2 per view, DINO's augmentation
    ibot = build_method("ibot", encoder, **SMALL_HEADS).view_spec()
    assert (ibot.global_views, ibot.local_views, ibot.augment) == (2, 10, "asymmetric")
    assert (ibot.mask.ratio, ibot.mask.p_unmasked, ibot.mask.block_size) == ((0.1, 0.5), 0.5, 16)
    smit = build_method("smit", encoder, **SMALL_HEADS).view_spec()
    assert (smit.global_views, smit.mask.ratio, smit.mask.block_size) == (2, (0.7, 0.7), 16)
    # two 96^3 views from one 128^3 region, each a plain crop (no resizing)
    assert smit.region_factor == pytest.approx(128 / 96) and smit.global_scale == (0.75, 0.75)


def test_smit_mask_has_the_asked_ratio_on_the_stage3_grid():
    # a 96^3 view, Swin patch 2: 48^3 patch tokens; 16^3-voxel blocks are 8^3 patches = one stage-3 token
    spec = build_method("smit", build_encoder(get_preset("tiny")), **SMALL_HEADS).view_spec().mask
    mask = torch.from_numpy(block_mask((48, 48, 48), spec.block_size // 2, spec.ratio[0], np.random.default_rng(0)))
    tokens = token_mask(mask[None], 2**3)
    assert tokens.shape == (1, 6**3) and int(tokens.sum()) == round(0.7 * 216)
    assert int(mask.sum()) == int(tokens.sum()) * 8**3  # every masked patch lies in a fully masked token


@pytest.mark.parametrize("name", METHODS)
def test_defaults_and_bad_hyperparameters(name):
    defaults = method_defaults(name)
    assert defaults["momentum"] == 0.996 and defaults["student_temperature"] == 0.1
    assert defaults["center_momentum"] == 0.9 and defaults["freeze_last_layer_epochs"] == 1
    encoder = build_encoder(get_preset("tiny"))
    with pytest.raises(NnsslError, match=rf"{name}: teacher_temperature must be a finite number > 0.*got -1.*"
                                         rf"plans/pretrain/{name}.json"):
        build_method(name, encoder, teacher_temperature=-1)
    with pytest.raises(NnsslError, match=rf"{name}: center_momentum must be in \[0, 1\).*got 1\b"):
        build_method(name, encoder, center_momentum=1)


def test_teacher_temperature_schedules():
    encoder = build_encoder(get_preset("tiny"))
    dino = build_method("dino", encoder, **SMALL["dino"])
    assert dino.teacher_temperatures == {"global": 0.04}  # before the first on_step
    assert dino.on_step(15.0) == {"teacher_temp": pytest.approx(0.055)}
    assert dino.on_step(45.0) == {"teacher_temp": pytest.approx(0.07)}
    smit = build_method("smit", encoder, **SMALL["smit"])
    # SMIT: patch temperature held at 0.04 for 30 epochs, then warmed up over 30 (its pred_start_epoch)
    assert smit.on_step(20.0) == {"teacher_temp": pytest.approx(0.06), "teacher_patch_temp": 0.04}
    assert smit.on_step(45.0) == {"teacher_temp": pytest.approx(0.07), "teacher_patch_temp": pytest.approx(0.055)}


def hand_built_batch(spec: ViewSpec, side: int = 32, batch: int = 2, patch: int = 2) -> dict[str, torch.Tensor]:
    """Random views of ``side``^3 (locals of ``local_size``) and block masks as the loader makes them."""
    out, rng = {}, np.random.default_rng(0)
    for i in range(1, spec.global_views + 1):
        out[f"view{i}"] = torch.randn(batch, 1, side, side, side)
        if spec.mask is not None:
            grid = (side // patch,) * 3
            out[f"mask{i}"] = torch.from_numpy(np.stack([
                block_mask(grid, spec.mask.block_size // patch, spec.mask.ratio[1], rng) for _ in range(batch)]))
    for i in range(1, spec.local_views + 1):
        out[f"local{i}"] = torch.randn(batch, 1, *spec.local_size)
    return out


@pytest.mark.parametrize("name", METHODS)
def test_one_step_reaches_every_student_parameter_and_never_the_teacher(name):
    torch.manual_seed(0)
    method = build_method(name, build_encoder(get_preset("tiny")), **SMALL[name]).train()
    assert not method.teacher.training  # teacher stays in eval mode (no drop path)
    out = method.loss(hand_built_batch(method.view_spec()))
    out["loss"].backward()
    expected_terms = {"dino": set(), "ibot": {"global_distill", "patch_distill"},
                      "smit": {"recon", "global_distill", "patch_distill"}}[name]
    assert expected_terms <= set(out) and "teacher_entropy" in out and "teacher_std" in out
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    # the weight-norm magnitude of the heads' last layers is fixed to 1 (DINO), never trained
    exceptions = {n for n, _ in method.named_parameters() if n.endswith("parametrizations.weight.original0")}
    for n, p in method.named_parameters():
        if n.startswith("teacher."):
            assert not p.requires_grad and p.grad is None, n
        elif n in exceptions:
            assert not p.requires_grad, n
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    # the last layers (the normalised direction, one per head) are frozen during epoch 0 only
    frozen = list(method.frozen_parameters(0.5))
    assert len(frozen) == len(method.heads) and not list(method.frozen_parameters(1.0))
    assert method.teacher_encoder() is method.teacher["encoder"] and method.encoder is not method.teacher_encoder()


def test_ibot_predicts_masked_tokens_from_pred_start_epoch_on():
    torch.manual_seed(0)
    method = build_method("ibot", build_encoder(get_preset("tiny")),
                          **{**SMALL["ibot"], "local_views": 0, "pred_start_epoch": 50})
    batch = hand_built_batch(method.view_spec())
    method.on_step(49.0)  # before pred_start_epoch: the student sees its views unmasked, no patch loss
    assert float(method.loss(batch)["patch_distill"]) == 0
    method.on_step(50.0)
    assert float(method.loss(batch)["patch_distill"]) > 0


def test_dino_center_follows_the_teacher_and_ema_moves_the_teacher():
    torch.manual_seed(0)
    method = build_method("dino", build_encoder(get_preset("tiny")), **{**SMALL["dino"], "local_views": 0})
    batch = hand_built_batch(method.view_spec())
    with torch.no_grad():
        views = torch.cat([batch["view1"], batch["view2"]])
        teacher_logits = method.teacher["heads"]["global"](method.teacher["encoder"](views)[-1].mean(dim=(2, 3, 4)))
        method.center_global.fill_(0.5)
        out = method.loss(batch)
    torch.testing.assert_close(method.center_global, 0.9 * 0.5 + 0.1 * teacher_logits.mean(0))
    assert out["teacher_std"] > 0
    # EMA as the loop does it: teacher <- m * teacher + (1 - m) * student, for every (student, teacher) pair
    student_weight = method.encoder.patch_embed.proj.weight
    teacher_weight = method.teacher["encoder"].patch_embed.proj.weight
    with torch.no_grad():
        student_weight.add_(1.0)
    before = teacher_weight.clone()
    for student, teacher in method.ema_pairs():
        update_momentum(student, teacher, method.momentum)
    torch.testing.assert_close(teacher_weight, 0.996 * before + 0.004 * student_weight)


def test_smit_reconstruction_counts_masked_voxels_only():
    torch.manual_seed(0)
    method = build_method("smit", build_encoder(get_preset("tiny")), **SMALL["smit"])
    batch = hand_built_batch(method.view_spec(), batch=1)
    voxel_mask = torch.cat([batch["mask1"], batch["mask2"]]).repeat_interleave(2, 1).repeat_interleave(
        2, 2).repeat_interleave(2, 3)[:, None]  # (2B, 1, 32, 32, 32): each patch token is 2^3 voxels

    def recon_with(change):
        handle = method.decoder.register_forward_hook(lambda module, inputs, output: change(output))
        with torch.no_grad():
            recon = method.loss(batch)["recon"]
        handle.remove()
        return recon

    baseline = recon_with(lambda output: output)
    assert recon_with(lambda output: torch.where(voxel_mask, output, output + 100.0)) == baseline
    assert recon_with(lambda output: torch.where(voxel_mask, output + 1.0, output)) != baseline


def test_collapse_guard_reports_a_teacher_that_ignores_its_input():
    torch.manual_seed(0)
    method = build_method("dino", build_encoder(get_preset("tiny")), **{**SMALL["dino"], "local_views": 0})
    batch = hand_built_batch(method.view_spec())
    same = {k: v[:1].expand_as(v) for k, v in batch.items()}  # every sample and view identical
    with torch.no_grad():
        healthy, collapsed = method.loss(batch), method.loss({"view1": same["view1"], "view2": same["view1"]})
    assert healthy["teacher_std"] > 1e-3 and collapsed["teacher_std"] < 1e-6
    assert 0 < healthy["teacher_entropy"] <= math.log(SMALL_HEADS["out_dim"])
