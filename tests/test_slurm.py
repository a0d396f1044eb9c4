"""nnssl_benchmark --executor slurm against a real Slurm (``.ci/slurm.sh start``: one node, this machine).

Skipped with a one-line reason where no cluster answers; under CI=true a missing cluster fails instead.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from nnssl.benchmark.cluster import load_cluster, minutes, sbatch_options
from nnssl.benchmark.jobs import DONE, Job, StudyPlan
from nnssl.benchmark.slurm import (Submission, dependency, format_submissions, job_statuses, plan_submissions,
                                   submit)
from nnssl.benchmark.slurm_job import outcome_path
from nnssl.errors import NnsslError
from nnssl.io import save_json

from conftest import CORPUS_ID, SCRATCH_MODEL, TINY_PRETRAIN, run_cli

CORPUS = f"Dataset{CORPUS_ID:03d}_CTcorpus"
WAIT_SECONDS = 1500  # bound on every wait for the cluster (its node is shared with every other test run)


def _cluster_missing() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "Slurm is not installed (start a one-node cluster with: .ci/slurm.sh start)"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10).stdout
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 10 s (start the cluster with: .ci/slurm.sh start)"
    if not any(s in states for s in ("idle", "mixed", "allocated")):
        return f"no Slurm node is up (sinfo: {states.strip() or 'nothing'}; start it with: .ci/slurm.sh start)"
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    reason = _cluster_missing()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true needs a Slurm cluster: {reason}")
        pytest.skip(reason)


def _squeue(*ids: str) -> list[dict[str, str]]:
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%j|%T|%r|%E"],
                         capture_output=True, text=True).stdout
    return [dict(zip(("id", "name", "state", "reason", "dependency"), line.split("|"))) for line in out.splitlines()]


def _wait(condition, what: str, seconds: float = WAIT_SECONDS, poll: float = 1.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"gave up after {seconds:.0f} s waiting for {what}")


def _release_requeued(slurm_id: str, time_limit: str | None = None) -> bool:
    """Slurm holds a requeued job for two minutes (BeginTime); start it now so the test stays short, with
    ``time_limit`` (minutes) if given. Not within the second its previous run ended: slurmd refuses a credential
    issued in the second the old one was revoked ("Job credential revoked"), which Slurm's hold avoids."""
    jobs = [j for j in _squeue(slurm_id.split("_")[0]) if j["state"] == "PENDING" and j["reason"] == "BeginTime"]
    if jobs:
        time.sleep(2)
    for job in jobs:
        limit = [f"TimeLimit={time_limit}"] if time_limit else []
        subprocess.run(["scontrol", "update", f"jobid={job['id']}", *limit, "StartTime=now"], check=True)
    return bool(jobs)


def _private_folders(tmp_path: Path, nnunet_env, datasets: list[str]) -> dict[str, str]:
    """Private nnU-Net folders holding copies of the session's preprocessed ``datasets`` (jobs write into them)."""
    preprocessed = tmp_path / "preprocessed"
    for dataset in datasets:
        shutil.copytree(nnunet_env.preprocessed / dataset, preprocessed / dataset)
    folders = {"nnUNet_raw": tmp_path / "raw", "nnUNet_preprocessed": preprocessed,
               "nnUNet_results": tmp_path / "results", "nnssl_results": tmp_path / "nnssl_results"}
    for folder in folders.values():
        folder.mkdir(exist_ok=True)
    return {k: str(v) for k, v in folders.items()}


@pytest.fixture
def study_folders(tmp_path, ct_task, pretrain_corpus, nnunet_env) -> dict[str, str]:
    return _private_folders(tmp_path, nnunet_env, [ct_task.dataset, CORPUS])


