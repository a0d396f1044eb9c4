"""Swin presets, our SwinUNETR and its weight compatibility with plain MONAI."""
import pytest
import torch
from monai.networks.nets import SwinUNETR

from nnssl.errors import NnsslError
from nnssl.networks import ENCODER_PREFIX, build_encoder, build_swinunetr, encoder_state_dict, get_preset, list_presets
from nnssl.networks.swinunetr import swin_patch_size


def test_presets_from_plans_match_the_study():
    assert {"paper", "monai", "tiny"} <= set(list_presets())
    paper = get_preset("paper")
    assert (paper.feature_size, paper.depths, paper.num_heads, paper.window_size, paper.patch_size) == \
        (48, (2, 2, 8, 2), (4, 4, 8, 16), 4, 2)
    assert paper.input_size == (128, 128, 128) and paper.qkv_bias
    monai = get_preset("monai")
    assert (monai.depths, monai.num_heads, monai.window_size, monai.input_size) == \
        ((2, 2, 2, 2), (3, 6, 12, 24), 7, (96, 96, 96))


def test_unknown_preset_names_the_choices():
    with pytest.raises(NnsslError, match=r"Unknown backbone preset 'papr'.*Did you mean 'paper'.*monai"):
        get_preset("papr")


@pytest.mark.parametrize("name", ["tiny", "monai"])
def test_encoder_weights_move_between_ours_and_plain_monai(name):
    preset = get_preset(name)
    ours = build_swinunetr(preset, in_channels=1, out_channels=3)
    plain = SwinUNETR(in_channels=1, out_channels=3, feature_size=preset.feature_size, depths=preset.depths,
                      num_heads=preset.num_heads, window_size=preset.window_size)
    encoder_weights = encoder_state_dict(ours.swinViT)
    assert all(k.startswith(ENCODER_PREFIX) for k in encoder_weights)
    result = plain.load_state_dict(encoder_weights, strict=False)
    assert result.unexpected_keys == []
    assert all(not k.startswith(ENCODER_PREFIX) for k in result.missing_keys)  # every swinViT key filled
    back = {k[len(ENCODER_PREFIX):]: v for k, v in plain.state_dict().items() if k.startswith(ENCODER_PREFIX)}
    fresh = build_encoder(preset)
    assert fresh.load_state_dict(back, strict=True)
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        for a, b in zip(fresh(x), plain.swinViT(x)):
            torch.testing.assert_close(a, b)


def test_encoder_outputs_and_mask_token():
    preset = get_preset("tiny")
    encoder = build_encoder(preset).eval()
    x = torch.randn(2, 1, 32, 64, 32)
    outs = encoder(x)
    assert [tuple(o.shape[1:]) for o in outs] == [
        (12, 16, 32, 16), (24, 8, 16, 8), (48, 4, 8, 4), (96, 2, 4, 2), (192, 1, 2, 1)]
    mask = torch.zeros(2, 16, 32, 16, dtype=torch.bool)
    mask[0, :8] = True
    token = torch.randn(12)
    masked = encoder(x, mask=mask, mask_token=token)
    torch.testing.assert_close(masked[0][1], outs[0][1])  # sample 1 unmasked: unchanged
    # masked positions of the (layer-normed) patch embedding hold the normalised mask token
    expected = torch.nn.functional.layer_norm(token, [12]).view(12, 1, 1, 1).expand(12, 8, 32, 16)
    torch.testing.assert_close(masked[0][0, :, :8], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked[0][0, :, 8:], outs[0][0, :, 8:])


@pytest.mark.parametrize("planned, fixed", [
    ([40, 80, 80], [32, 64, 64]), ([128, 128, 128], [128, 128, 128]), ([96, 97, 95], [96, 96, 96]),
    ([48, 160, 112], [32, 160, 96]), ([20, 20, 20], [64, 32, 32]),
])
def test_patch_sizes_are_rounded_to_multiples_of_32(planned, fixed):
    assert swin_patch_size(planned) == fixed


def test_2d_patch_cannot_be_fixed():
    with pytest.raises(NnsslError, match="3D configuration.*3d_fullres"):
        swin_patch_size([256, 256])
