"""Plans variants (nnssl/plans_variants.py): one model folder per imported encoder, preprocessed data shared."""
import csv
import json
import os
import shutil

import pytest

from conftest import run_cli
from nnssl.errors import NnsslError
from nnssl.plans_variants import (apply_variant_knobs, seed_repeat, seed_variant_name, variant_identifier,
                                  write_plans_variant)

PLANS = {"dataset_name": "Dataset990_SynthCT", "plans_name": "nnsslPlans",
         "configurations": {"3d_fullres": {"data_identifier": "nnsslPlans_3d_fullres", "patch_size": [64, 64, 64]}}}


def test_variant_shares_the_data_and_records_its_knobs(tmp_path):
    (tmp_path / "nnsslPlans.json").write_text(json.dumps(PLANS))
    path = write_plans_variant(tmp_path, "nnsslPlans", "voco_b", {"nnssl_encoder_file": "/enc/voco_b.pth"})
    assert path == tmp_path / "nnsslPlans_voco_b.json"
    variant = json.loads(path.read_text())
    assert variant["plans_name"] == "nnsslPlans_voco_b"
    assert variant["configurations"] == PLANS["configurations"]  # same data_identifier: nothing preprocessed again
    assert variant["nnssl_variant"] == {"of": "nnsslPlans", "name": "voco_b",
                                        "knobs": {"nnssl_encoder_file": "/enc/voco_b.pth"}}
    before = path.stat().st_mtime_ns
    write_plans_variant(tmp_path, "nnsslPlans", "voco_b", {"nnssl_encoder_file": "/enc/voco_b.pth"})
    assert path.stat().st_mtime_ns == before  # unchanged: not rewritten under readers
    write_plans_variant(tmp_path, "nnsslPlans", "voco_b", {"nnssl_encoder_file": "/enc/other.pth"})
    assert json.loads(path.read_text())["nnssl_variant"]["knobs"]["nnssl_encoder_file"] == "/enc/other.pth"


@pytest.mark.parametrize("name", ["a__b", "_a", "a b", "a/b", ""])
def test_names_that_would_break_nnunets_folder_names_are_refused(name):
    with pytest.raises(NnsslError, match="letters and digits"):
        variant_identifier("nnsslPlans", name)


def test_unknown_knob_and_missing_source_are_clear_errors(tmp_path):
    with pytest.raises(NnsslError, match=r"\['nnssl_epochs'\] are not trainer knobs"):
        write_plans_variant(tmp_path, "nnsslPlans", "x", {"nnssl_epochs": "5"})
    with pytest.raises(NnsslError, match="nnssl_align_plans -d"):
        write_plans_variant(tmp_path, "nnsslPlans", "x", {})


def test_knobs_are_defaults_the_environment_overrides(monkeypatch):
    monkeypatch.setenv("nnssl_seed", "3")
    monkeypatch.setenv("nnssl_encoder_file", "")  # unset as far as knobs go; monkeypatch restores what the call sets
    plans = {**PLANS, "nnssl_variant": {"of": "nnsslPlans", "name": "x",
                                        "knobs": {"nnssl_seed": "1", "nnssl_encoder_file": "/enc/x.pth"}}}
    assert apply_variant_knobs(plans) == {"nnssl_encoder_file": "/enc/x.pth"}
    assert os.environ["nnssl_seed"] == "3" and os.environ["nnssl_encoder_file"] == "/enc/x.pth"
    assert apply_variant_knobs(PLANS) == {}


def test_seed_repeats_map_back_to_the_run_they_repeat():
    encoder = {"nnssl_encoder_file": "/enc/voco.pth"}
    assert (seed_variant_name(None, 1), seed_variant_name("voco", 2)) == ("seed1", "voco_seed2")
    assert seed_repeat({"name": "seed1", "knobs": {"nnssl_seed": "1"}}) == (None, 1)
    assert seed_repeat({"name": "voco_seed2", "knobs": {**encoder, "nnssl_seed": "2"}}) == ("voco", 2)
    assert seed_repeat({"name": "voco", "knobs": encoder}) is None
    assert seed_repeat({"name": "seed1", "knobs": encoder}) is None  # an imported encoder that is named seed1
    assert seed_repeat({"name": "seed1", "knobs": {"nnssl_seed": "2"}}) is None  # not made by seed_variant_name


def test_imported_encoder_trains_on_its_variant_and_the_report_names_it(ct_task, tmp_path):
    """Through the console scripts: nnssl_align_plans --variant, nnUNetv2_train -p <variant> with no knob set (the
    variant gives the encoder file and, as the study's seed repeat of the encoder's run, the seed), the report's row
    named after the encoder's variant, nnUNetv2_predict on it."""
    from nnssl.checkpoints import save_encoder
    from nnssl.networks import SwinEncoder, get_preset

    encoder = tmp_path / "tang.pth"
    save_encoder(encoder, SwinEncoder(get_preset("tiny")), {"backbone": get_preset("tiny").to_dict(),
                                                              "in_channels": 1, "method": "swinssl"})
    preprocessed = tmp_path / "preprocessed"  # a copy: the session's dataset stays without variants
    shutil.copytree(ct_task.preprocessed, preprocessed / ct_task.dataset)
    env = {"nnUNet_preprocessed": str(preprocessed), "nnUNet_results": str(tmp_path / "results"),
           "nnssl_num_epochs": "1", "nnssl_iterations_per_epoch": "1", "nnssl_encoder_file": None,
           "nnssl_seed": None}
    made = run_cli("nnssl_align_plans", "-d", ct_task.dataset_id, "-pl", "nnUNetPlans", "--variant", "tang_seed1",
                   "--knob", f"nnssl_encoder_file={encoder}", "--knob", "nnssl_seed=1", env=env)
    assert "train with -p nnUNetPlans_tang_seed1" in made.stdout
    run_cli("nnUNetv2_train", ct_task.dataset_id, "3d_fullres", "0", "-tr", "SwinUNETR_Imported_Trainer",
            "-p", "nnUNetPlans_tang_seed1", "-device", "cpu", env=env)
    folder = (tmp_path / "results" / ct_task.dataset /
              "SwinUNETR_Imported_Trainer__nnUNetPlans_tang_seed1__3d_fullres")
    record = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
    assert record["configurations"]["3d_fullres"]["nnssl"]["pretrained"]["path"] == str(encoder.resolve())
    assert record["configurations"]["3d_fullres"]["data_identifier"] == "nnUNetPlans_3d_fullres"  # shared data
    assert record["configurations"]["3d_fullres"]["nnssl"]["seeds"] == {"0": 1}
    run_cli("nnssl_report", ct_task.dataset_id, "-o", tmp_path / "report", env=env)
    with open(tmp_path / "report" / "dice.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["family"]) for r in rows] == [("tang", "imported")]
    predictions = tmp_path / "predictions"
    run_cli("nnUNetv2_predict", "-i", ct_task.raw / "imagesTs", "-o", predictions, "-d", ct_task.dataset_id,
            "-c", "3d_fullres", "-f", "0", "-tr", "SwinUNETR_Imported_Trainer", "-p", "nnUNetPlans_tang_seed1",
            "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta", env=env)
    assert len(list(predictions.glob("*.nii.gz"))) == 2
