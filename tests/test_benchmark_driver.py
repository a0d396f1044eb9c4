"""nnssl_benchmark: the full study's job graph (dry run), resume decisions on a fake results tree laid out as
nnU-Net and nnssl write it, and the executor on trivial commands (true/false/sh)."""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

from nnssl.benchmark import allocation, driver
from nnssl.benchmark.allocation import local_share, share_env
from nnssl.benchmark.driver import check_fewshot, cpu_slots, gpu_slots, run_benchmark
from nnssl.benchmark.executor import ALREADY_DONE, FAILED, OK, SKIPPED, format_summary, run_jobs
from nnssl.benchmark.jobs import Job, Settings, plan_study, select
from nnssl.benchmark.results_state import DONE, NEW, RESUME, DiskState
from nnssl.benchmark.study import load_study
from nnssl.errors import NnsslError

from conftest import run_cli

ROOTS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnssl_results")
METHOD_TRAINERS = {"simclr": "SimCLR", "mocov3": "MoCoV3", "byol": "BYOL", "rotnet": "RotNet", "swinssl": "SwinSSL",
                   "simmim": "SimMIM", "dino": "DINO", "ibot": "iBOT", "smit": "SMIT"}


@pytest.fixture
def no_roots(monkeypatch):
    for name in ROOTS:
        monkeypatch.delenv(name, raising=False)


def _by_kind(jobs: list[Job]) -> dict[str, list[Job]]:
    return {kind: [j for j in jobs if j.kind == kind] for kind in dict.fromkeys(j.kind for j in jobs)}


# -- the plan file ----------------------------------------------------------------------------------------------
def test_plan_names_the_nine_tasks_methods_and_real_trainers():
    from nnssl_trainers.swinunetr import METHOD_TRAINERS as TRAINERS, SwinUNETR_Scratch_Trainer

    study = load_study()
    assert {t.key: t.dataset_id for t in study.tasks.values()} == {
        "Liver": 3, "Lung": 6, "Pancreas": 7, "BTCV": 511, "AMOS-CT": 512, "HaN-Seg": 513, "AMOS-MRI": 514,
        "CHAOS": 515, "BrainTumour": 1}
    assert [t.modality for t in study.tasks.values()].count("MRI") == 3
    assert {m: s.trainer for m, s in study.methods.items()} == {
        **{m: f"SwinUNETR_{name}_Trainer" for m, name in METHOD_TRAINERS.items()},
        "scratch": "SwinUNETR_Scratch_Trainer"}
    assert {m: cls.__name__ for m, cls in TRAINERS.items()} == {m: study.methods[m].trainer for m in TRAINERS}
    assert SwinUNETR_Scratch_Trainer.__name__ == study.methods["scratch"].trainer
    assert (study.corpus_id, study.corpus_name, study.backbone) == (501, "CTcorpus", "paper")
    assert len(study.tasks["HaN-Seg"].labels) == 31 and len(study.tasks["AMOS-MRI"].labels) == 14


