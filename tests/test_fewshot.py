"""Issue 6 few-shot folds: nested seeded subsets appended to nnU-Net's splits_final.json, nothing else touched;
issue 14: the subsets cover the labels (class locations of nnU-Net's preprocessed cases)."""
import itertools
import json
import logging
import pickle
import shutil

import pytest
import torch

from conftest import run_cli
from nnssl.errors import NnsslError
from nnssl.fewshot import FEWSHOT_FILENAME, SPLITS_FILENAME, add_fewshot_folds, fewshot_cases, plan_fewshot_folds
from nnssl.fewshot_selection import hash_order

CASES = [f"case_{i:02d}" for i in range(20)]


def write_preprocessed(folder, labels_of_case: dict[str, set[int]], num_labels: int = 4) -> None:
    """What nnU-Net's preprocessing leaves that few-shot selection reads: a plans file naming the data folder
    and per case a .pkl whose class_locations hold voxels (rows of coordinates) for the labels present."""
    data = folder / "nnUNetPlans_3d_fullres"
    data.mkdir(parents=True)
    (folder / "nnUNetPlans.json").write_text(json.dumps(
        {"configurations": {"3d_fullres": {"data_identifier": data.name}}}))
    (folder / "dataset.json").write_text(json.dumps(
        {"labels": {"background": 0, **{f"organ{k}": k for k in range(1, num_labels + 1)}}}))
    for case, present in labels_of_case.items():
        locations = {k: [[0, 1, 2, 3]] * 5 if k in present else [] for k in range(1, num_labels + 1)}
        (data / f"{case}.pkl").write_bytes(pickle.dumps({"class_locations": locations}))


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """Dataset123_Toy with a hand-made 5-fold split of 20 cases (fold k validates on every fifth case), every
    case holding labels 1 and 2."""
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    folder = tmp_path / "Dataset123_Toy"
    folder.mkdir()
    splits = [{"train": [c for i, c in enumerate(CASES) if i % 5 != k], "val": CASES[k::5]} for k in range(5)]
    (folder / SPLITS_FILENAME).write_text(json.dumps(splits, indent=4))
    write_preprocessed(folder, {case: {1, 2} for case in CASES})
    return folder


def read(folder, name=SPLITS_FILENAME):
    return json.loads((folder / name).read_text(encoding="utf-8"))


def test_fewshot_folds_are_nested_and_validate_like_their_base_fold(toy):
    before = read(toy)
    folds = add_fewshot_folds(123, shots=[1, 5, 10], seed=0)
    splits = read(toy)
    assert splits[:5] == before and len(splits) == 20
    # ids: for each shot count in the order given, for each base fold
    assert [(f.fold, f.base_fold, f.shots) for f in folds] == \
        [(5 + 5 * s + b, b, n) for s, n in enumerate([1, 5, 10]) for b in range(5)]
    assert all(f.added and f.num_val == 4 for f in folds)
    for base in range(5):
        one, five, ten = (set(splits[5 + 5 * s + base]["train"]) for s in range(3))
        assert len(one) == 1 and len(five) == 5 and len(ten) == 10
        assert one < five < ten < set(before[base]["train"])
        assert all(splits[5 + 5 * s + base]["val"] == before[base]["val"] for s in range(3))
    assert read(toy, FEWSHOT_FILENAME) == {"version": 2, "folds": {
        str(f.fold): {"base_fold": f.base_fold, "shots": f.shots, "seed": 0, "uncovered_labels": []} for f in folds}}


def test_selection_depends_on_seed_only():
    train = CASES[:16]
    labels = {case: frozenset({1, 3} if i % 4 else {2}) for i, case in enumerate(train)}
    five = fewshot_cases(train, 5, base_fold=0, seed=0, labels=labels)
    assert five == fewshot_cases(train[::-1], 5, base_fold=0, seed=0, labels=labels)
    assert five != fewshot_cases(train, 5, base_fold=0, seed=1, labels=labels)
    assert fewshot_cases(train, 16, base_fold=0, seed=3, labels=labels) == sorted(train)


# Ten cases; labels 1 and 2 everywhere, 3 in cases 2 and 7 only, 4 in cases 4 and 9 only (2 of 10 each)
RARE = {f"rare_{i}": {1, 2} | ({3} if i in (2, 7) else set()) | ({4} if i in (4, 9) else set()) for i in range(10)}


def coverable(train: list[str], shots: int) -> set[int]:
    """The most labels any ``shots`` training cases hold together (brute force over all subsets)."""
    return max((set().union(*(RARE[c] for c in subset)) for subset in itertools.combinations(train, shots)), key=len)