def _study_plan(path: Path, ct_task) -> Path:
    plan = json.loads((Path(__file__).parents[1] / "plans" / "demo.json").read_text(encoding="utf-8"))
    plan.pop("demo")
    plan.pop("baselines", None)
    # two trainers (the cheapest pretraining), named here so that the demo may run other methods
    plan["methods"] = {"scratch": {"trainer": "SwinUNETR_Scratch_Trainer", "pretrained": False},
                       "rotnet": {"trainer": "SwinUNETR_RotNet_Trainer"}}
    task = dict(plan["tasks"]["SynthCT"], dataset_id=ct_task.dataset_id, dataset_name=ct_task.name)
    plan["tasks"] = {"SynthCT": task}
    plan["plans_identifier"] = "nnUNetPlans"  # the task's own plans, as the session fixture preprocessed it
    plan["pretraining"] = {"protocol": "shared", "steps": 3, "global_batch": 2, "crop_size": [32, 32, 32], "epochs": 1}
    plan["pretrain_args"] = ["--num-workers", "0"]
    plan["finetune_env"] = {"nnssl_num_epochs": "1", "nnssl_iterations_per_epoch": "2", "nnUNet_compile": "false"}
    plan["cka"]["args"] = ["--patch-size", "32", "32", "64", "--patches-per-case", "8"]
    path.write_text(json.dumps(plan), encoding="utf-8")
    return path


def test_study_runs_through_slurm_to_the_report(slurm, study_folders, ct_task, tmp_path):
    """Arrays and dependencies in squeue; a re-run submits nothing; a failing fine-tuning skips its CKA job and
    the report lists the run; --status and the summary say so."""
    plan = _study_plan(tmp_path / "plan.json", ct_task)
    out = tmp_path / "out"
    # a checkpoint of the scratch 2-shot fold without network weights: that fine-tuning (run with --c) fails
    broken = Path(study_folders["nnUNet_results"]) / ct_task.dataset / SCRATCH_MODEL / "fold_5" / "checkpoint_latest.pth"
    broken.parent.mkdir(parents=True)
    torch.save({"current_epoch": 0}, broken)
    args = ("nnssl_benchmark", "--plan", plan, "--device", "cpu", "-o", out, "--executor", "slurm",
            "--cpus-per-job", "1", "--time", "15")
    dry = run_cli(*args, "--dry-run", env=study_folders).stdout
    assert "--array=0-1%2" in dry and "--dependency='afterok:<pretrain/rotnet>" not in dry  # one array per trainer
    assert "nnUNetv2_train 990 3d_fullres 5 -tr SwinUNETR_Scratch_Trainer -device cpu --c" in dry
    first = run_cli(*args, env=study_folders).stdout
    assert "submitted 9 job(s) in 7 sbatch call(s)" in first
    records = json.loads((out / "slurm" / "jobs.json").read_text(encoding="utf-8"))
    ids = sorted({r["slurm_id"].split("_")[0] for r in records.values()})
    queue = _squeue(*ids)
    arrays = {j["id"].split("_")[0] for j in queue if "_" in j["id"]}
    assert len(arrays) == 2 and any(j["dependency"] not in ("", "(null)") for j in queue), queue

    again = run_cli(*args, "--wait", env=study_folders, timeout=WAIT_SECONDS, check=False)
    assert again.returncode == 1 and "submitted 0 job(s)" in again.stdout  # 1: a job failed
    assert json.loads((out / "slurm" / "jobs.json").read_text(encoding="utf-8")) == records
    summary = {r["id"]: r for r in json.loads((out / "summary.json").read_text(encoding="utf-8"))}
    trainer = f"{ct_task.dataset}/SwinUNETR_Scratch_Trainer"
    assert summary[f"finetune/{trainer}/fold_5"]["status"] == "failed"
    assert summary[f"cka/{trainer}/2shot_fold0_seed0"]["status"] == "skipped"
    assert f"dependency finetune/{trainer}/fold_5 did not succeed" in summary[f"cka/{trainer}/2shot_fold0_seed0"][
        "message"]
    ok = [i for i, r in summary.items() if r["status"] == "ok"]
    assert sorted(ok) == sorted(["pretrain/rotnet", f"fewshot/{ct_task.dataset}/seed0", f"finetune/{trainer}/fold_0",
                                 f"finetune/{ct_task.dataset}/SwinUNETR_RotNet_Trainer/fold_0",
                                 f"finetune/{ct_task.dataset}/SwinUNETR_RotNet_Trainer/fold_5",
                                 f"cka/{ct_task.dataset}/SwinUNETR_RotNet_Trainer/2shot_fold0_seed0", "report"])
    report = (out / "report" / "report.md").read_text(encoding="utf-8")
    assert "Missing and unfinished runs" in report and "SwinUNETR_Scratch_Trainer" in report
    log = (out / "logs" / f"finetune__{trainer.replace('/', '__')}__fold_0.log").read_text(encoding="utf-8")
    assert "(OMP_NUM_THREADS=1 nnUNet_n_proc_DA=0 nnUNet_def_n_proc=1)" in log and "Slurm job" in log

    status = run_cli("nnssl_benchmark", "--plan", plan, "--device", "cpu", "-o", out, "--status",
                     env=study_folders, check=False).stdout
    assert "failed" in status and f"finetune/{trainer}/fold_5" in status


