"""Issue 6 interop: nnssl_export to MONAI's SwinUNETR, nnssl_import from MONAI/Tang and SMIT checkpoints.

The foreign checkpoints are written here from a random encoder, each in its own project's naming; the
SMIT patch-merging order is checked against a literal transcription of SMIT's ``PatchMerging.forward``.
"""
import argparse
import re

import pytest
import torch
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import PatchMerging

from conftest import run_cli
from nnssl.checkpoints import load_encoder_file, save_encoder
from nnssl.cli.export import main as export_main
from nnssl.cli.import_encoder import main as import_main
from nnssl.errors import NnsslError
from nnssl.interop import (MONAI_MERGE_ORDER, SMIT_MERGE_ORDER, import_encoder, merge_permutation,
                           reorder_merging, swinunetr_kwargs)
from nnssl.networks import ENCODER_PREFIX, SwinEncoder, build_swinunetr, get_preset

TINY = get_preset("tiny")
LAST_MERGING = ["layers4.0.downsample.norm.bias", "layers4.0.downsample.norm.weight",
                "layers4.0.downsample.reduction.weight"]


@pytest.fixture(scope="module")
def encoder() -> SwinEncoder:
    """A tiny encoder with every weight moved off its initial value (norm weights 1 would hide reorderings)."""
    torch.manual_seed(0)
    model = SwinEncoder(TINY).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module")
def expected(encoder) -> list[torch.Tensor]:
    return outputs(encoder)


def outputs(model: torch.nn.Module) -> list[torch.Tensor]:
    torch.manual_seed(1)
    with torch.no_grad():
        return model(torch.randn(1, 1, 32, 32, 32))


def imported_encoder(path) -> SwinEncoder:
    checkpoint = load_encoder_file(path)
    model = SwinEncoder(checkpoint.preset, in_channels=checkpoint.in_channels).eval()
    model.load_state_dict({k[len(ENCODER_PREFIX):]: v for k, v in checkpoint.state_dict.items()}, strict=True)
    return model


# -- foreign layouts, written from each project's own names ---------------------------------------------------
def tang_layout(model: SwinEncoder) -> dict:
    """Tang et al.'s model_swinvit.pt: DataParallel ``module.`` prefix, MLP as fc1/fc2, SSL heads beside."""
    state = {"module." + k.replace("mlp.linear", "mlp.fc"): v for k, v in model.state_dict().items()}
    return {"epoch": 100, "state_dict": {**state, "module.rotation_head.weight": torch.zeros(4, 192)}}


def smit_state(model: SwinEncoder, last_merging: bool = True) -> dict:
    """SMIT's Swin: ``layers.{i}``, fc1/fc2, merging slots in SMIT's x0..x7 order, learnable output norms."""
    to_smit = [MONAI_MERGE_ORDER.index(offset) for offset in SMIT_MERGE_ORDER]  # SMIT slot s <- MONAI slot
    state = {}
    for key, value in model.state_dict().items():
        stage = re.match(r"layers(\d)\.0\.(.*)", key)
        if stage is None:
            state[key] = value
            continue
        if not last_merging and stage[1] == "4" and "downsample" in key:
            continue  # SMIT's pretraining Swin has no merging after the last stage
        if "downsample" in key:
            value = value.reshape(*value.shape[:-1], 8, -1)[..., to_smit, :].reshape(value.shape)
        state[f"layers.{int(stage[1]) - 1}.{stage[2]}".replace("mlp.linear", "mlp.fc")] = value
    for i, channels in enumerate(TINY.stage_channels[:4]):
        state[f"norm{i}.weight"], state[f"norm{i}.bias"] = torch.ones(channels), torch.zeros(channels)
    return state


def monai_swinunetr_state(model: SwinEncoder) -> dict:
    """A whole MONAI SwinUNETR state dict (current names: swinViT. prefix, mlp.linear1/2), decoder included."""
    network = build_swinunetr(TINY, in_channels=1, out_channels=2)
    network.swinViT.load_state_dict(model.state_dict())
    return network.state_dict()


def monai_tutorial_layout(model: SwinEncoder) -> dict:
    """MONAI's tutorial ssl_pretrained_weights.pth: under ``model``, ``encoder.layers{i}.0.0.*`` (one level deeper
    than MONAI's network, as the tutorial's loader strips), fc1/fc2, mask token, output norm and ``out`` head."""
    state = {"encoder." + re.sub(r"^layers(\d)\.0\.", r"layers\1.0.0.", k).replace("mlp.linear", "mlp.fc"): v
             for k, v in model.state_dict().items()}
    channels = TINY.stage_channels[-1]
    extras = {"encoder.mask_token": torch.zeros(1, 1, TINY.feature_size), "encoder.norm.weight": torch.ones(channels),
              "encoder.norm.bias": torch.zeros(channels), "out.conv.conv.weight": torch.zeros(1, channels, 1, 1, 1),
              "out.conv.conv.bias": torch.zeros(1)}
    return {"model": state | extras, "epoch": 10}


