"""simclr, mocov3, byol, rotnet, swinssl through the real nnssl_pretrain on the session's tiny CT corpus:
the loss goes down and encoder_final.pth (and the EMA target's encoder) fills every swinViT key of a SwinUNETR."""
from __future__ import annotations

import csv
import statistics

import pytest
import torch

from conftest import pretrain_run
from nnssl.checkpoints import load_encoder_file, load_encoder_weights
from nnssl.networks import ENCODER_PREFIX, build_swinunetr

STEPS = 20
# Batch 4 for the methods with batch-norm heads (BN over 2 samples only gives each feature the values +-1);
# swinssl's rotation and contrastive heads read two different last-stage tokens: one side of 64 voxels.
EXTRA = {"simclr": ("--batch-size", "4"), "mocov3": ("--batch-size", "4"), "byol": ("--batch-size", "4"),
         "swinssl": ("--patch-size", "64", "32", "32")}

# Most batches of 4 from the corpus's 6 volumes hold two crops of one volume: for a loss made only of in-batch
# negatives that is a false negative and a spike, so those runs are compared by the median of each half.
IN_BATCH_NEGATIVES = {"simclr", "mocov3"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["simclr", "mocov3", "byol", "rotnet", "swinssl"])
def test_pretraining_lowers_the_loss_and_the_encoder_fills_swinunetr(name, pretrain_corpus):
    # Paper-scale heads and hyperparameters from plans/pretrain/<name>.json; only the loop is made tiny,
    # with a learning rate a 20-step run can show progress with and no warmup.
    _, folder = pretrain_run(name, *EXTRA.get(name, ()), "--lr", "1e-3", "--plans-override", "warmup_epochs=0", "lr_batch=null",
                             epochs=2, steps_per_epoch=STEPS // 2)
    with open(folder / "log.csv", newline="") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert len(losses) == STEPS
    first, second = losses[:STEPS // 2], losses[STEPS // 2:]
    center = statistics.median if name in IN_BATCH_NEGATIVES else statistics.mean
    assert center(second) < center(first), losses

    files = ["encoder_final.pth"] + (["encoder_teacher_final.pth"] if name in ("mocov3", "byol") else [])
    for file in files:  # the student's encoder, and the EMA target's where there is one
        checkpoint = load_encoder_file(folder / file)
        assert checkpoint.method == name and checkpoint.preset.name == "tiny"
        network = build_swinunetr(checkpoint.preset, in_channels=1, out_channels=2)  # a MONAI SwinUNETR
        encoder_keys = [k for k in network.state_dict() if k.startswith(ENCODER_PREFIX)]
        assert load_encoder_weights(network, checkpoint) == len(encoder_keys) == len(checkpoint.state_dict)
        for key in encoder_keys:  # every swinViT key filled with the pretrained, finite value
            value = network.state_dict()[key]
            assert torch.equal(value, checkpoint.state_dict[key]) and torch.isfinite(value).all(), (file, key)