# -- dry run of the whole study -----------------------------------------------------------------------------------
def test_dry_run_lists_every_command_of_the_full_study(no_roots):
    outcome = run_benchmark(dry_run=True)
    jobs = _by_kind(outcome.plan.jobs)
    study = load_study()
    assert {k: len(v) for k, v in jobs.items()} == {
        "plan": 9, "pretrain": 9, "probe": 10, "fewshot": 9, "finetune": 9 * 11 * (3 + 1) * 5, "cka": 9 * 10 * 3,
        "report": 1}
    assert all(j.state == NEW for j in outcome.plan.jobs)
    # every task x trainer x fold (5 many-shot + 3 sizes x 5 few-shot folds) exactly once, as the real command
    runs = {(int(j.command[1]), int(j.command[3]), j.command[5]) for j in jobs["finetune"]}
    trainers = [m.trainer for m in study.methods.values()] + ["nnUNetTrainer"]  # the plan's nnU-Net baseline
    assert runs == set(itertools.product([t.dataset_id for t in study.tasks.values()], range(20), trainers))
    baseline = next(j for j in jobs["finetune"] if j.command[5] == "nnUNetTrainer" and j.command[3] == "7")
    assert baseline.shell() == "nnUNetv2_train 3 3d_fullres 7 -tr nnUNetTrainer -p nnsslPlans"  # the same data
    assert set(baseline.deps) == {"plan/Dataset003_Liver", "fewshot/Dataset003_Liver/seed0"}
    smit = next(j for j in jobs["finetune"] if j.command[:6] == ("nnUNetv2_train", "3", "3d_fullres", "7", "-tr",
                                                                   "SwinUNETR_SMIT_Trainer"))
    assert smit.shell() == "nnssl_backbone=paper nnssl_seed=0 nnssl_run=paper_d501 nnUNetv2_train 3 3d_fullres 7 -tr " \
                           "SwinUNETR_SMIT_Trainer -p nnsslPlans"
    # the aligned plans in every fine-tuning command, made by nnssl_align_plans after the corpus
    assert all(j.command[-2:] == ("-p", "nnsslPlans") for j in jobs["finetune"])
    assert set(smit.deps) == {"plan/Dataset003_Liver", "fewshot/Dataset003_Liver/seed0", "pretrain/smit"}
    budget = {m: ("--batch-size 8 --steps-per-epoch 100" if m == "smit" else "--batch-size 8 --steps-per-epoch 500",
                  500 if m == "smit" else 100) for m in METHOD_TRAINERS}
    assert [j.shell() for j in jobs["pretrain"]] == [
        f"nnssl_pretrain -m {m} -d 501 --backbone paper --run paper_d501 --epochs {budget[m][1]} {budget[m][0]} "
        f"--patch-size 128 128 128" for m in METHOD_TRAINERS]
    # one budget for every method, printed: the same optimizer steps and volumes seen
    assert {(b.steps, b.volumes) for b in outcome.plan.budgets.values()} == {(50000, 400000)}
    assert outcome.text.count("50000 optimizer steps x 8 volumes = 400000 volumes seen") == 9
    assert jobs["plan"][3].shell() == "nnssl_align_plans -d 511 --corpus 501 -pl nnsslPlans"
    assert jobs["fewshot"][0].shell() == "nnssl_fewshot 3 --shots 1 5 10 --folds 0 1 2 3 4 --seed 0"
    cka = jobs["cka"][0]  # 1-shot fold 5 (drawn from fold 0) vs many-shot fold 0 of the same trainer
    assert re.fullmatch(r'nnssl_cka "\$nnUNet_results/Dataset003_Liver/SwinUNETR_SimCLR_Trainer__nnsslPlans__'
                        r'3d_fullres:5" "\$nnUNet_results/Dataset003_Liver/SwinUNETR_SimCLR_Trainer__nnsslPlans__'
                        r'3d_fullres:0" -o "\$nnssl_results/benchmark/cka/Dataset003_Liver/SwinUNETR_SimCLR_Trainer/'
                        r'1shot_fold0_seed0"', cka.shell())
    # every method's study encoder is probed on the plan's probe task before fine-tuning, beside one probe of
    # random (scratch's starting point) that all of them share instead of probing it again each
    random_probe = '"$nnssl_results/benchmark/probe/Dataset511_BTCV/random'
    assert jobs["probe"][0].shell() == f'nnssl_probe random -d 511 -o {random_probe}" -p nnsslPlans --backbone paper'
    assert [j.command[1] for j in jobs["probe"]].count("random") == 1
    assert jobs["probe"][1].shell().startswith("nnssl_run=paper_d501 nnssl_probe simclr -d 511 -o ")
    assert jobs["probe"][1].shell().endswith(f"--random-from {random_probe}/probe.json\"")
    assert set(jobs["probe"][1].deps) == {"plan/Dataset511_BTCV", "pretrain/simclr", "probe/Dataset511_BTCV/random"}
    assert set(smit.after) == {j.id for j in jobs["probe"]}
    report = jobs["report"][0]
    assert report.command[:10] == ("nnssl_report", "3", "6", "7", "511", "512", "513", "514", "515", "1")
    assert report.command[-2:] == ("--probe", "$nnssl_results/benchmark/probe")
    assert set(report.after) == {j.id for j in jobs["finetune"] + jobs["cka"] + jobs["probe"]}
    assert len(outcome.plan.missing) == 10  # the corpus and the nine raw datasets, each with the command to make it
    assert "nnssl_convert AMOS-MRI <download folder>" in outcome.text
    assert outcome.text.count("nnUNetv2_train ") == 1980