LAYOUTS = {
    # name: (checkpoint maker, layout, container, encoder outputs that must match, tensors initialised)
    "tang": (tang_layout, "monai", "state_dict", 5, []),
    "monai_tutorial": (monai_tutorial_layout, "monai-tutorial", "model", 5, []),
    "monai_swinunetr": (monai_swinunetr_state, "monai", "(top level)", 5, []),
    "smit_state_dict": (lambda m: {"state_dict": smit_state(m)}, "smit", "state_dict", 5, []),
    "smit_student": (lambda m: {"student": {"module.backbone." + k: v for k, v in smit_state(m, False).items()}
                                | {"module.head.last_layer.weight": torch.zeros(8, 4)},
                                "teacher": {}, "epoch": 3, "args": argparse.Namespace(lr=1e-4)},
                     "smit", "student", 4, LAST_MERGING),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_import_round_trip_gives_identical_encoder_outputs(name, encoder, expected, tmp_path):
    make, layout, container, matching, initialized = LAYOUTS[name]
    torch.save(make(encoder), tmp_path / "foreign.pt")
    report = import_encoder(tmp_path / "foreign.pt", tmp_path / "encoder_final.pth")
    assert (report.layout, report.container, report.preset, report.backbone_inferred) == \
        (layout, container, TINY, True)
    assert report.initialized == initialized and report.dropped == []
    assert report.loaded == len(encoder.state_dict()) - len(initialized)
    assert report.method == ("smit" if layout == "smit" else "swinssl")
    for ours, theirs in list(zip(expected, outputs(imported_encoder(tmp_path / "encoder_final.pth"))))[:matching]:
        torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
    meta = load_encoder_file(tmp_path / "encoder_final.pth").meta
    assert meta["imported"]["layout"] == layout and meta["imported"]["unexpected"] == report.unexpected


def test_unused_tensors_are_listed(encoder, tmp_path):
    torch.save(tang_layout(encoder), tmp_path / "tang.pt")
    assert import_encoder(tmp_path / "tang.pt", tmp_path / "a.pth").unexpected == ["rotation_head.weight"]
    torch.save({"state_dict": smit_state(encoder)}, tmp_path / "smit.pt")
    report = import_encoder(tmp_path / "smit.pt", tmp_path / "b.pth")
    assert report.unexpected == [f"norm{i}.{p}" for i in range(4) for p in ("bias", "weight")]
    torch.save(monai_swinunetr_state(encoder), tmp_path / "net.pt")
    report = import_encoder(tmp_path / "net.pt", tmp_path / "c.pth")
    assert len(report.unexpected) == len(build_swinunetr(TINY, 1, 2).state_dict()) - len(encoder.state_dict())
    assert not any(k.startswith(("patch_embed", "layers")) for k in report.unexpected)


def voco_layout(model: SwinEncoder) -> dict:
    """VoCo's released weights: a whole MONAI SwinUNETR(use_v2=True) state dict (Large-Scale-Medical README)."""
    network = SwinUNETR(out_channels=2, **{**swinunetr_kwargs(TINY, 1), "use_v2": True})
    missing, unexpected = network.swinViT.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and missing and all(re.match(r"layers\dc\.", k) for k in missing)
    return {"state_dict": network.state_dict()}


def test_voco_v2_blocks_are_listed_as_dropped_and_the_rest_loads(encoder, expected, tmp_path):
    torch.save(voco_layout(encoder), tmp_path / "VoCo_B_SSL_head.pt")
    result = run_cli("nnssl_import", tmp_path / "VoCo_B_SSL_head.pt", "-o", tmp_path / "encoder_final.pth")
    assert "(voco layout), method 'imported'" in result.stdout
    assert "residual convolution blocks of SwinUNETR v2" in result.stdout
    meta = load_encoder_file(tmp_path / "encoder_final.pth").meta
    assert meta["imported"]["dropped"] and all(re.match(r"layers[1-4]c\.", k) for k in meta["imported"]["dropped"])
    assert any(k.startswith("decoder") for k in meta["imported"]["unexpected"])  # listed, not silently dropped
    for ours, theirs in zip(expected, outputs(imported_encoder(tmp_path / "encoder_final.pth"))):
        torch.testing.assert_close(theirs, ours, rtol=0, atol=0)  # the v1 part equals the source's weights


def test_unknown_layout_names_the_known_ones_through_the_console_script(tmp_path):
    torch.save({"state_dict": {"blocks.0.attn.qkv.weight": torch.zeros(36, 12)}}, tmp_path / "vit.pt")
    result = run_cli("nnssl_import", tmp_path / "vit.pt", "-o", tmp_path / "e.pth", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert all(name in result.stderr for name in ("monai", "monai-tutorial", "voco", "smit"))
    assert not (tmp_path / "e.pth").exists()


def test_patch_embedding_norm_is_reported_as_dropped(encoder, tmp_path):
    # SMIT runs with patch_norm=True; nnssl's (MONAI default) Swin has no patch-embedding norm to put it in.
    state = smit_state(encoder) | {"patch_embed.norm.weight": torch.ones(12), "patch_embed.norm.bias": torch.zeros(12)}
    torch.save({"state_dict": state}, tmp_path / "smit.pt")
    report = import_encoder(tmp_path / "smit.pt", tmp_path / "encoder_final.pth")
    assert report.dropped == ["patch_embed.norm.bias", "patch_embed.norm.weight"]
    assert "WARNING: dropped 2 source encoder tensor(s)" in report.summary()


def smit_patch_merging(x: torch.Tensor, norm: torch.nn.Module, reduction: torch.nn.Module) -> torch.Tensor:
    """Literal transcription of SMIT's PatchMerging.forward on (B, H, W, T, C) (smit_models/smit.py)."""
    x0 = x[:, 0::2, 0::2, 0::2, :]
    x1 = x[:, 1::2, 0::2, 0::2, :]
    x2 = x[:, 0::2, 1::2, 0::2, :]
    x3 = x[:, 0::2, 0::2, 1::2, :]
    x4 = x[:, 1::2, 1::2, 0::2, :]
    x5 = x[:, 0::2, 1::2, 1::2, :]
    x6 = x[:, 1::2, 0::2, 1::2, :]
    x7 = x[:, 1::2, 1::2, 1::2, :]
    return reduction(norm(torch.cat([x0, x1, x2, x3, x4, x5, x6, x7], -1)))


def test_smit_merging_weights_reordered_compute_as_in_smit():
    torch.manual_seed(0)
    channels = 3
    norm, reduction = torch.nn.LayerNorm(8 * channels), torch.nn.Linear(8 * channels, 2 * channels, bias=False)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(2, 4, 6, 8, channels)
    expected = smit_patch_merging(x, norm, reduction)
    permutation = merge_permutation(SMIT_MERGE_ORDER, MONAI_MERGE_ORDER)
    assert permutation == [0, 1, 2, 3, 4, 6, 5, 7]  # the two swapped slots
    merging = PatchMerging(dim=channels)
    as_is = {"norm.weight": norm.weight, "norm.bias": norm.bias, "reduction.weight": reduction.weight}
    merging.load_state_dict(as_is)
    with torch.no_grad():
        assert not torch.allclose(merging(x), expected, atol=1e-3)  # same shapes, silently wrong
        merging.load_state_dict({k: reorder_merging(v, permutation) for k, v in as_is.items()})
        torch.testing.assert_close(merging(x), expected)


def test_export_loads_into_plain_monai_swinunetr(encoder, expected, tmp_path):
    run = tmp_path / "dino" / "run1"
    save_encoder(run / "encoder_final.pth", encoder, {"backbone": TINY.to_dict(), "in_channels": 1, "method": "dino"})
    assert export_main([str(run), "-o", str(tmp_path / "swin_dino.pt")]) == 0  # a run folder is accepted
    checkpoint = torch.load(tmp_path / "swin_dino.pt", weights_only=False)
    assert "SwinUNETR(out_channels=NUM_CLASSES, **ckpt[\"swinunetr_kwargs\"])" in checkpoint["usage"]
    network = SwinUNETR(out_channels=3, **checkpoint["swinunetr_kwargs"]).eval()
    result = network.load_state_dict(checkpoint["state_dict"], strict=False)
    assert result.unexpected_keys == [] and not [k for k in result.missing_keys if k.startswith(ENCODER_PREFIX)]
    for ours, theirs in zip(expected, outputs(network.swinViT)):  # MONAI's code vs our fast path: fp32 rounding
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    # and back: the method travels with the exported file
    report = import_encoder(tmp_path / "swin_dino.pt", tmp_path / "back.pth")
    assert report.method == "dino" and report.unexpected == [] and report.initialized == []
    for ours, theirs in zip(expected, outputs(imported_encoder(tmp_path / "back.pth"))):
        torch.testing.assert_close(theirs, ours, rtol=0, atol=0)


def test_unknown_architecture_is_inferred_and_backbone_checked(tmp_path):
    custom = {**TINY.to_dict(), "name": "x", "feature_size": 6, "num_heads": (1, 2, 2, 4), "window_size": 2}
    preset = type(TINY).from_dict(custom)
    torch.save(tang_layout(SwinEncoder(preset)), tmp_path / "tang.pt")
    report = import_encoder(tmp_path / "tang.pt", tmp_path / "encoder_final.pth", method="simclr")
    assert report.preset.name == "imported" and report.method == "simclr"
    assert (report.preset.feature_size, report.preset.num_heads, report.preset.window_size) == (6, (1, 2, 2, 4), 2)
    with pytest.raises(NnsslError, match=r"shape of backbone 'tiny' \(feature_size 12 vs 6, num_heads \(2, 2, 4, 4\) "
                                         r"vs \(1, 2, 2, 4\), window_size 4 vs 2\)"):
        import_encoder(tmp_path / "tang.pt", tmp_path / "other.pth", backbone="tiny")


def bad_sources(encoder, tmp_path):
    tang = tang_layout(encoder)
    incomplete = {"state_dict": {k: v for k, v in tang["state_dict"].items() if "layers2.0.blocks.1.norm1" not in k}}
    wide_merging = {"state_dict": smit_state(encoder) | {"layers.0.downsample.reduction.weight": torch.zeros(48, 96)}}
    save_encoder(tmp_path / "ours.pth", encoder, {"backbone": TINY.to_dict(), "in_channels": 1, "method": "dino"})
    torch.save(tang, tmp_path / "whole.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:5000])
    return {
        "missing.pt": (None, {}, "does not exist"),
        "truncated.pt": (None, {}, "truncated or not a PyTorch checkpoint"),
        "ours.pth": (None, {}, "already is an nnssl encoder file"),
        "other.pt": ({"state_dict": {"conv.weight": torch.zeros(2, 2)}}, {}, "no Swin checkpoint layout nnssl_import "
                                                                             "knows.*Known layouts: monai.*voco"),
        "nothing.pt": ({"epoch": 3}, {}, r"No weights found.*top-level entries: \['epoch'\].*--key"),
        "incomplete.pt": (incomplete, {}, r"lacks 2 encoder tensor\(s\).*layers2.0.blocks.1.norm1"),
        "wide_merging.pt": (wide_merging, {}, r"other shapes.*layers1.0.downsample.reduction.weight"),
        "key.pt": (tang, {"key": "teacher"}, r"--key teacher: .* no weights under 'teacher'"),
        "method.pt": (tang, {"method": "smitt"}, r"--method smitt is not an nnssl method. Did you mean 'smit'"),
        "backbone.pt": (tang, {"backbone": "hugee"}, "Unknown backbone preset 'hugee'"),
    }


def test_bad_sources_are_clear_errors(encoder, tmp_path):
    for name, (blob, options, message) in bad_sources(encoder, tmp_path).items():
        if blob is not None:
            torch.save(blob, tmp_path / name)
        with pytest.raises(NnsslError, match=message):
            import_encoder(tmp_path / name, tmp_path / "out.pth", **options)
        assert not (tmp_path / "out.pth").exists()


def test_import_console_script(encoder, tmp_path):
    torch.save(tang_layout(encoder), tmp_path / "model_swinvit.pt")
    result = run_cli("nnssl_import", tmp_path / "model_swinvit.pt", "-o", tmp_path / "encoder_final.pth")
    assert "Backbone 'tiny' (inferred from tensor shapes)" in result.stdout
    assert "Unused source tensors (heads, output norms, ...; 1): rotation_head.weight" in result.stdout
    assert load_encoder_file(tmp_path / "encoder_final.pth").method == "swinssl"


def test_console_scripts_answer_bad_input_with_exit_2(tmp_path, capsys):
    for main in (import_main, export_main):
        with pytest.raises(SystemExit) as exit_info:
            main([str(tmp_path / "missing.pt"), "-o", str(tmp_path / "x.pt")])
        assert exit_info.value.code == 2
        assert re.match(rf"{main.__module__.replace('nnssl.cli.', 'nnssl_').replace('import_encoder', 'import')}: "
                        rf"error: .*missing.pt", capsys.readouterr().err)
