"""Plans variants (nnssl/plans_variants.py): one model folder per imported encoder, preprocessed data shared."""
import json
import os

import pytest

from nnssl.errors import NnsslError
from nnssl.plans_variants import apply_variant_knobs, variant_identifier, write_plans_variant

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
    monkeypatch.delenv("nnssl_encoder_file", raising=False)
    plans = {**PLANS, "nnssl_variant": {"of": "nnsslPlans", "name": "x",
                                        "knobs": {"nnssl_seed": "1", "nnssl_encoder_file": "/enc/x.pth"}}}
    assert apply_variant_knobs(plans) == {"nnssl_encoder_file": "/enc/x.pth"}
    assert os.environ["nnssl_seed"] == "3" and os.environ["nnssl_encoder_file"] == "/enc/x.pth"
    assert apply_variant_knobs(PLANS) == {}