def test_cli_dry_run_of_a_selection(no_roots):
    result = run_cli("nnssl_benchmark", "--dry-run", "--tasks", "CHAOS", "--methods", "dino", "scratch",
                     "--shots", "5", "all", "--folds", "1")
    trains = [line for line in result.stdout.splitlines() if "nnUNetv2_train" in line]
    assert trains == [
        "[new] nnssl_backbone=paper nnssl_seed=0 nnssl_run=paper_d501 nnUNetv2_train 515 3d_fullres 1 -tr "
        "SwinUNETR_DINO_Trainer -p nnsslPlans",
        "[new] nnssl_backbone=paper nnssl_seed=0 nnssl_run=paper_d501 nnUNetv2_train 515 3d_fullres 6 -tr "
        "SwinUNETR_DINO_Trainer -p nnsslPlans",
        "[new] nnssl_backbone=paper nnssl_seed=0 nnUNetv2_train 515 3d_fullres 1 -tr SwinUNETR_Scratch_Trainer -p nnsslPlans",
        "[new] nnssl_backbone=paper nnssl_seed=0 nnUNetv2_train 515 3d_fullres 6 -tr SwinUNETR_Scratch_Trainer -p nnsslPlans"]
    assert "- dino: 50000 optimizer steps x 8 volumes = 400000 volumes seen" in result.stdout


def test_cli_error_has_no_traceback(no_roots, capsys):
    from nnssl.cli.benchmark import main

    with pytest.raises(SystemExit) as stop:
        main(["--dry-run", "--shots", "20"])
    assert stop.value.code == 2 and "nnssl_benchmark: error: --shots 20" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, message", [
    ({"shots": ["20"]}, r"--shots 20: the selected tasks have few-shot sizes \[1, 5, 10\]"),
    ({"methods": ["dinno"]}, r"Unknown method 'dinno'.*Did you mean 'dino'"),
    ({"tasks": ["CHAOSS"]}, r"Unknown task 'CHAOSS'.*Did you mean 'CHAOS'"),
    ({"folds": [5]}, r"--folds \[5\]: the study's many-shot folds are \[0, 1, 2, 3, 4\]"),
])
def test_bad_selection_is_named(kwargs, message):
    with pytest.raises(NnsslError, match=message):
        select(load_study(), **kwargs)


def test_run_stops_before_anything_when_inputs_are_missing(tmp_path, monkeypatch):
    for name in ROOTS:
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    with pytest.raises(NnsslError, match=r"(?s)missing.*nnssl_convert BTCV <download folder>"):
        run_benchmark(tasks=["BTCV"], methods=["scratch"])


TOY_PLAN = {
    "version": 1, "backbone": "tiny", "configuration": "3d_fullres", "plans_identifier": "nnUNetPlans",
    "folds": [0, 1, 2, 3, 4], "seeds": [0], "pretrain_args": ["--epochs", "2"],
    "finetune_env": {"nnssl_num_epochs": "3"},
    "corpus": {"dataset_id": 980, "name": "ToyCorpus", "run": "tiny_d980"},
    "methods": {"smit": {"trainer": "SwinUNETR_SMIT_Trainer"},
                "scratch": {"trainer": "SwinUNETR_Scratch_Trainer", "pretrained": False}},
    "tasks": {"ToyCT": {"dataset_id": 981, "dataset_name": "ToyCT", "modality": "CT", "channel_names": {"0": "CT"},
                        "labels": {"background": 0, "liver": 1}, "few_shot": [2]}},
    "cka": {"base_folds": [0]},
}


