"""Issue 18: nnssl_probe and nnssl_pretrain --probe on the session's synthetic CT task.

The probe must measure the representation, not the classifier: an encoder trained (supervised, as a
shortcut) to separate the task's classes scores clearly above the random encoder of the same preset with the
same classifier, seed and voxels.
"""
import csv
import json
import logging
import re

import pytest
import torch
from torch.nn import functional as F

from conftest import pretrain_run, run_cli
from nnssl.analysis.probe_table import probe_tables, read_probes
from nnssl.checkpoints import save_encoder
from nnssl.io import save_json
from nnssl.networks import get_preset
from nnssl.networks.swin import build_encoder
from nnssl.errors import NnsslError
from nnssl.probe import run as probe_run
from nnssl.probe.data import ProbeCases, ProbeData, load_probe_data
from nnssl.probe.linear import PROBE_STAGES, LinearProbe, ProbeSettings, voxel_features

log = logging.getLogger(__name__)
CHEAP = ("--patches-per-case", "1", "--steps", "100", "-device", "cpu")  # a probe in a few seconds


def test_probe_classifier_is_a_1x1x1_convolution_over_upsampled_concatenated_features():
    torch.manual_seed(0)
    size = (32, 64, 96)
    features = [torch.randn(2, c, *(s // stride for s in size)) for c, stride in ((3, 4), (5, 8), (7, 16), (9, 32))]
    probe = LinearProbe([3, 5, 7, 9], num_classes=4)
    upsampled = torch.cat([F.interpolate(f, size=size, mode="trilinear", align_corners=False) for f in features], 1)
    reference = F.conv3d(upsampled, probe.linear.weight[:, :, None, None, None], probe.linear.bias)
    torch.testing.assert_close(probe(features, size), reference, atol=1e-5, rtol=1e-5)
    # the fitting path reads the same upsampled features at voxels, borders included
    voxels = torch.tensor([[[0, 0, 0], [31, 63, 95], [7, 40, 3]], [[15, 0, 95], [1, 2, 3], [30, 1, 60]]])
    rows = probe.linear(voxel_features(features, voxels, size)).reshape(2, 3, 4)
    expected = torch.stack([reference[b][:, voxels[b, :, 0], voxels[b, :, 1], voxels[b, :, 2]].T for b in range(2)])
    torch.testing.assert_close(rows, expected, atol=1e-5, rtol=1e-5)


def test_report_sets_probe_dice_beside_finetuning_dice_with_their_rank_correlation(tmp_path):
    # probe ranks 1-2-3-4, fine-tuning ranks 1-2-4-3: Spearman rho = 1 - 6 * 2 / (4 * 15) = 0.8
    probes = {"random": 0.1, "simclr": 0.2, "dino": 0.3, "smit": 0.4}
    for method, dice in probes.items():
        save_json({"format": "nnssl-probe", "task": {"dataset": "Dataset511_BTCV"},
                   "encoder": {"method": method, "mean_dice": dice}}, tmp_path / method / "probe.json")
    finetuned = {"scratch": 0.5, "simclr": 0.6, "dino": 0.8, "smit": 0.7}
    dice_rows = [{"task": "Dataset511_BTCV", "shot": "all", "method": m, "dice_mean": d} for m, d in finetuned.items()]
    dice_rows.append({"task": "Dataset003_Liver", "shot": "all", "method": "smit", "dice_mean": 0.9})  # not probed
    rows, correlations = probe_tables(dice_rows, read_probes(tmp_path))
    assert [(r["method"], r["probe_dice"], r["finetune_dice"]) for r in rows] == [
        ("scratch", 0.1, 0.5), ("simclr", 0.2, 0.6), ("dino", 0.3, 0.8), ("smit", 0.4, 0.7)]
    assert len(correlations) == 1 and correlations[0]["methods"] == 4
    assert correlations[0]["spearman_rho"] == pytest.approx(0.8)


def _supervised_encoder(task_id: int, path, steps: int = 300):
    """A tiny encoder trained with labels through the probe's own classifier: the 'made to fit' encoder (300 steps at
    5e-3: with the synthetic CT's portal-venous contrast a random encoder already gets 0.41, and 150 steps at 2e-3
    fitted only 0.47)."""
    data = load_probe_data(ProbeCases(dataset=task_id, patches_per_case=2, voxels_per_patch=4096, seed=1))
    torch.manual_seed(1)
    preset = get_preset("tiny")
    encoder = build_encoder(preset, in_channels=1)
    head = LinearProbe(encoder.out_channels[PROBE_STAGES], data.num_classes)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=5e-3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        index = torch.randint(len(data.train_images), (2,), generator=generator)
        features = encoder(data.train_images[index])[PROBE_STAGES]
        logits = head.linear(voxel_features(features, data.train_voxels[index], data.patch_size))
        loss = F.cross_entropy(logits, data.train_labels[index].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_encoder(path, encoder, {"backbone": preset.to_dict(), "in_channels": 1, "method": "supervised",
                                 "run": "shortcut", "step": steps, "source": "student"})


# pretrain_corpus before ct_task: this test starts a run beside the six-folds soak, which builds the CT task, so the
# two workers build the session's corpus and CT task at the same time instead of one waiting for the other
@pytest.mark.slow
def test_probe_sees_pretraining_and_separates_a_fitted_encoder_from_random(pretrain_corpus, ct_task, tmp_path):
    # nnssl_pretrain --probe: probes before the first step, every 2 steps and at the end, in log.csv and the plot
    result, run = pretrain_run("simmim", "--probe", str(ct_task.dataset_id), "--probe-every", "2", epochs=1,
                               steps_per_epoch=4, run="probed")
    rows = list(csv.DictReader((run / "log.csv").open(encoding="utf-8")))
    probed = {int(r["step"]): float(r["probe_dice"]) for r in rows if r["probe_dice"]}
    assert sorted(probed) == [0, 2, 4] and all(0 <= v <= 1 for v in probed.values())
    assert (run / "progress.png").stat().st_size > 0
    share = re.search(r"probe: 3 probes took ([\d.]+) s, ([\d.]+)% of the run's ([\d.]+) s", result.stderr)
    assert share, result.stderr[-2000:]
    log.warning("probe time share of a 4-step tiny pretraining run probed 3 times: %s%% (%s s of %s s)",
                share[2], share[1], share[3])

    # the briefly pretrained encoder, by method name (the newest finished run), and random beside it
    line = run_cli("nnssl_probe", "simmim", "-d", ct_task.dataset_id, "-o", tmp_path / "simmim", *CHEAP).stdout
    pretrained = json.loads((tmp_path / "simmim" / "probe.json").read_text(encoding="utf-8"))
    assert pretrained["encoder"]["path"] == str((run / "encoder_final.pth").resolve())
    assert pretrained["random"]["backbone"] == "tiny" and set(pretrained["random"]["dice"]) == {
        "liver", "spleen", "kidney", "tumour"}
    assert line.count("\n") == 1 and "simmim (probed, student) mean Dice" in line and "vs random" in line

    # an encoder made to fit the task beats random clearly, with the same classifier and voxels
    _supervised_encoder(ct_task.dataset_id, tmp_path / "fitted.pth")
    run_cli("nnssl_probe", tmp_path / "fitted.pth", "-d", ct_task.dataset_id, "-o", tmp_path / "fitted", *CHEAP)
    fitted = json.loads((tmp_path / "fitted" / "probe.json").read_text(encoding="utf-8"))
    log.warning("probe mean Dice: fitted %.3f, briefly pretrained %.3f, random %.3f", fitted["encoder"]["mean_dice"],
                pretrained["encoder"]["mean_dice"], fitted["random"]["mean_dice"])
    assert fitted["encoder"]["mean_dice"] > fitted["random"]["mean_dice"] + 0.1
    # deterministic: two processes probing the same random encoder on the same voxels agree exactly
    assert fitted["random"] == pretrained["random"]


def _tiny_probe_data(cases: ProbeCases) -> ProbeData:
    """Two 32^3 training patches and one validation case of random intensities, one foreground class."""
    generator = torch.Generator().manual_seed(0)
    labels = (torch.rand(32, 32, 32, generator=generator) > 0.5).to(torch.uint8)
    return ProbeData(dataset="Dataset999_Tiny", labels={"organ": 1}, in_channels=1, patch_size=(32, 32, 32),
                     train_cases=["a"], val_cases=["b"], train_images=torch.rand(2, 1, 32, 32, 32, generator=generator),
                     train_voxels=torch.randint(32, (2, 16, 3), generator=generator),
                     train_labels=torch.randint(2, (2, 16), generator=generator),
                     val_images=[torch.rand(1, 32, 32, 32, generator=generator)], val_labels=[labels])


def test_a_probe_takes_the_random_baseline_of_an_earlier_random_probe(tmp_path, monkeypatch):
    monkeypatch.setattr(probe_run, "load_probe_data", _tiny_probe_data)
    probed = []  # the encoders probed (the classifier itself is tested above and in the slow test)
    monkeypatch.setattr(probe_run, "probe_encoder", lambda network, *args: probed.append(network) or
                        {"dice": {"organ": 0.1 * len(probed)}, "mean_dice": 0.1 * len(probed)})
    cases, settings = ProbeCases(dataset=999, patches_per_case=1), ProbeSettings(steps=2)
    shared = probe_run.run_probe("random", cases, tmp_path / "random", settings, backbone="tiny", device="cpu")
    torch.manual_seed(3)
    save_encoder(tmp_path / "other.pth", build_encoder(get_preset("tiny"), in_channels=1),
                 {"backbone": get_preset("tiny").to_dict(), "in_channels": 1, "method": "supervised"})
    record = probe_run.run_probe(str(tmp_path / "other.pth"), cases, tmp_path / "other", settings, device="cpu",
                                 random_from=tmp_path / "random" / "probe.json")
    assert len(probed) == 2 and record["random"] == shared["random"]  # the encoder only; random is copied
    assert record["encoder"]["mean_dice"] == pytest.approx(0.2) and record["task"] == shared["task"]
    with pytest.raises(NnsslError, match=r"probed another setting: seed, steps differ \(seed: 0 there, 1 here"):
        probe_run.run_probe(str(tmp_path / "other.pth"), cases, tmp_path / "x", ProbeSettings(steps=3, seed=1),
                            device="cpu", random_from=tmp_path / "random" / "probe.json")
    with pytest.raises(NnsslError, match="does not exist"):
        probe_run.run_probe(str(tmp_path / "other.pth"), cases, tmp_path / "x", settings, device="cpu",
                            random_from=tmp_path / "nowhere.json")
    with pytest.raises(NnsslError, match="ENCODER is 'random' itself"):
        probe_run.run_probe("random", cases, tmp_path / "x", settings, random_from=tmp_path / "random" / "probe.json")
