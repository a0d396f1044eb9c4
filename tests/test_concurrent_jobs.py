"""Issue 20: many jobs on one model folder or one dataset at once (as on a cluster) never corrupt shared files.

- 6 fine-tunings of one model folder (different folds) start at the same instant, 5 rounds in a row: all 30
  succeed, and every read of the shared plans.json made while they run parses. nnU-Net's final validation, which
  writes only the fold's own folder and costs more than the tiny training, runs in the last round only, without
  its test-time mirroring (8 predictions per window instead of 1; this test checks the files, not the Dice).
- Two nnssl_fewshot processes adding different shot counts at once: every fold of both ends up in
  splits_final.json and fewshot.json, and no fold is renumbered.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import BIN, NO_FINAL_VALIDATION, run_cli
from nnssl.fewshot import FEWSHOT_FILENAME, SPLITS_FILENAME, add_fewshot_folds
from test_fewshot import write_preprocessed

SOAK_FOLDS, SOAK_ROUNDS = 6, 5
TRAINER = "SwinUNETR_Scratch_Trainer"
# As small as nnU-Net allows: one epoch of one training and one validation iteration, one thread per job.
TINY_FINETUNE = {"nnssl_num_epochs": "1", "nnssl_iterations_per_epoch": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture
def own_preprocessed(ct_task, tmp_path, monkeypatch) -> Path:
    """A copy of the CT task's preprocessed data, without its split files, as this test's nnUNet_preprocessed."""
    root = tmp_path / "preprocessed"
    shutil.copytree(ct_task.preprocessed, root / ct_task.dataset,
                    ignore=shutil.ignore_patterns(SPLITS_FILENAME, FEWSHOT_FILENAME, ".*.lock"))
    monkeypatch.setenv("nnUNet_preprocessed", str(root))
    return root / ct_task.dataset


# nnU-Net's final validation without its test-time mirroring (prefix this to a launcher script): the same files,
# one prediction per window instead of eight.
UNMIRRORED_VALIDATION = """
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
validate = nnUNetTrainer.perform_actual_validation
def validate_unmirrored(self, *args, **kwargs):
    self.inference_allowed_mirroring_axes = None
    return validate(self, *args, **kwargs)
nnUNetTrainer.perform_actual_validation = validate_unmirrored
"""

# Starts nnU-Net's own nnUNetv2_train entry point in N processes forked at the same instant from one interpreter that
# has imported nnU-Net and our trainers once (an interpreter start per job would cost more than the training), and
# has run nnU-Net's trainer search once (it imports every trainer module nnU-Net ships).
FORK_TRAININGS = """
import json, os, sys, traceback
from nnunetv2.run.run_training import run_training_entry
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
import nnssl_trainers.swinunetr  # noqa: F401  (imported once, before forking)

