"""dino, ibot, smit through the real nnssl_pretrain on the session's tiny CT corpus: the student learns, the
teacher has not collapsed at the end, each term is logged, and encoder_final.pth (the student) and
encoder_teacher_final.pth fill every swinViT key of a plain MONAI SwinUNETR.

What a few-step run can show: the cross-entropy to the teacher is H(teacher) + KL(teacher || student), and only
the KL depends on the student. In the first tens of steps the center (zero at start, EMA 0.9) catches up with
the teacher's mean output, which flattens the teacher (H rises towards log K, the known start of DINO
training), so the total loss of a faithful run rises while the student's part, the KL, falls. The global KL
is exactly ``global_distill - teacher_entropy`` (every teacher view enters the same number of pairs).
"""
from __future__ import annotations

import csv
import statistics

import pytest
import torch
from monai.networks.nets import SwinUNETR

from conftest import pretrain_run
from nnssl.checkpoints import load_encoder_file
from nnssl.networks import ENCODER_PREFIX

STEPS = 8
# Paper-scale heads, temperatures, centering and EMA; only the loop is tiny (32^3 crops, so DINO's local crop
# is 32^3 too, and there is one).
EXTRA = {"dino": ("method.local_views=1", "method.local_size=32"), "ibot": (), "smit": ()}
TERMS = {"dino": [], "ibot": ["global_distill", "patch_distill"], "smit": ["recon", "patch_distill", "global_distill"]}
# Collapse floors: one dominating dimension has entropy 0 (log 8192 = 9.0 when uniform); a teacher that
# ignores its input has per-dimension std 0.
ENTROPY_FLOOR, STD_FLOOR = 1.0, 1e-3


def _swinunetr_loads_every_encoder_key(path, method: str, source: str) -> None:
    checkpoint = load_encoder_file(path)
    assert checkpoint.method == method and checkpoint.meta["source"] == source
    preset = checkpoint.preset
    network = SwinUNETR(in_channels=1, out_channels=2, feature_size=preset.feature_size, depths=preset.depths,
                        num_heads=preset.num_heads, window_size=preset.window_size)
    encoder_keys = {k for k in network.state_dict() if k.startswith(ENCODER_PREFIX)}
    result = network.load_state_dict(checkpoint.state_dict, strict=False)
    assert result.unexpected_keys == [] and set(checkpoint.state_dict) == encoder_keys
    assert not encoder_keys & set(result.missing_keys)  # every swinViT key filled
    assert all(torch.isfinite(v).all() for v in checkpoint.state_dict.values())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dino", "ibot", "smit"])
def test_student_learns_and_teacher_does_not_collapse(name, pretrain_corpus):
    # 2 epochs: the heads' last layers are frozen in the first and trained in the second
    _, folder = pretrain_run(name, "--lr", "1e-3", "--plans-override", "warmup_epochs=0", "lr_batch=null", *EXTRA[name],
                             epochs=2, steps_per_epoch=STEPS // 2)
    with open(folder / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == STEPS
    for column in TERMS[name] + ["loss", "teacher_temp", "teacher_entropy", "teacher_std"]:
        assert all(row[column] != "" for row in rows), column
    global_term = "loss" if name == "dino" else "global_distill"
    kl = [float(row[global_term]) - float(row["teacher_entropy"]) for row in rows]
    assert statistics.mean(kl[-3:]) < 0.75 * statistics.mean(kl[:3]), kl
    if name == "smit":  # reconstruction (weight 1 against 0.1 and 0.1) dominates: the total loss falls too
        loss = [float(row["loss"]) for row in rows]
        assert statistics.mean(loss[-3:]) < statistics.mean(loss[:3]), loss
    for head in ["teacher"] + (["teacher_patch"] if name != "dino" else []):
        entropy, std = float(rows[-1][f"{head}_entropy"]), float(rows[-1][f"{head}_std"])
        assert entropy > ENTROPY_FLOOR and std > STD_FLOOR, (head, entropy, std)
    _swinunetr_loads_every_encoder_key(folder / "encoder_final.pth", name, "student")
    _swinunetr_loads_every_encoder_key(folder / "encoder_teacher_final.pth", name, "teacher")