def test_another_plan_runs_a_toy_study_on_the_cpu(tmp_path, no_roots):
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(TOY_PLAN))
    outcome = run_benchmark(plan=path, device="cpu", folds=[0], output=tmp_path / "out", dry_run=True)
    shells = [j.shell() for j in outcome.plan.jobs]
    assert "nnssl_pretrain -m smit -d 980 --backbone tiny --run tiny_d980 --epochs 2 --device cpu" in shells
    assert ("nnssl_backbone=tiny nnssl_seed=0 nnssl_num_epochs=3 nnssl_run=tiny_d980 nnUNetv2_train 981 3d_fullres 5 -tr "
            "SwinUNETR_SMIT_Trainer -device cpu") in shells
    assert [j.command[-4:-2] for j in outcome.plan.jobs if j.kind == "cka"] == [("-device", "cpu")] * 2
    path.write_text(json.dumps({k: v for k, v in TOY_PLAN.items() if k != "tasks"}))
    with pytest.raises(NnsslError, match=r"toy\.json is malformed \(KeyError: 'tasks'\)"):
        run_benchmark(plan=path, dry_run=True)


def test_imported_encoders_are_methods_with_their_own_plans_variant(tmp_path, no_roots):
    imported = {"tang": {"trainer": "SwinUNETR_Imported_Trainer", "encoder_file": "encoders/tang.pth"},
                "voco_b": {"trainer": "SwinUNETR_Imported_Trainer", "encoder_file": "encoders/voco_b.pth"}}
    path = tmp_path / "toy.json"
    path.write_text(json.dumps({**TOY_PLAN, "methods": {**TOY_PLAN["methods"], **imported}}))
    outcome = run_benchmark(plan=path, device="cpu", folds=[0], output=tmp_path / "out", dry_run=True)
    jobs = {j.id: j for j in outcome.plan.jobs}
    assert [j for j in jobs if j.startswith("pretrain/")] == ["pretrain/smit"]  # imported encoders are not pretrained
    tang = tmp_path / "encoders" / "tang.pth"  # relative to the plan file
    assert jobs["plan/Dataset981_ToyCT/nnUNetPlans_tang"].shell() == (
        f"nnssl_align_plans -d 981 -pl nnUNetPlans --variant tang --knob nnssl_encoder_file={tang}")
    finetune = jobs["finetune/Dataset981_ToyCT/SwinUNETR_Imported_Trainer__nnUNetPlans_tang__3d_fullres/fold_0"]
    assert finetune.shell() == ("nnssl_backbone=tiny nnssl_seed=0 nnssl_num_epochs=3 nnUNetv2_train 981 3d_fullres 0 "
                                "-tr SwinUNETR_Imported_Trainer -p nnUNetPlans_tang -device cpu")
    assert "plan/Dataset981_ToyCT/nnUNetPlans_tang" in finetune.deps
    cka = jobs["cka/Dataset981_ToyCT/SwinUNETR_Imported_Trainer__nnUNetPlans_voco_b/2shot_fold0_seed0"]
    assert "SwinUNETR_Imported_Trainer__nnUNetPlans_voco_b__3d_fullres:5" in cka.shell()
    assert any(f"method tang ({tang}) does not exist" in m and "nnssl_import" in m for m in outcome.plan.missing)
    path.write_text(json.dumps({**TOY_PLAN, "methods": {"tang": {**imported["tang"], "trainer": "SwinUNETR_SMIT_Trainer"}}}))
    with pytest.raises(NnsslError, match="only SwinUNETR_Imported_Trainer reads"):
        run_benchmark(plan=path, dry_run=True)


