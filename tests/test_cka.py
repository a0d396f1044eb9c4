"""Issue 7: CKA math (Kornblith et al. 2019; minibatch HSIC of Nguyen, Raghu & Kornblith 2021) and the
activation/patch plumbing of nnssl_cka, on hand-made inputs."""
import numpy as np
import pytest
import torch

from nnssl.analysis.activations import (DECODER_LAYERS, ENCODER_LAYERS, LayerTaps, Model, Patch, cut_patch,
                                        load_model, parse_model_spec, plan_patches, pool_features)
from nnssl.analysis.cka import MinibatchCKA, cka, gram_linear, hsic1, hsic1_all_pairs, minibatch_sizes
from nnssl.analysis.feature_reuse import _pairs
from nnssl.checkpoints import ENCODER_FILENAME, save_encoder
from nnssl.errors import NnsslError
from nnssl.networks import build_swinunetr, get_preset
from nnssl.networks.swin import build_encoder


def kornblith_debiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Literal transcription of Kornblith et al.'s reference code (``cka(gram_linear(x), gram_linear(y),
    debiased=True)`` with ``center_gram(unbiased=True)``): the direct full-matrix computation."""

    def center_gram(gram):
        gram = gram.copy()
        n = gram.shape[0]
        np.fill_diagonal(gram, 0)
        means = np.sum(gram, 0, dtype=np.float64) / (n - 2)
        means -= np.sum(means) / (2 * (n - 1))
        gram -= means[:, None]
        gram -= means[None, :]
        np.fill_diagonal(gram, 0)
        return gram

    gx, gy = center_gram(x @ x.T), center_gram(y @ y.T)
    return float(gx.ravel() @ gy.ravel() / (np.linalg.norm(gx.ravel()) * np.linalg.norm(gy.ravel())))


def kornblith_minibatch_cka(xs: list[np.ndarray], ys: list[np.ndarray]) -> float:
    """Nguyen et al. 2021 eq. 3 from full per-minibatch matrices: sums of the centred-Gram inner products."""

    def hsic(a, b):
        n = a.shape[0]

        def center(gram):
            gram = gram.copy()
            np.fill_diagonal(gram, 0)
            means = gram.sum(0) / (n - 2)
            means -= means.sum() / (2 * (n - 1))
            gram = gram - means[:, None] - means[None, :]
            np.fill_diagonal(gram, 0)
            return gram

        return center(a @ a.T).ravel() @ center(b @ b.T).ravel() / (n * (n - 3))

    xy = sum(hsic(x, y) for x, y in zip(xs, ys))
    return float(xy / np.sqrt(sum(hsic(x, x) for x in xs) * sum(hsic(y, y) for y in ys)))


@pytest.fixture
def representations():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(24, 10, generator=generator, dtype=torch.float64)
    y = x @ torch.randn(10, 7, generator=generator, dtype=torch.float64) + 0.5 * torch.randn(
        24, 7, generator=generator, dtype=torch.float64)
    return x, y


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_cka_of_a_representation_with_itself_is_one(representations, kernel):
    x, _ = representations
    assert cka(x, x, kernel=kernel) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling(representations):
    x, y = representations
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    reference = cka(x, y)
    assert 0.2 < reference < 0.99  # a non-trivial value, so equality below means something
    assert cka(x @ q, y) == pytest.approx(reference, abs=1e-10)
    assert cka(3.7 * x, 0.01 * y) == pytest.approx(reference, abs=1e-10)
    assert cka(x @ q, x) == pytest.approx(1.0, abs=1e-10)


def test_cka_is_not_invariant_to_arbitrary_invertible_linear_maps(representations):
    x, y = representations
    stretch = torch.diag(torch.tensor([50.0, 1, 1, 1, 1, 1, 1, 1, 1, 0.02], dtype=torch.float64))
    assert torch.linalg.matrix_rank(stretch) == 10  # invertible
    assert abs(cka(x @ stretch, y) - cka(x, y)) > 0.05
    assert cka(x @ stretch, x) < 0.9


def test_cka_is_symmetric(representations):
    x, y = representations
    assert cka(x, y) == pytest.approx(cka(y, x), abs=1e-14)
    accumulator = MinibatchCKA(3)
    accumulator.update([x, y, x[:, :3]])
    result = accumulator.result()
    assert torch.allclose(result, result.T, atol=1e-14)


def test_one_minibatch_equals_the_direct_full_matrix_computation(representations):
    x, y = representations
    accumulator = MinibatchCKA(2)
    accumulator.update([x.float(), y.float()])
    expected = kornblith_debiased_cka(x.numpy(), y.numpy())
    assert accumulator.result()[0, 1].item() == pytest.approx(expected, abs=1e-5)
    assert cka(x, y) == pytest.approx(expected, abs=1e-12)


def test_minibatch_estimator_matches_direct_per_minibatch_matrices(representations):
    x, y = representations
    sizes = [8, 10, 6]  # minibatches of different sizes are allowed
    xs, ys = torch.split(x, sizes), torch.split(y, sizes)
    accumulator = MinibatchCKA(2)
    for xb, yb in zip(xs, ys):
        accumulator.update([xb.float(), yb.float()])
    expected = kornblith_minibatch_cka([a.numpy() for a in xs], [b.numpy() for b in ys])
    assert accumulator.result()[0, 1].item() == pytest.approx(expected, abs=1e-5)
    assert accumulator.num_batches == 3 and accumulator.num_examples == 24
    # and it is a different estimator from the full-data one (same quantity, other samples)
    assert accumulator.result()[0, 1].item() != pytest.approx(kornblith_debiased_cka(x.numpy(), y.numpy()), abs=1e-3)


def test_minibatch_sizes_split_evenly_and_keep_every_example():
    assert minibatch_sizes(4, 32) == [4]
    assert minibatch_sizes(65, 32) == [33, 32]
    assert minibatch_sizes(200, 32) == [34, 34, 33, 33, 33, 33]


def test_all_pairs_hsic_equals_the_literal_formula(representations):
    x, y = representations
    grams = torch.stack([gram_linear(x), gram_linear(y), gram_linear(x[:, :4])])
    pairs = hsic1_all_pairs(grams)
    for i in range(3):
        for j in range(3):
            assert pairs[i, j].item() == pytest.approx(hsic1(grams[i], grams[j]).item(), rel=1e-10)


def test_hsic1_on_a_hand_computed_example():
    # n = 4, K = L = all-ones off the diagonal (constant features): every term cancels, HSIC_1 = 0:
    # tr = 12, 1'K1 1'L1 / ((n-1)(n-2)) = 144 / 6 = 24, 2/(n-2) 1'KL1 = 1 * 36 = 36 -> (12 + 24 - 36) / 4 = 0
    ones = torch.ones(4, 4, dtype=torch.float64)
    assert hsic1(ones, ones).item() == pytest.approx(0.0, abs=1e-12)
    # x = (1, 0, 0, 0): K~ = 0 (only the diagonal is non-zero), so HSIC_1 = 0 as well
    x = torch.tensor([[1.0], [0.0], [0.0], [0.0]], dtype=torch.float64)
    assert hsic1(gram_linear(x), gram_linear(x)).item() == pytest.approx(0.0, abs=1e-12)
    # x = (1, 1, -1, -1): K~ is +1 for the 4 same-sign pairs, -1 for the 8 others, so tr(K~ K~) = 12,
    # 1'K~1 = -4, K~1 = (-1, -1, -1, -1), 1'K~K~1 = 4: HSIC_1 = (12 + 16 / 6 - 4) / (4 * 1) = 8 / 3
    x = torch.tensor([[1.0], [1.0], [-1.0], [-1.0]], dtype=torch.float64)
    assert hsic1(gram_linear(x), gram_linear(x)).item() == pytest.approx(8 / 3, abs=1e-12)


def test_cka_rejects_bad_arguments(representations):
    x, y = representations
    with pytest.raises(ValueError, match="at least 4 examples, got 3"):
        MinibatchCKA(2).update([x[:3], y[:3]])
    with pytest.raises(ValueError, match="Unknown CKA kernel 'cosine'"):
        MinibatchCKA(2, kernel="cosine")
    with pytest.raises(ValueError, match="rbf_sigma must be positive"):
        MinibatchCKA(2, kernel="rbf", rbf_sigma=0.0)
    with pytest.raises(ValueError, match="expected features of 2 layers, got 1"):
        MinibatchCKA(2).update([x])
    with pytest.raises(ValueError, match=r"same examples; got batch sizes \[5, 24\]"):
        MinibatchCKA(2).update([x, y[:5]])
    with pytest.raises(ValueError, match="x has 24 rows, y has 5"):
        cka(x, y[:5])
    with pytest.raises(ValueError, match="before any update"):
        MinibatchCKA(2).result()


def test_patch_positions_are_seeded_inside_the_case_and_centred_when_it_is_smaller():
    shapes = {"a": (1, 40, 70, 90), "b": (1, 20, 64, 64)}
    patches = plan_patches(shapes, (32, 64, 64), per_case=3, seed=7)
    assert patches == plan_patches(shapes, (32, 64, 64), per_case=3, seed=7)
    assert patches != plan_patches(shapes, (32, 64, 64), per_case=3, seed=8)
    # case b is 20 voxels deep for a 32-voxel patch: 6 voxels of padding on each side, other axes fit exactly,
    # so it has one position and gives one patch, not three copies of it
    assert [p.case for p in patches] == ["a"] * 3 + ["b"]
    assert len(set(patches)) == 4
    for p in patches[:3]:
        assert 0 <= p.start[0] <= 8 and 0 <= p.start[1] <= 6 and 0 <= p.start[2] <= 26
    assert patches[3].start == (-6, 0, 0)
    # every position of a case that has few: all of them, each once
    few = plan_patches({"c": (1, 33, 65, 64)}, (32, 64, 64), per_case=10, seed=0)
    assert sorted(p.start for p in few) == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]


def test_cut_patch_copies_the_block_and_zero_pads_outside():
    volume = np.arange(2 * 4 * 5 * 6, dtype=np.float32).reshape(2, 4, 5, 6) + 1  # no zeros inside
    patch = cut_patch(volume, Patch("a", (-1, 1, 2)).start, (4, 3, 5))
    assert patch.shape == (2, 4, 3, 5)
    np.testing.assert_array_equal(patch[:, 1:, :, :4], volume[:, 0:3, 1:4, 2:6])
    assert (patch[:, 0] == 0).all() and (patch[:, :, :, 4] == 0).all()


def test_pool_features_pools_each_axis_to_at_most_the_grid():
    activation = torch.arange(2 * 3 * 8 * 4 * 1, dtype=torch.float32).reshape(2, 3, 8, 4, 1)
    pooled = pool_features(activation, pool=2)
    assert pooled.shape == (2, 3 * 2 * 2 * 1)
    assert pooled[0, 0].item() == pytest.approx(activation[0, 0, :4, :2, 0].mean().item())
    assert pool_features(activation, pool=0).shape == (2, 3 * 8 * 4)
    assert torch.equal(pool_features(activation, pool=8), activation.flatten(1))


def test_layer_taps_capture_every_swin_stage_and_decoder_block():
    torch.manual_seed(0)
    preset = get_preset("tiny")
    network = build_swinunetr(preset, in_channels=1, out_channels=3).eval()
    x = torch.randn(1, 1, 32, 32, 64)
    every = LayerTaps(network, ENCODER_LAYERS + DECODER_LAYERS, pool=2)(x)
    # channels: stages F * 2**i (F = 12), decoder blocks as MONAI builds them; spatial: min(side, 2) per axis
    channels = [12, 24, 48, 96, 192, 12, 12, 24, 48, 192, 96, 48, 24, 12, 12]
    grids = [(2, 2, 2)] * 3 + [(2, 2, 2), (1, 1, 2)] + [(2, 2, 2)] * 4 + [(1, 1, 2)] + [(2, 2, 2)] * 5
    assert [tuple(f.shape) for f in every] == [(1, c * int(np.prod(g))) for c, g in zip(channels, grids)]
    encoder_only = LayerTaps(build_swinunetr(preset, 1, 3).eval(), ("stage2", "patch_embed"), pool=2)
    encoder_only.network.load_state_dict(network.state_dict())
    stage2, patch_embed = encoder_only(x)  # runs swinViT only, in the order asked
    assert torch.allclose(stage2, every[2], atol=1e-6) and torch.allclose(patch_embed, every[0], atol=1e-6)
    with pytest.raises(ValueError, match="unknown layers"):
        LayerTaps(network, ("stage9",))


def test_vs_pretrained_pairs_each_finetuned_model_with_its_encoder_once(tmp_path):
    preset = get_preset("tiny")
    encoder_file = tmp_path / "simmim" / "run" / ENCODER_FILENAME
    save_encoder(encoder_file, build_encoder(preset), {"backbone": preset.to_dict(), "method": "simmim"})

    def trained(name, record):
        return Model(name=name, kind="trained", method="simmim", checkpoint=tmp_path / name, layers=ENCODER_LAYERS,
                     pretrained_record=record, info={"folder": name})

    record = {"path": str(encoder_file)}
    models = [load_model(str(encoder_file.parent)), trained("a", record), trained("b", record), trained("s", None)]
    pairs, encoder_pairs = _pairs(models, vs_pretrained=True)
    assert len(models) == 4  # the encoder given as a folder is not added a second time
    assert encoder_pairs == {(1, 0), (2, 0)}
    assert pairs == [(0, 3), (1, 2), (1, 3), (2, 3), (1, 0), (2, 0)]  # each pair once
    assert _pairs(models[1:3], vs_pretrained=False) == ([(0, 1)], set())


def test_model_specs_take_a_fold_and_paths_relative_to_the_results_variables(tmp_path, monkeypatch):
    model = tmp_path / "results" / "Dataset001_A" / "T__nnUNetPlans__3d_fullres"
    run = tmp_path / "nnssl_results" / "simmim" / "run1"
    model.mkdir(parents=True)
    run.mkdir(parents=True)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnssl_results", str(tmp_path / "nnssl_results"))
    assert parse_model_spec(f"{model}:all") == (model, "all")
    assert parse_model_spec("Dataset001_A/T__nnUNetPlans__3d_fullres:2") == (model, "2")
    assert parse_model_spec("simmim/run1") == (run, None)
    with pytest.raises(NnsslError, match="Model folder 'simmim/run2' does not exist"):
        parse_model_spec("simmim/run2")
