"""``nnssl_demo`` (``make demo``): the whole study in miniature on the CPU, on synthetic data, through the
real pipeline (Jiang & Veeraraghavan 2026, at toy scale).

Steps, each skipped when its output exists, so running the demo again resumes it:

1. ``OUT/plan.json``: ``plans/demo.json`` (with its ``demo.quick`` settings under ``--quick``), the plan the
   driver runs. A folder made with other settings is refused, never mixed.
2. Synthetic data (:mod:`nnssl.data.synthetic`): unlabelled CT volumes for the pretraining corpus in
   ``OUT/corpus_raw``; in ``OUT/nnUNet_raw`` one CT task and the same anatomy as MRI (CT-to-MRI transfer).
3. ``nnssl_benchmark --plan OUT/plan.json --device cpu --corpus-dir OUT/corpus_raw -o OUT/benchmark``:
   corpus preparation, nnU-Net planning and preprocessing, pretraining per method, few-shot folds,
   fine-tuning with ``nnUNetv2_train``, ``nnssl_cka`` few- vs many-shot, ``nnssl_report``.
4. A summary: Dice per task x method x shot setting (the report's ``dice.csv``) and the mean same-layer
   CKA of the encoder between the few- and the many-shot model (each ``cka.json``).

The demo never touches a user's nnU-Net folders: ``nnUNet_raw``, ``nnUNet_preprocessed``,
``nnUNet_results`` and ``nnssl_results`` point inside OUT for the demo and every command it runs, whatever
the shell sets them to.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from nnssl.benchmark.cluster import ClusterSettings
from nnssl.benchmark.driver import ROOT_VARIABLES, BenchmarkOutcome, format_plan, run_benchmark
from nnssl.benchmark.study import Study, load_study
from nnssl.errors import NnsslError
from nnssl.io import load_json, save_json
from nnssl.paths import environment
from nnssl.plans import load_plan

log = logging.getLogger(__name__)

DEMO_PLAN = "demo.json"
DEFAULT_OUTPUT = "demo_output"
CORPUS_RAW = "corpus_raw"  # raw synthetic CT volumes, input of nnssl_prepare_corpus
STAGING = ".staging"  # synthetic data is written here, then renamed into place: a folder in place is complete
BENCHMARK = "benchmark"  # the driver's output: logs/, summary.json, cka/, report/
SCALE_NOTE = ("Toy scale: a tiny Swin, a few pretraining steps and fine-tuning iterations, one fold, synthetic "
              "data. The numbers show that the pipeline runs end to end, not which method is better.")


@dataclass
class DemoOutcome:
    output: Path
    text: str  # what the CLI prints
    ok: bool


def demo_plan(quick: bool = False) -> dict[str, Any]:
    """``plans/demo.json`` as a dict; with ``quick``, its ``demo.quick`` entries replace the top-level ones."""
    plan = load_plan(DEMO_PLAN)
    if quick:
        plan.update(plan["demo"]["quick"])
    return plan


def default_jobs() -> int:
    """Training jobs at a time: two where there are two cores (tiny networks use two cores poorly in one job)."""
    return min(2, len(os.sched_getaffinity(0)))


def run_demo(output: str | os.PathLike = DEFAULT_OUTPUT, quick: bool = False, dry_run: bool = False,
             jobs: int | None = None, cluster: ClusterSettings | None = None) -> DemoOutcome:
    """Run (or with ``dry_run`` only list) the demo study in ``output``; see the module docstring. With
    ``cluster``, every job is submitted to Slurm with those settings and the demo waits for them."""
    out = Path(output).resolve()
    plan = demo_plan(quick)
    plan_path = _write_plan(plan, out)
    study = load_study(plan_path)
    settings = {"plan": plan_path, "device": "cpu", "output": out / BENCHMARK, "corpus_dir": out / CORPUS_RAW}
    settings.update({"executor": "slurm", "cluster": cluster, "wait": True} if cluster else
                    {"jobs": jobs or default_jobs()})
    with demo_environment(out, create=not dry_run):
        if dry_run:
            outcome = run_benchmark(**settings, dry_run=True)
            text = outcome.text if cluster else _dry_run_text(outcome, study, plan["demo"], out)
            return DemoOutcome(out, text, ok=True)
        started_wall, started_cpu = time.monotonic(), _cpu_seconds()
        make_synthetic_data(study, plan["demo"], out)
        outcome = run_benchmark(**settings)
        minutes = ((time.monotonic() - started_wall) / 60, (_cpu_seconds() - started_cpu) / 60)
    return DemoOutcome(out, _summary(outcome, study, out, quick, minutes), outcome.ok)


def _write_plan(plan: dict[str, Any], out: Path) -> Path:
    """``OUT/plan.json``; an existing one with other contents is an error once results exist."""
    path = out / "plan.json"
    if path.is_file() and load_json(path) != plan and any(
            (out / name).is_dir() and any((out / name).iterdir()) for name in ("nnUNet_results", "nnssl_results")):
        raise NnsslError(f"{out} holds a demo made with other settings: {path} differs from plans/{DEMO_PLAN} "
                         f"as this run would use it (with or without --quick?). Use another folder "
                         f"(-o NEW_FOLDER) or delete {out}.")
    save_json(plan, path)
    return path


@contextmanager
def demo_environment(out: Path, create: bool = True) -> Iterator[None]:
    """Point ``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results`` and ``nnssl_results`` to folders in
    ``out`` (created if ``create``) while the demo runs; restore the caller's values afterwards."""
    folders = {name: out / name for name in ROOT_VARIABLES}
    for name, folder in folders.items():
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        if os.environ.get(name) and Path(os.environ[name]).resolve() != folder:
            log.info("nnssl_demo: using %s=%s (your %s is left alone)", name, folder, os.environ[name])
    with environment({name: str(folder) for name, folder in folders.items()}):
        yield