def test_seeds_repeat_every_many_shot_fold_in_seed_variants(tmp_path, no_roots):
    imported = {"tang": {"trainer": "SwinUNETR_Imported_Trainer", "encoder_file": "encoders/tang.pth"}}
    path = tmp_path / "toy.json"
    path.write_text(json.dumps({**TOY_PLAN, "plans_identifier": "nnsslPlans", "seeds": [0, 1],
                                "methods": {**TOY_PLAN["methods"], **imported},
                                "baselines": {"nnUNet": {"trainer": "nnUNetTrainer"}}}))
    outcome = run_benchmark(plan=path, device="cpu", folds=[0], shots=["all"], output=tmp_path / "out", dry_run=True)
    jobs = {j.id: j for j in outcome.plan.jobs}
    finetune = sorted(j.shell() for j in jobs.values() if j.kind == "finetune")
    train = "nnUNetv2_train 981 3d_fullres 0 -tr"
    assert finetune == sorted([  # the first seed in the study's model folders, seed 1 in seed variants
        f"nnssl_backbone=tiny nnssl_seed=0 nnssl_num_epochs=3 nnssl_run=tiny_d980 {train} SwinUNETR_SMIT_Trainer "
        f"-p nnsslPlans -device cpu",
        f"nnssl_backbone=tiny nnssl_seed=1 nnssl_num_epochs=3 nnssl_run=tiny_d980 {train} SwinUNETR_SMIT_Trainer "
        f"-p nnsslPlans_seed1 -device cpu",
        *(f"nnssl_backbone=tiny nnssl_seed={s} nnssl_num_epochs=3 {train} {trainer} -p {plans} -device cpu"
          for trainer, plans_of in (("SwinUNETR_Scratch_Trainer", "nnsslPlans"),
                                    ("SwinUNETR_Imported_Trainer", "nnsslPlans_tang"))
          for s, plans in ((0, plans_of), (1, f"{plans_of}_seed1"))),
        f"nnssl_num_epochs=3 {train} nnUNetTrainer -p nnsslPlans -device cpu",
        f"nnssl_num_epochs=3 {train} nnUNetTrainer -p nnsslPlans_seed1 -device cpu"])
    tang = tmp_path / "encoders" / "tang.pth"
    variants = {i: j.shell() for i, j in jobs.items() if i.startswith("plan/Dataset981_ToyCT/")}
    assert variants == {  # one variant job per plans variant, shared by every trainer fine-tuned on it
        "plan/Dataset981_ToyCT/nnsslPlans_tang": f"nnssl_align_plans -d 981 -pl nnsslPlans --variant tang "
                                                 f"--knob nnssl_encoder_file={tang}",
        "plan/Dataset981_ToyCT/nnsslPlans_seed1": "nnssl_align_plans -d 981 -pl nnsslPlans --variant seed1 "
                                                  "--knob nnssl_seed=1",
        "plan/Dataset981_ToyCT/nnsslPlans_tang_seed1": f"nnssl_align_plans -d 981 -pl nnsslPlans --variant "
                                                       f"tang_seed1 --knob nnssl_encoder_file={tang} "
                                                       f"--knob nnssl_seed=1"}
    repeat = jobs["finetune/Dataset981_ToyCT/nnUNetTrainer__nnsslPlans_seed1__3d_fullres/fold_0"]
    assert "plan/Dataset981_ToyCT/nnsslPlans_seed1" in repeat.deps


# -- resume decisions on a fake results tree ----------------------------------------------------------------------
def _json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def _preprocessed(root: Path, dataset: str, cases: int, plans: str = "nnsslPlans") -> None:
    configuration = {"data_identifier": f"{plans}_3d_fullres"}
    _json(root / dataset / f"{plans}.json", {"configurations": {"3d_fullres": configuration}})
    _json(root / dataset / "dataset.json", {"numTraining": cases})
    for i in range(cases):
        _touch(root / dataset / f"{plans}_3d_fullres" / f"case_{i}.pkl")