jobs, logs = json.loads(sys.argv[1]), sys.argv[2]
recursive_find_trainer_class_by_name(jobs[0][jobs[0].index("-tr") + 1])
pids = []
for i, argv in enumerate(jobs):
    pid = os.fork()
    if pid == 0:
        out = os.open(os.path.join(logs, f"job_{i}.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1)
        os.dup2(out, 2)
        sys.argv, code = ["nnUNetv2_train", *argv], 1
        try:
            run_training_entry()
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    pids.append(pid)
print(json.dumps([os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]))
"""


class PlansReader(threading.Thread):
    """Reads ``path`` as fast as it can, the way another fold or nnUNetv2_predict would (no retry), and counts."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path, self.reads, self.failures = path, 0, []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                text = self.path.read_text(encoding="utf-8")
            except FileNotFoundError:
                time.sleep(0.001)
                continue
            self.reads += 1
            try:
                json.loads(text)
            except ValueError as err:
                self.failures.append(f"{err} ({len(text)} bytes)")
            time.sleep(0.001)  # leave the trainings the CPU


@pytest.mark.slow
def test_six_folds_started_at_once_five_times(ct_task, own_preprocessed, tmp_path, monkeypatch):
    results = tmp_path / "results"
    monkeypatch.setenv("nnUNet_results", str(results))
    for key, value in TINY_FINETUNE.items():
        monkeypatch.setenv(key, value)
    add_fewshot_folds(ct_task.dataset_id, shots=[1], folds=[0])  # fold 5, so that six folds exist
    model = results / ct_task.dataset / f"{TRAINER}__nnUNetPlans__3d_fullres"
    jobs = [[str(ct_task.dataset_id), "3d_fullres", str(fold), "-tr", TRAINER, "-device", "cpu"]
            for fold in range(SOAK_FOLDS)]
    reader = PlansReader(model / "plans.json")
    reader.start()
    codes = []
    try:
        for round_ in range(SOAK_ROUNDS):
            logs = tmp_path / f"round_{round_}"
            logs.mkdir()
            validation = UNMIRRORED_VALIDATION if round_ == SOAK_ROUNDS - 1 else NO_FINAL_VALIDATION
            script = validation + FORK_TRAININGS
            launcher = subprocess.Popen([sys.executable, "-c", script, json.dumps(jobs), str(logs)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        start_new_session=True)
            try:
                stdout, stderr = launcher.communicate(timeout=900)
            finally:
                if launcher.poll() is None:  # timed out: no training may outlive the test
                    os.killpg(launcher.pid, signal.SIGKILL)
                    launcher.wait()
            assert launcher.returncode == 0, stderr[-3000:]
            codes += json.loads(stdout.splitlines()[-1])
            failed = {p.name: p.read_text()[-2000:] for p, c in zip(sorted(logs.iterdir()), codes[-SOAK_FOLDS:]) if c}
            assert not failed, f"round {round_}: {failed}"
    finally:
        reader.stop.set()
        reader.join()
    assert codes == [0] * SOAK_FOLDS * SOAK_ROUNDS
    for fold in range(SOAK_FOLDS):
        assert (model / f"fold_{fold}" / "checkpoint_final.pth").is_file()
        assert (model / f"fold_{fold}" / "validation" / "summary.json").is_file()  # the last round validated
    assert reader.reads > 0 and reader.failures == [], f"{len(reader.failures)} of {reader.reads} reads failed"
    assert json.loads((model / "plans.json").read_text())["configurations"]["3d_fullres"]["nnssl"]["num_epochs"] == 1


def test_two_fewshot_processes_at_once_keep_every_fold(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    dataset = tmp_path / "Dataset124_Toy"
    cases = [f"case_{i:02d}" for i in range(20)]
    write_preprocessed(dataset, {c: {1 + i % 4} for i, c in enumerate(cases)})  # selection reads class locations
    splits = [{"train": [c for i, c in enumerate(cases) if i % 5 != k], "val": cases[k::5]} for k in range(5)]
    (dataset / SPLITS_FILENAME).write_text(json.dumps(splits, indent=4))
    commands = [[str(BIN / "nnssl_fewshot"), "124", "--shots", shots] for shots in ("1", "5")]
    jobs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    outputs = [job.communicate(timeout=300) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    splits = json.loads((dataset / SPLITS_FILENAME).read_text())
    table = json.loads((dataset / FEWSHOT_FILENAME).read_text())["folds"]
    assert len(splits) == 15 and sorted(map(int, table)) == list(range(5, 15))
    assert sorted((v["shots"], v["base_fold"]) for v in table.values()) == [(n, b) for n in (1, 5) for b in range(5)]
    for fold, entry in table.items():  # every fold holds what fewshot.json says, under the id it was given
        assert len(splits[int(fold)]["train"]) == entry["shots"]
        assert set(splits[int(fold)]["train"]) <= set(splits[entry["base_fold"]]["train"])
        assert splits[int(fold)]["val"] == splits[entry["base_fold"]]["val"]
    # what each process reported is what the files hold: whichever ran second numbered its folds after the first's
    reported = {}
    for stdout, _ in outputs:
        for line in stdout.splitlines()[1:]:
            fold, base, shots = map(int, line.split()[:3])
            reported[fold] = (base, shots)
    assert reported == {int(k): (v["base_fold"], v["shots"]) for k, v in table.items()}
    again = run_cli("nnssl_fewshot", "124", "--shots", "5", "1")  # adds and renumbers nothing
    assert "added" not in again.stdout
    assert json.loads((dataset / SPLITS_FILENAME).read_text()) == splits