def make_synthetic_data(study: Study, settings: dict[str, Any], out: Path) -> None:
    """The corpus volumes (``OUT/corpus_raw``) and every task of ``study`` in ``$nnUNet_raw``, unless present.

    Each is written to ``OUT/.staging`` and renamed into place, so a folder that exists is complete.
    """
    from nnssl.benchmark.raw_dataset import is_complete
    from nnssl.data.synthetic import LABELS, SyntheticSpec, write_corpus, write_task

    shape = settings["volume_shape"]
    spec = SyntheticSpec("CT", tuple(shape["min_shape"]), tuple(shape["max_shape"]), tuple(shape["spacing"]),
                         shape.get("organ_scale", 1.0))
    staging = out / STAGING
    shutil.rmtree(staging, ignore_errors=True)  # left over from an interrupted run
    corpus = out / CORPUS_RAW
    if not corpus.is_dir():
        log.info("nnssl_demo: writing %d synthetic CT volumes to %s", settings["corpus_volumes"], corpus)
        write_corpus(staging / CORPUS_RAW, settings["corpus_volumes"], seed=settings["corpus_seed"], spec=spec)
        os.replace(staging / CORPUS_RAW, corpus)
    raw = Path(os.environ["nnUNet_raw"])
    raw.mkdir(parents=True, exist_ok=True)
    for task in study.tasks.values():
        target = raw / task.dataset
        if is_complete(target):
            continue
        synthetic = task.options.get("synthetic")
        if synthetic is None or task.labels != LABELS:
            raise NnsslError(f"Task {task.key} of {study.source} cannot be generated: the demo needs a 'synthetic' "
                             f"entry ({{\"cases\": N, \"seed\": S}}) and the labels of nnssl.data.synthetic {LABELS}.")
        log.info("nnssl_demo: writing %s (%d synthetic %s cases) to %s", task.dataset, synthetic["cases"],
                 task.modality, raw)
        written = write_task(staging, task.dataset_id, task.dataset_name, synthetic["cases"], modality=task.modality,
                             seed=synthetic["seed"], spec=spec)
        shutil.rmtree(target, ignore_errors=True)  # an incomplete folder from before the staging step
        os.replace(written, target)
    shutil.rmtree(staging, ignore_errors=True)