@pytest.fixture
def results_tree(tmp_path) -> DiskState:
    """CHAOS planned (fewshot.json from an earlier '--shots 5' run: folds 5-9), BTCV converted but only half
    preprocessed; SMIT
    pretrained, DINO interrupted; SMIT fold 0 finished, fold 1 interrupted, fold 5 trained but not validated."""
    raw, pre, res, ssl = (tmp_path / n for n in ROOTS)
    for dataset in ("Dataset515_CHAOS", "Dataset511_BTCV"):
        _json(raw / dataset / "dataset.json", {"numTraining": 1})
        _touch(raw / dataset / "labelsTr" / "case_001.nii.gz")
    _preprocessed(pre, "Dataset515_CHAOS", 2)
    _preprocessed(pre, "Dataset501_CTcorpus", 3, plans="nnUNetPlans")
    _preprocessed(pre, "Dataset511_BTCV", 2)
    (pre / "Dataset511_BTCV" / "nnsslPlans_3d_fullres" / "case_1.pkl").unlink()
    _json(pre / "Dataset515_CHAOS" / "splits_final.json", [{"train": [], "val": []}] * 10)
    _json(pre / "Dataset515_CHAOS" / "fewshot.json", {"version": 1, "folds": {
        str(5 + b): {"base_fold": b, "shots": 5, "seed": 0} for b in range(5)}})
    _touch(ssl / "smit" / "paper_d501" / "encoder_final.pth")
    _json(ssl / "dino" / "paper_d501" / "config.json", {})
    smit = res / "Dataset515_CHAOS" / "SwinUNETR_SMIT_Trainer__nnsslPlans__3d_fullres"
    _touch(smit / "fold_0" / "checkpoint_final.pth")
    _json(smit / "fold_0" / "validation" / "summary.json", {})
    _touch(smit / "fold_1" / "checkpoint_latest.pth")
    _touch(smit / "fold_5" / "checkpoint_final.pth")
    cka = tmp_path / "out" / "cka" / "Dataset515_CHAOS" / "SwinUNETR_SMIT_Trainer"
    _json(cka / "5shot_fold0_seed0" / "cka.json", {})
    return DiskState(raw, pre, res, ssl, study=load_study())


def test_resume_decisions_follow_the_files_on_disk(results_tree, tmp_path):
    study = results_tree.study
    selection = select(study, tasks=["CHAOS", "BTCV"], methods=["smit", "dino", "byol", "scratch"], folds=[0, 1])
    plan = plan_study(study, selection, Settings(output=tmp_path / "out"), results_tree)
    jobs = {j.id: j for j in plan.jobs}
    assert plan.missing == []
    assert jobs["plan/Dataset515_CHAOS"].state == DONE and jobs["plan/Dataset511_BTCV"].state == NEW
    assert not any(j.kind == "prepare" or j.id == "plan/Dataset501_CTcorpus" for j in plan.jobs)  # corpus is ready
    assert [(jobs[f"pretrain/{m}"].state, jobs[f"pretrain/{m}"].command[-1]) for m in ("smit", "dino", "byol")] == [
        (DONE, "128"), (RESUME, "--resume"), (NEW, "128")]
    # 5-shot keeps folds 5-9 from fewshot.json; 1- and 10-shot folds are appended after the 10 existing folds
    chaos_fewshot = jobs["fewshot/Dataset515_CHAOS/seed0"]
    assert chaos_fewshot.state == NEW
    assert {(base, n): fold for fold, base, n, _ in chaos_fewshot.expects} == {
        **{(b, 1): 10 + b for b in range(5)}, **{(b, 5): 5 + b for b in range(5)},
        **{(b, 10): 15 + b for b in range(5)}}
    smit = "finetune/Dataset515_CHAOS/SwinUNETR_SMIT_Trainer/fold_"
    assert jobs[smit + "0"].state == DONE
    assert jobs[smit + "1"].state == RESUME and jobs[smit + "1"].command[-1] == "--c"
    assert jobs[smit + "5"].state == RESUME and jobs[smit + "5"].command[-1] == "--c"  # validation still to do
    assert jobs[smit + "11"].state == NEW and "--c" not in jobs[smit + "11"].command
    assert {f for f in (int(i.rsplit("_", 1)[1]) for i in jobs if i.startswith(smit))} == {0, 1, 10, 11, 5, 6, 15, 16}
    assert jobs["cka/Dataset515_CHAOS/SwinUNETR_SMIT_Trainer/5shot_fold0_seed0"].state == DONE
    assert jobs["cka/Dataset515_CHAOS/SwinUNETR_SMIT_Trainer/1shot_fold0_seed0"].state == NEW


def test_fewshot_job_is_done_when_fewshot_json_has_every_fold(results_tree, tmp_path):
    study = results_tree.study
    plan = plan_study(study, select(study, tasks=["CHAOS"], shots=["5"]), Settings(output=tmp_path), results_tree)
    (fewshot,) = [j for j in plan.jobs if j.kind == "fewshot"]
    assert fewshot.state == DONE
    assert fewshot.shell() == "nnssl_fewshot 515 --shots 5 --folds 0 1 2 3 4 --seed 0"


