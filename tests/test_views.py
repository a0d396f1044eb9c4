"""The loader's view maker: views independent of their region and of each other, the augmentations, masks and
inpainting corruption each method's plan cites (DataAugmentationDINO, iBOT's loader, Tang et al.'s ops.py)."""
from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.intensity.inversion import InvertImageTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform

from nnssl.data.inpainting import NOISE, PASTED, inpainting_corruption
from nnssl.data.views import ViewMaker
from nnssl.methods.registry import build_method, list_methods
from nnssl.networks import build_encoder, get_preset

PATCH = (32, 32, 32)


def _view_maker(method: str, patch=PATCH, **hyperparameters) -> ViewMaker:
    spec = build_method(method, build_encoder(get_preset("tiny")), **hyperparameters).view_spec()
    return ViewMaker(spec, patch, token_patch=2)


@pytest.mark.parametrize("method", list_methods())
def test_views_share_no_storage_and_leave_the_region_unchanged(method):
    # plain crops (SMIT, Swin UNETR SSL) used to be views of the region that in-place brightness then changed
    # (when no flip copied them first: a few percent of the views)
    np.random.seed(3)
    torch.manual_seed(3)
    maker, rng = _view_maker(method), np.random.default_rng(3)
    for _ in range(20 if method in ("smit", "swinssl") else 1):  # seeded: the old code failed 4 and 7 times
        region = torch.randn(1, *maker.region_size)
        before = region.clone()
        sample = maker(region, rng)
        assert torch.equal(region, before), "making the views changed the region"
        storages = [region.untyped_storage().data_ptr()] + [v.untyped_storage().data_ptr() for v in sample.values()]
        assert len(set(storages)) == len(storages), f"{method}: views share storage with each other or the region"


def test_inpainting_covers_a_quarter_of_the_voxels_half_noise_half_pasted():
    # Tang et al.'s aug_rand: noise boxes over U(0, 0.3) of each view, then boxes from another sample
    rng = np.random.default_rng(0)
    noise, pasted = [], []
    for draw in range(250):  # 1,000 corrupted views
        views = torch.randn(4, 1, 16, 16, 16)
        clean = views.clone()
        corrupted, source = inpainting_corruption(views, rng)
        assert torch.equal(views, clean)
        kept = (source == 0)[:, None]
        assert torch.equal(corrupted[kept], views[kept])
        for i in range(4 if draw < 25 else 0):
            noisy, copied = corrupted[i][(source[i] == NOISE)[None]], (source[i] == PASTED)[None]
            # noise spans the view's own range; pasted voxels are another sample's at the same place
            assert noisy.numel() == 0 or views[i].min() - 1e-5 <= noisy.min() <= noisy.max() <= views[i].max() + 1e-5
            others = torch.cat([views[:i], views[i + 1:]])
            assert bool((others == corrupted[i]).any(dim=0)[copied].all())
            assert not bool((views[i] == corrupted[i])[copied].any())
        noise.append(float((source == NOISE).float().mean()))
        pasted.append(float((source == PASTED).float().mean()))
    total = np.mean(noise) + np.mean(pasted)
    assert 0.20 <= total <= 0.35
    assert 0.4 <= np.mean(noise) / total <= 0.6


def test_swinssl_batches_carry_clean_targets_and_corrupted_views():
    np.random.seed(0)
    maker, rng = _view_maker("swinssl"), np.random.default_rng(0)
    batch = maker.collate([maker(torch.randn(1, *maker.region_size), rng) for _ in range(4)])
    for i in (1, 2):
        changed = (batch[f"view{i}"] != batch[f"clean{i}"]).float().mean()
        assert batch[f"view{i}"].shape == batch[f"clean{i}"].shape == (4, 1, *PATCH) and 0 < changed < 0.7


def _probabilities(transform, kind) -> list[float]:
    return [t.apply_probability if isinstance(t, RandomTransform) else t.p_invert_image
            for t in transform.transforms
            if isinstance(getattr(t, "transform", t), kind)]


def _count_applications(augment, view: int, counts: Counter) -> None:
    """Make the blur and inversion in ``augment`` count under ``counts[(effect, view)]`` whenever they act on
    an image, instead of computing (the image passes through: only how often each acts is of interest)."""
    def record(key, img, **params):
        counts[key] += key[0] == "blur" or bool(params["apply"])  # inversion decides inside, blur outside
        return img

    for transform in augment.transforms:
        inner = getattr(transform, "transform", transform)
        if isinstance(inner, (GaussianBlurTransform, InvertImageTransform)):
            effect = "blur" if isinstance(inner, GaussianBlurTransform) else "solarize"
            inner._apply_to_image = functools.partial(record, (effect, view))


def test_byol_views_are_augmented_asymmetrically():
    # BYOL's Table 6 (deepmind-research byol/utils/augmentations.py; moco-v3 main_moco.py takes it, and
    # test_methods_contrastive.py::test_view_specs checks mocov3's spec is byol's): Gaussian blur on view 1
    # always and on view 2 at p 0.1; solarization never on view 1 and on view 2 at p 0.2. The view maker
    # augments view i with global_augments[i - 1]; drawn here on a tiny image (the crop is not in question).
    np.random.seed(5)
    torch.manual_seed(5)
    counts, draws = Counter(), 1000
    for view, augment in enumerate(_view_maker("byol").global_augments, start=1):
        _count_applications(augment, view, counts)
        for _ in range(draws):
            augment(image=torch.randn(1, 4, 4, 4))
    assert counts[("blur", 1)] == draws and counts[("solarize", 1)] == 0
    assert 0.07 <= counts[("blur", 2)] / draws <= 0.13  # 1,000 draws: p 0.1 +- 3 standard deviations
    assert 0.16 <= counts[("solarize", 2)] / draws <= 0.24


@pytest.mark.parametrize("method", ["dino", "ibot"])
def test_multicrop_views_get_dinos_per_view_blur_and_solarization(method):
    maker = _view_maker(method)
    first, second = maker.global_augments
    assert [_probabilities(a, GaussianBlurTransform) for a in (first, second, maker.local_augment)] == \
        [[1.0], [0.1], [0.5]]
    assert [_probabilities(a, InvertImageTransform) for a in (first, second, maker.local_augment)] == [[], [0.2], []]


def test_ibot_masks_half_of_the_views_at_0_3_plus_minus_0_2():
    maker, rng = _view_maker("ibot", patch=(64, 64, 64)), np.random.default_rng(0)
    ratios = np.array([maker._mask(maker.spec.mask, rng).mean() for _ in range(400)])
    assert 0.42 <= np.mean(ratios == 0) <= 0.58
    masked = ratios[ratios > 0]  # whole 16^3 blocks: ratios in steps of 1/64
    assert masked.min() >= 0.1 - 1 / 64 and masked.max() <= 0.5 and abs(masked.mean() - 0.3) < 0.03