def _cpu_seconds() -> float:
    """CPU time of this process and of every command it waited for (the driver waits for each job)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _dry_run_text(outcome: BenchmarkOutcome, study: Study, settings: dict[str, Any], out: Path) -> str:
    # the synthetic tasks are "missing" only until the demo writes them, so they are not listed as such
    generated = tuple(task.dataset for task in study.tasks.values())
    outcome.plan.missing = [m for m in outcome.plan.missing if not m.startswith(generated)]
    tasks = ", ".join(f"{t.dataset} ({t.options['synthetic']['cases']} {t.modality} cases)"
                      for t in study.tasks.values())
    header = (f"# nnssl_demo writes {settings['corpus_volumes']} synthetic CT volumes to {out / CORPUS_RAW} and "
              f"{tasks} to {out / 'nnUNet_raw'} (what is there already is kept), then runs:")
    return header + "\n" + format_plan(outcome.plan, out / BENCHMARK / "logs")


def _summary(outcome: BenchmarkOutcome, study: Study, out: Path, quick: bool, minutes: tuple[float, float]) -> str:
    report = out / BENCHMARK / "report"
    lines = [outcome.text, "", f"nnssl_demo{' --quick' if quick else ''} took {minutes[0]:.1f} min "
                              f"({minutes[1]:.1f} min of CPU time) in {out}", ""]
    rows = summary_rows(report / "dice.csv", out / BENCHMARK / "cka", study)
    if rows:
        from nnssl.analysis.tables import markdown_table

        shots = sorted({key for row in rows for key in row if key.endswith("shot")}, key=_shot_order)
        ckas = sorted({key for row in rows for key in row if key.startswith("CKA")})
        lines += [SCALE_NOTE, "",
                  "Dice: mean over the validation cases of fold 0 (foreground labels). CKA: mean same-layer "
                  "linear CKA of the encoder stages between the few-shot and the many-shot model.", "",
                  f"Fine-tuning plans: {study.plans_identifier}"
                  f"{' (the corpus plans moved onto each task by nnssl_align_plans)' if study.aligned else ''}; "
                  f"'aligned' is the trainers' check against each encoder's pretraining.", "",
                  markdown_table(rows, ["task", "modality", "method", "family", "aligned", *shots, *ckas])]
    else:
        lines.append(f"No Dice table: {report / 'dice.csv'} was not written (see the failed jobs above).")
    lines += [f"Report:  {report / 'report.md'} (tables, statistics, NSD, CKA, dice.png, dice_vs_shots.png, "
              f"overlay_*.png, convergence_*.png, gap.png, modality.png)",
              f"CKA:     {out / BENCHMARK / 'cka'}/<dataset>/<trainer>/<k>shot_fold0_seed0/cka_heatmap.png",
              f"Logs:    {out / BENCHMARK / 'logs'}/<job>.log",
              f"Models:  {out / 'nnUNet_results'} and {out / 'nnssl_results'} (nnU-Net's and nnssl's folders)"]
    if not outcome.ok:
        lines.append("Some jobs did not succeed (above). Run the demo again to retry them; finished work is kept.")
    return "\n".join(lines)


def summary_rows(dice_csv: Path, cka_dir: Path, study: Study) -> list[dict[str, Any]]:
    """One row per task x method: mean Dice per shot setting and the encoder CKA per few-shot setting."""
    from nnssl.analysis.activations import ENCODER_LAYERS

    if not dice_csv.is_file():
        return []
    method_of = {spec.trainer: name for name, spec in study.methods.items()}
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    with open(dice_csv, newline="", encoding="utf-8") as f:
        for entry in csv.DictReader(f):
            row = rows.setdefault((entry["task"], entry["method"]), {
                "task": entry["task"], "modality": entry["modality"], "method": entry["method"],
                "family": entry["family"]})
            row[entry["shot"]] = float(entry["dice_mean"]) if entry["dice_mean"] else math.nan
    for path in sorted(cka_dir.glob("*/*/*shot_fold*_seed*/cka.json")):
        dataset, trainer, run = path.parts[-4:-1]
        row = rows.get((dataset, method_of.get(trainer, "")))
        diagonal = load_json(path)["comparisons"][0]["diagonal"]
        # layers whose CKA is undefined (NaN: features constant over the patches) are left out, as in the report
        encoder = [value for layer, value in diagonal.items() if layer in ENCODER_LAYERS and not math.isnan(value)]
        if row is not None and encoder:
            row[f"CKA {run.split('_')[0].replace('shot', '-shot')} vs many"] = sum(encoder) / len(encoder)
    alignment_csv = dice_csv.with_name("alignment.csv")  # the trainers' check, per model folder (nnssl_report)
    if alignment_csv.is_file():
        with open(alignment_csv, newline="", encoding="utf-8") as f:
            for entry in csv.DictReader(f):
                if (entry["task"], entry["method"]) in rows:
                    rows[(entry["task"], entry["method"])]["aligned"] = entry["aligned"]
    order = list(study.methods)
    return sorted(rows.values(), key=lambda r: (r["task"], order.index(r["method"]) if r["method"] in order else 99))


def _shot_order(shot: str) -> tuple[int, int]:
    head = shot.split("-")[0]
    return (0, int(head)) if head.isdigit() else (1, 0)