def test_fewshot_check_compares_fewshot_json_with_the_planned_folds(results_tree):
    command = ("nnssl_fewshot", "515", "--shots", "5")
    job = Job("fewshot/Dataset515_CHAOS/seed0", "fewshot", command, expects=((5, 0, 5, 0), (6, 1, 5, 0)))
    assert check_fewshot(job, results_tree.preprocessed_dir) is None
    fewshot_json = results_tree.preprocessed_dir / "Dataset515_CHAOS" / "fewshot.json"
    written = json.loads(fewshot_json.read_text())  # as nnssl_fewshot writes it now: with notes on each fold
    _json(fewshot_json, {"version": 2, "folds": {k: {**v, "uncovered_labels": [3]} for k, v in written["folds"].items()}})
    assert check_fewshot(job, results_tree.preprocessed_dir) is None
    wrong = Job(job.id, "fewshot", command, expects=((5, 0, 10, 0),))
    assert "does not give fold 5 to 10-shot/base fold 0/seed 0" in check_fewshot(wrong, results_tree.preprocessed_dir)


# -- the executor on trivial commands -----------------------------------------------------------------------------
def test_executor_runs_skips_and_reports(tmp_path):
    marker = tmp_path / "gpu.txt"
    jobs = [
        Job("a", "plan", ("true",)),
        Job("b", "finetune", ("sh", "-c", "echo broken; exit 3"), gpu=True),
        Job("c", "cka", ("true",), deps=("b",), gpu=True),
        Job("d", "finetune", ("sh", "-c", f'echo "$CUDA_VISIBLE_DEVICES $nnssl_run" > {marker}'), deps=("a",),
            env=(("nnssl_run", "paper_d501"),), gpu=True),
        Job("e", "finetune", ("false",), state=DONE, gpu=True),
        Job("f", "report", ("true",), after=("b", "c", "d")),
        Job("g", "pretrain", ("/nonexistent/nnssl_pretrain",), gpu=True),
    ]
    results = {r.job.id: r for r in run_jobs(jobs, tmp_path / "logs", gpu_slots=["7"], poll_seconds=0.01)}
    assert {k: r.status for k, r in results.items()} == {
        "a": OK, "b": FAILED, "c": SKIPPED, "d": OK, "e": ALREADY_DONE, "f": OK, "g": FAILED}
    assert results["b"].returncode == 3 and "broken" in results["b"].log.read_text(encoding="utf-8")
    assert results["c"].message == "dependency b did not succeed"
    assert marker.read_text(encoding="utf-8").split() == ["7", "paper_d501"]
    assert "could not start" in results["g"].message
    summary = format_summary(list(results.values()))
    assert "3 job(s) did not succeed" in summary and str(results["b"].log) in summary
    assert not (tmp_path / "logs" / "e.log").exists()  # done jobs are not run


def test_executor_runs_one_job_per_gpu_at_the_same_time(tmp_path):
    # each job waits (up to 10 s) for the other's marker file: both succeed only if they run concurrently
    def barrier(me: str, other: str) -> tuple[str, ...]:
        script = (f"touch {tmp_path / me}; for i in $(seq 200); do [ -e {tmp_path / other} ] && exit 0; "
                  f"sleep 0.05; done; exit 1")
        return ("sh", "-c", script)

    jobs = [Job("x", "finetune", barrier("x", "y"), gpu=True), Job("y", "finetune", barrier("y", "x"), gpu=True)]
    results = run_jobs(jobs, tmp_path / "logs", gpu_slots=["0", "1"], poll_seconds=0.01)
    assert [r.status for r in results] == [OK, OK]
    assert {r.log.read_text(encoding="utf-8").splitlines()[0].split("CUDA_VISIBLE_DEVICES=")[1][0] for r in results} == {"0", "1"}


