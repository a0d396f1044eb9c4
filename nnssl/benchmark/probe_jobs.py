"""The study's probe jobs: ``nnssl_probe`` of ``random`` once, then of every pretrained method's study encoder.

All on the plan's probe task, each method's probe.json taking the random encoder's result as its baseline
(``--random-from``); see :mod:`nnssl.benchmark.jobs` for where they sit in the study.
"""
from __future__ import annotations

from pathlib import Path

from nnssl.align_plans import CORPUS_PLANS
from nnssl.benchmark.job import Job, Settings, device_flag, job_ids
from nnssl.benchmark.results_state import DONE, NEW, ResultsState
from nnssl.benchmark.study import Study, TaskSpec

RANDOM_PROBE = "random"  # nnssl_probe's ENCODER for the randomly initialised encoder scratch starts from


def probe_root(settings: Settings) -> Path:
    """Where the study's probe jobs write: ``<output>/probe/<dataset>/<method or random>/probe.json``."""
    return settings.output / "probe"


def probe_jobs(study: Study, task: TaskSpec, methods: tuple[str, ...], settings: Settings, state: ResultsState,
               plan_job: Job, pretrain_jobs: dict[str, Job]) -> list[Job]:
    """``nnssl_probe`` of each of ``methods``' study encoder on ``task`` (preprocessed by ``plan_job``), after one
    probe of ``random`` (scratch's starting point) whose result every method's probe.json takes as its baseline."""
    options = [*device_flag(settings), *study.probe_args]
    options += ["-p", study.plans_identifier] if study.plans_identifier != CORPUS_PLANS else []  # fine-tuning's
    random_out = probe_root(settings) / task.dataset / RANDOM_PROBE
    jobs = [Job(f"probe/{task.dataset}/{RANDOM_PROBE}", "probe",
                ("nnssl_probe", RANDOM_PROBE, "-d", str(task.dataset_id), "-o", str(random_out), *options,
                 "--backbone", study.backbone),
                DONE if state.file_exists(random_out / "probe.json") else NEW, deps=job_ids(plan_job), gpu=True)]
    for method in (study.methods[m] for m in methods if study.methods[m].pretrained):
        out = probe_root(settings) / task.dataset / method.name
        encoder = str(method.encoder_file) if method.encoder_file else method.name
        command = ("nnssl_probe", encoder, "-d", str(task.dataset_id), "-o", str(out), *options,
                   "--random-from", str(random_out / "probe.json"))
        jobs.append(Job(f"probe/{task.dataset}/{method.name}", "probe", command,
                        DONE if state.file_exists(out / "probe.json") else NEW,
                        deps=job_ids(plan_job, pretrain_jobs.get(method.name), jobs[0]),
                        env=(("nnssl_run", study.corpus_run),) if method.pretrains else (),  # the study's run
                        gpu=True))
    return jobs