def test_cancel_stops_the_study_and_status_shows_it(slurm, study_folders, ct_task, tmp_path):
    plan = _study_plan(tmp_path / "plan.json", ct_task)
    out = tmp_path / "out"
    args = ("nnssl_benchmark", "--plan", plan, "--device", "cpu", "-o", out)
    # held jobs stay queued whatever else the node runs, so the test sees them queued
    run_cli(*args, "--executor", "slurm", "--cpus-per-job", "1", "--time", "5", "--sbatch=--hold", env=study_folders)
    assert "queued" in run_cli(*args, "--status", env=study_folders).stdout
    cancelled = run_cli(*args, "--cancel", env=study_folders).stdout
    assert "cancelled 9 queued or running job(s)" in cancelled
    records = json.loads((out / "slurm" / "jobs.json").read_text(encoding="utf-8"))
    _wait(lambda: all(j["state"] == "CANCELLED" for j in _squeue(*{r["slurm_id"].split("_")[0]
                                                                   for r in records.values()})), "scancel")
    status = run_cli(*args, "--status", env=study_folders, check=False).stdout
    assert "queued" not in status.split("\n\n")[-1] and "ended without an outcome" in status


def _seconds(slurm_time: str) -> int:
    """squeue's ``[D-][H:]M:S`` as seconds."""
    days, _, clock = slurm_time.rpartition("-")
    seconds = 0
    for part in clock.split(":"):
        seconds = seconds * 60 + int(part)
    return seconds + int(days or 0) * 86400