def test_rare_labels_are_covered_where_two_cases_can_hold_them(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    folder = tmp_path / "Dataset124_Rare"
    folder.mkdir()
    cases = sorted(RARE)
    splits = [{"train": [c for i, c in enumerate(cases) if i % 5 != k], "val": cases[k::5]} for k in range(5)]
    (folder / SPLITS_FILENAME).write_text(json.dumps(splits))
    write_preprocessed(folder, RARE)
    with caplog.at_level(logging.WARNING):
        folds = add_fewshot_folds(124, shots=[1, 2], seed=0)
    written, recorded = read(folder), read(folder, FEWSHOT_FILENAME)["folds"]
    hash_misses = 0
    for fold in (f for f in folds if f.shots == 2):
        train = splits[fold.base_fold]["train"]
        chosen = set().union(*(RARE[c] for c in written[fold.fold]["train"]))
        assert chosen == coverable(train, 2) == set().union(*(RARE[c] for c in train))
        assert recorded[str(fold.fold)]["uncovered_labels"] == []
        old = set().union(*(RARE[c] for c in sorted(hash_order(train, fold.base_fold, 0)[:2])))
        hash_misses += old != chosen
    assert hash_misses >= 3  # the label-blind order of version 1 misses a rare label in most folds
    # one case cannot hold both rare labels: the 1-shot folds record and warn about the one left out
    for fold in (f for f in folds if f.shots == 1):
        present = set().union(*(RARE[c] for c in splits[fold.base_fold]["train"]))
        missing = sorted(present - RARE[written[fold.fold]["train"][0]])
        assert len(missing) == len(present & {3, 4}) - 1 and fold.uncovered_labels == missing
        assert recorded[str(fold.fold)]["uncovered_labels"] == missing
        warned = f"fold {fold.fold} (1-shot from fold {fold.base_fold}) cannot hold every label" in caplog.text
        assert warned == bool(missing)
    assert "organ3 (in 2 of 8 cases)" in caplog.text or "organ4 (in 2 of 8 cases)" in caplog.text


def test_old_label_blind_folds_are_refused_not_redrawn(tmp_path, monkeypatch):
    """A version-1 fewshot.json whose folds differ from what label-covering selection draws is an error."""
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    folder = tmp_path / "Dataset124_Rare"
    folder.mkdir()
    cases = sorted(RARE)
    splits = [{"train": [c for i, c in enumerate(cases) if i % 5 != k], "val": cases[k::5]} for k in range(5)]
    splits += [{"train": sorted(hash_order(splits[b]["train"], b, 0)[:2]), "val": splits[b]["val"]} for b in range(5)]
    (folder / SPLITS_FILENAME).write_text(json.dumps(splits))
    (folder / FEWSHOT_FILENAME).write_text(json.dumps({"version": 1, "folds": {
        str(5 + b): {"base_fold": b, "shots": 2, "seed": 0} for b in range(5)}}))
    write_preprocessed(folder, RARE)
    def files():  # the lock file the call takes is no change of the few-shot files
        return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.endswith(".lock")}

    before = files()
    with pytest.raises(NnsslError, match=r"drawn by an older nnssl \(fewshot.json version 1: cases in hash order.*"
                                         r"delete fewshot.json, keep only the first 5 folds"):
        add_fewshot_folds(124, shots=[2], seed=0)
    assert files() == before


def test_running_again_changes_nothing_and_new_shots_are_appended(toy):
    add_fewshot_folds(123, shots=[1, 5], seed=0)
    files = {name: (toy / name).read_bytes() for name in (SPLITS_FILENAME, FEWSHOT_FILENAME)}
    again = add_fewshot_folds("Dataset123_Toy", shots=[5, 1], seed=0)
    assert not any(f.added for f in again) and len(again) == 10
    assert {name: (toy / name).read_bytes() for name in files} == files
    more = add_fewshot_folds(123, shots=[5, 2], folds=[3], seed=7)
    assert [(f.fold, f.base_fold, f.shots, f.seed, f.added) for f in more] == [(15, 3, 5, 7, True), (16, 3, 2, 7, True)]
    splits = read(toy)
    assert json.loads(files[SPLITS_FILENAME]) == splits[:15]
    assert set(splits[16]["train"]) < set(splits[15]["train"])


def test_interrupted_call_is_completed_by_the_next(toy):
    add_fewshot_folds(123, shots=[1, 2], seed=0)
    complete = read(toy)
    (toy / SPLITS_FILENAME).write_text(json.dumps(complete[:5]))  # fewshot.json was written, the splits not
    add_fewshot_folds(123, shots=[1, 2], seed=0)
    assert read(toy) == complete


def test_folds_need_nnunets_class_locations(toy):
    shutil.rmtree(toy / "nnUNetPlans_3d_fullres")
    with pytest.raises(NnsslError, match=r"no preprocessed folder holds all 20 training cases of Dataset123_Toy.*"
                                         r"Run: nnUNetv2_plan_and_preprocess -d Dataset123_Toy"):
        add_fewshot_folds(123, shots=[1], seed=0)