def test_executor_check_can_fail_a_job_and_its_dependents(tmp_path):
    jobs = [Job("fewshot/x", "fewshot", ("true",)), Job("t", "finetune", ("true",), deps=("fewshot/x",))]
    results = run_jobs(jobs, tmp_path / "logs", check=lambda job: "folds differ" if job.kind == "fewshot" else None,
                       poll_seconds=0.01)
    assert [(r.status, r.message) for r in results] == [(FAILED, "folds differ"),
                                                        (SKIPPED, "dependency fewshot/x did not succeed")]


def test_run_benchmark_writes_summary(results_tree, tmp_path, monkeypatch):
    for name, root in zip(ROOTS, (results_tree.raw_dir, results_tree.preprocessed_dir, results_tree.results_dir,
                                  results_tree.nnssl_results_dir)):
        monkeypatch.setenv(name, str(root))
    seen = {}

    def fake_run_jobs(jobs, log_dir, gpu_slots, cores_per_job, check):
        seen.update(slots=gpu_slots, log_dir=log_dir)
        return run_jobs([Job(j.id, j.kind, ("true",), j.state, j.deps, j.after) for j in jobs], log_dir,
                        poll_seconds=0.01)

    monkeypatch.setattr(driver, "run_jobs", fake_run_jobs)
    outcome = run_benchmark(tasks=["CHAOS"], methods=["smit"], shots=["5", "all"], folds=[0], gpus=2,
                            output=tmp_path / "out")
    assert outcome.ok and seen == {"slots": ["0", "1"], "log_dir": tmp_path / "out" / "logs"}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text(encoding="utf-8"))
    assert {r["id"]: r["status"] for r in summary}["finetune/Dataset515_CHAOS/SwinUNETR_SMIT_Trainer/fold_0"] == "done"


@pytest.mark.parametrize("visible, count, expected", [
    ("2,3", None, ["2", "3"]), ("2,3", 1, ["2"]), ("", 2, ["0", "1"]),
])
def test_gpu_slots(monkeypatch, visible, count, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert gpu_slots(count) == expected


@pytest.mark.parametrize("visible, count, message", [
    ("2,3", 3, r"--gpus 3, but CUDA_VISIBLE_DEVICES=2,3 names 2"), ("", 0, r"--gpus must be >= 1"),
])
def test_gpu_slots_errors(monkeypatch, visible, count, message):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with pytest.raises(NnsslError, match=message):
        gpu_slots(count)


def test_cpu_jobs_share_the_cores(monkeypatch, tmp_path):
    monkeypatch.setattr(allocation.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    assert cpu_slots(None) == [None] and cpu_slots(2) == [None, None]
    assert [local_share(n) for n in (1, 2, 8)] == [5, 2, 1]
    with pytest.raises(NnsslError, match="--jobs must be >= 1"):
        cpu_slots(0)
    with pytest.raises(NnsslError, match="--jobs is for --device cpu"):
        run_benchmark(jobs=2, device="cuda", dry_run=True)
    # the common environment and the share reach every command, logged; a job's own variables (the plan's) win
    marker = tmp_path / "env.txt"
    echo = f'echo "$OMP_NUM_THREADS $nnUNet_n_proc_DA $nnUNet_def_n_proc $nnssl_run" > {marker}'
    jobs = [Job("t", "finetune", ("sh", "-c", echo), env=(("nnssl_run", "mine"),), gpu=True)]
    run_jobs(jobs, tmp_path / "logs", env={"nnssl_run": "common"}, cores_per_job=3, poll_seconds=0.01)
    assert marker.read_text(encoding="utf-8").split() == ["3", "2", "3", "mine"]
    assert "(OMP_NUM_THREADS=3 nnUNet_n_proc_DA=2 nnUNet_def_n_proc=3)" in (tmp_path / "logs" / "t.log").read_text()
    jobs = [Job("t", "finetune", ("sh", "-c", echo), env=(("nnUNet_n_proc_DA", "0"),), gpu=True)]
    run_jobs(jobs, tmp_path / "logs", cores_per_job=1, poll_seconds=0.01)
    assert marker.read_text(encoding="utf-8").split() == ["1", "0", "1"]
    planning = Job("plan/x", "plan", ("true",))
    assert share_env(planning, 1)["nnUNet_n_proc_DA"] == "1"  # nnU-Net's planner rejects 0