def _time_limit_in_about_a_minute(slurm_id: str) -> None:
    """Shorten the running job's time limit (whole minutes, as Slurm keeps it) so that 60-120 s are left: with
    --signal USR2@90 Slurm's own time-limit signal is then due within 30 s and sent at slurmctld's next
    time-limit check (every 30 s), before the limit itself, whatever the machine's speed."""
    elapsed = subprocess.run(["squeue", "-h", "-j", slurm_id, "-o", "%M"], capture_output=True, text=True,
                             check=True).stdout.strip()
    minutes_ = -(-(_seconds(elapsed) + 60) // 60)
    subprocess.run(["scontrol", "update", f"jobid={slurm_id}", f"TimeLimit={minutes_}"], check=True)


def test_ddp_pretraining_under_slurm_hits_its_time_limit_is_requeued_and_finishes(slurm, pretrain_corpus, nnunet_env,
                                                                                   tmp_path):
    """2 tasks (gloo) take torch.distributed from Slurm; once it steps, the job's time limit is cut to about a
    minute away, Slurm itself signals it (--signal USR2@90), both ranks stop at one step with a checkpoint, the job
    is requeued and continues to the same step count as an uninterrupted run."""
    steps = 200  # still stepping 60 s after the first steps on an idle 2-core machine (~0.4 s per step)
    command = ("nnssl_pretrain", "-m", "rotnet", "-d", str(CORPUS_ID), *TINY_PRETRAIN, "--epochs", "1",
               "--steps-per-epoch", str(steps), "--run", "slurm_ddp", "--plans-override", "log_every=1")
    job = Job("pretrain/rotnet", "pretrain", command, gpu=True)
    cluster = load_cluster(None, {"cpus_per_job": 1, "pretrain_tasks_per_node": 2, "time": "15", "signal_delay_s": 90})
    out = tmp_path / "out"
    study_folders = _private_folders(tmp_path, nnunet_env, [CORPUS])
    with pytest.MonkeyPatch.context() as patch:
        for name, value in study_folders.items():
            patch.setenv(name, value)
        options = sbatch_options(cluster, job, "cpu", "nnssl-test-ddp", None)
        (slurm_id,) = submit([Submission([job], options, {})], cluster, out, Path(study_folders["nnUNet_preprocessed"]),
                             {}).values()
    run = Path(study_folders["nnssl_results"]) / "rotnet" / "slurm_ddp"
    _wait(lambda: (run / "log.csv").is_file() and len((run / "log.csv").read_text().splitlines()) > 3,
          "the first steps")
    _time_limit_in_about_a_minute(slurm_id)
    # the requeued job gets its 15 minutes back, so that the test needs one requeue
    _wait(lambda: _release_requeued(slurm_id, time_limit="15"), "Slurm's time-limit signal and the requeue")
    _wait(lambda: outcome_path(out / "slurm" / "outcomes", job.id).is_file(), "the requeued job to finish")

    outcome = json.loads(outcome_path(out / "slurm" / "outcomes", job.id).read_text(encoding="utf-8"))
    log = (out / "logs" / "pretrain__rotnet.log").read_text(encoding="utf-8")
    assert outcome["status"] == "ok", log[-3000:]
    assert log.count("rank 0 of 2, MASTER_ADDR=") == 2 and "rank 1 of 2" in (out / "logs" /
                                                                            "pretrain__rotnet.rank1.log").read_text()
    assert "Interrupted by signal 15 at step" in log and "resuming" in log
    rows = [int(line.split(",")[0]) for line in (run / "log.csv").read_text().splitlines()[1:]]
    assert rows == list(range(1, steps + 1))  # every step once: none lost, none repeated
    final = torch.load(run / "checkpoint_final.pth", weights_only=False)
    assert final["step"] == steps and len(final["rng"]) == 2  # both ranks' RNG: DDP was initialised


# -- without a cluster ---------------------------------------------------------------------------------------
def test_cluster_settings_from_file_and_flags(tmp_path):
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps({"cluster": {"partition": "gpu", "time": "2-00:00:00", "pretrain_nodes": 2,
                                            "pretrain_gpus_per_node": 8, "sbatch": ["--exclusive"]}}))
    cluster = load_cluster(path, {"partition": "a100", "time": None})
    assert (cluster.partition, minutes(cluster.time)) == ("a100", 2880)  # a flag wins; an unset flag does not
    pretrain = sbatch_options(cluster, Job("pretrain/smit", "pretrain", ("x",), gpu=True), "cuda", "n", None)
    assert {k: pretrain[k] for k in ("nodes", "ntasks-per-node", "gpus-per-node", "exclusive")} == {
        "nodes": "2", "ntasks-per-node": "8", "gpus-per-node": "8", "exclusive": ""}
    finetune = sbatch_options(cluster, Job("finetune/x", "finetune", ("x",), gpu=True), "cuda", "n", None)
    assert (finetune["nodes"], finetune["gpus-per-node"], finetune["kill-on-invalid-dep"]) == ("1", "1", "yes")
    assert "gpus-per-node" not in sbatch_options(cluster, Job("fewshot/x", "fewshot", ("x",)), "cuda", "n", None)
    assert [minutes(t) for t in ("90", "0:30", "1:30:00", "1-12")] == [90, 1, 90, 2160]
    with pytest.raises(NnsslError, match=r"Unknown cluster setting\(s\) \['gpu'\]"):
        load_cluster(None, {"gpu": 1})
    with pytest.raises(NnsslError, match="not a Slurm time"):
        load_cluster(None, {"time": "tomorrow"})
    with pytest.raises(NnsslError, match="not an sbatch long option"):
        load_cluster(None, {"sbatch": ["-x"]})