@pytest.mark.parametrize("options, message", [
    ({"shots": [1, 17]}, r"--shots 17 is more than the training set of fold\(s\) \[0, 1, 2, 3, 4\].*"
                         r"fold 0: 16 cases.*Use at most 16 shots"),
    ({"shots": [0]}, r"--shots needs positive whole numbers.*got \[0\]"),
    ({"shots": [1], "folds": [5]}, r"--folds 5: fold 5 is itself a few-shot fold"),
    ({"shots": [1], "folds": [12]}, r"--folds 12: .* has folds 0-9; choose base folds among the many-shot folds "
                                    r"\[0, 1, 2, 3, 4\]"),
    ({"shots": [1], "seed": -1}, r"--seed must be 0 or positive; got -1"),
])
def test_bad_requests_are_refused_and_change_nothing(toy, options, message):
    add_fewshot_folds(123, shots=[3], seed=0)
    files = {p.name: p.read_bytes() for p in toy.iterdir() if p.is_file()}
    with pytest.raises(NnsslError, match=message):
        add_fewshot_folds(123, **options)
    assert {p.name: p.read_bytes() for p in toy.iterdir() if p.is_file()} == files


def test_edited_or_damaged_files_are_reported(toy):
    add_fewshot_folds(123, shots=[3], seed=0)
    splits = read(toy)
    splits[6]["train"] = splits[6]["train"][:2]
    (toy / SPLITS_FILENAME).write_text(json.dumps(splits))
    with pytest.raises(NnsslError, match=r"Fold 6 of .* is not the 3-shot fold of base fold 1 \(seed 0\)"):
        add_fewshot_folds(123, shots=[3], seed=0)
    (toy / SPLITS_FILENAME).write_text("[{")
    with pytest.raises(NnsslError, match=r"splits_final.json is damaged"):
        add_fewshot_folds(123, shots=[3], seed=0)
    (toy / SPLITS_FILENAME).write_text(json.dumps(splits[:5]))
    (toy / FEWSHOT_FILENAME).write_text(json.dumps({"version": 1, "folds": {"5": {"base_fold": 0}}}))
    with pytest.raises(NnsslError, match=r"fewshot.json is not a few-shot table"):
        add_fewshot_folds(123, shots=[3], seed=0)
    with pytest.raises(NnsslError, match=r"No dataset '124' in \$nnUNet_preprocessed"):
        add_fewshot_folds(124, shots=[3], seed=0)


def test_plan_keeps_existing_ids():
    existing = {"5": {"base_fold": 2, "shots": 1, "seed": 0}}
    plan = plan_fewshot_folds([1, 5], [2, 3], seed=0, existing=existing, first_free_fold=6)
    assert plan == {"5": {"base_fold": 2, "shots": 1, "seed": 0}, "6": {"base_fold": 3, "shots": 1, "seed": 0},
                    "7": {"base_fold": 2, "shots": 5, "seed": 0}, "8": {"base_fold": 3, "shots": 5, "seed": 0}}


def test_console_script_makes_nnunets_split_and_the_trainer_uses_the_fold(ct_task, tmp_path, monkeypatch):
    """Real nnssl_fewshot on a copy of the CT task; nnU-Net's own do_split is the reference for folds 0-4."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for root in (ours, theirs):
        shutil.copytree(ct_task.preprocessed, root / ct_task.preprocessed.name,
                        ignore=shutil.ignore_patterns(SPLITS_FILENAME, FEWSHOT_FILENAME))
    result = run_cli("nnssl_fewshot", ct_task.dataset_id, "--shots", "1", "5", "--folds", "0", "2",
                     env={"nnUNet_preprocessed": str(ours)})
    assert result.stdout.splitlines()[1:] == [
        "    5     0      1     0      1     2  added", "    6     2      1     0      1     2  added",
        "    7     0      5     0      5     2  added", "    8     2      5     0      5     2  added"]
    too_many = run_cli("nnssl_fewshot", ct_task.dataset_id, "--shots", "7", env={"nnUNet_preprocessed": str(ours)},
                       check=False)
    assert too_many.returncode == 2 and "nnssl_fewshot: error: --shots 7 is more than" in too_many.stderr
    splits = read(ours / ct_task.dataset)

    from nnunetv2.run.run_training import get_trainer_from_args
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    for root, fold in ((theirs, 0), (ours, 7)):
        monkeypatch.setenv("nnUNet_preprocessed", str(root))
        trainer = get_trainer_from_args(ct_task.dataset, "3d_fullres", fold, "SwinUNETR_Scratch_Trainer",
                                        device=torch.device("cpu"))
        train, val = trainer.do_split()
        assert (sorted(train), sorted(val)) == (sorted(splits[fold]["train"]), sorted(splits[fold]["val"]))
    assert read(theirs / ct_task.dataset) == splits[:5]  # written by nnU-Net's do_split: the same folds 0-4
    log = next((tmp_path / "results").rglob("fold_7/training_log_*.txt")).read_text(encoding="utf-8")
    assert "fold 7 is the 5-shot fold drawn from fold 0 (seed 0" in log