def test_resubmission_plan_leaves_queued_jobs_and_depends_on_them(tmp_path):
    """What a re-run submits: nothing for queued/running/done jobs, the failed job and what it blocked again,
    with afterok on the queued job they need. A job whose files exist is "ok" when this study's Slurm job made
    them (however early it finished), "done" when they were there before."""
    jobs = [Job("pretrain/a", "pretrain", ("p",), gpu=True), Job("plan/t", "plan", ("q",), DONE),
            Job("fewshot/t", "fewshot", ("s",), DONE),
            *[Job(f"finetune/t/a/fold_{f}", "finetune", ("f", str(f)), deps=("plan/t", "pretrain/a"), gpu=True)
              for f in (0, 1)],
            Job("cka/t/a", "cka", ("c",), deps=("finetune/t/a/fold_0", "finetune/t/a/fold_1"), gpu=True)]
    jobs.append(Job("report", "report", ("r",), after=tuple(j.id for j in jobs[3:])))
    plan = StudyPlan(jobs)
    out = tmp_path / "out"
    records = {"pretrain/a": {"slurm_id": "7"}, "fewshot/t": {"slurm_id": "6"}, "finetune/t/a/fold_0": {"slurm_id": "8_0"},
               "finetune/t/a/fold_1": {"slurm_id": "8_1"}, "cka/t/a": {"slurm_id": "9"}, "report": {"slurm_id": "10"}}
    save_json({"slurm_id": "8_1", "status": "failed", "returncode": 1, "message": "exit status 1"},
              outcome_path(out / "slurm" / "outcomes", "finetune/t/a/fold_1"))
    save_json({"slurm_id": "6", "status": "ok", "returncode": 0}, outcome_path(out / "slurm" / "outcomes", "fewshot/t"))
    live = {"7": ("RUNNING", "None"), "8_0": ("PENDING", "Dependency"), "9": ("CANCELLED", "DependencyNeverSatisfied"),
            "10": ("COMPLETED", "None")}
    statuses = job_statuses(plan, out, records, live)
    assert [r.status for r in statuses] == ["running", "done", "ok", "queued", "failed", "skipped", "interrupted"]
    submissions, left_alone = plan_submissions(plan, statuses, records, load_cluster(None, {}), "cuda")
    assert left_alone == {"pretrain/a": "7", "finetune/t/a/fold_0": "8_0"}
    assert [[j.id for j in s.jobs] for s in submissions] == [["finetune/t/a/fold_1"], ["cka/t/a"], ["report"]]
    assert submissions[0].needs == {"afterok": ("pretrain/a",)}  # plan/t is done: no dependency on it
    ids = {**left_alone, "finetune/t/a/fold_1": "11", "cka/t/a": "12"}
    assert dependency(submissions[1].needs, ids) == "afterok:8_0:11"
    assert dependency(submissions[2].needs, ids) == "afterany:8:11:12"
    text = format_submissions(submissions, load_cluster(None, {}), left_alone, out)
    assert "--dependency=afterok:7 " in text and "--dependency='afterok:8_0:<finetune/t/a/fold_1>'" in text
    assert "  f 1 --c\n" in text  # the command as the requeued job runs it too


def test_demo_passes_cluster_flags_through(tmp_path):
    text = run_cli("nnssl_demo", "--quick", "--dry-run", "-o", tmp_path / "demo", "--executor", "slurm",
                   "--partition", "cpu", "--cpus-per-job", "2", "--sbatch=--mail-type=FAIL").stdout
    assert "sbatch --job-name=nnssl-prepare-Dataset501_CTcorpus" in text
    assert text.count("--partition=cpu --kill-on-invalid-dep=yes --requeue --mail-type=FAIL") == text.count("sbatch ")
    assert "--cpus-per-task=2" in text and "--array=0-1%2" in text and "gpus-per-node" not in text
