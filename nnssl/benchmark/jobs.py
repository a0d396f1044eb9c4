"""The study as a graph of jobs: which command runs, in which state, after which others.

:func:`plan_study` is pure: given the study (``plans/benchmark.json``), a selection, settings and a
:class:`ResultsState` (what is already on disk), it returns every job with its exact command, whether it is
``new``, to ``resume`` or ``done``, and its dependencies. Reading the disk is
:class:`~nnssl.benchmark.results_state.DiskState`'s job;
running is :mod:`nnssl.benchmark.executor`'s.

Jobs, in the order they are listed (and started when their dependencies allow):

- ``prepare``: ``nnssl_prepare_corpus -i DIR -d 501 -n CTcorpus`` (only with ``--corpus-dir``);
- ``plan``: ``nnUNetv2_plan_and_preprocess -d ID -c 3d_fullres --verify_dataset_integrity`` per dataset;
- ``pretrain``: ``nnssl_pretrain -m M -d 501 --backbone paper --run paper_d501`` per method (``--resume``
  when the run folder exists without ``encoder_final.pth``);
- ``probe``: ``nnssl_probe random -d ID -o ...`` once, then ``nnssl_probe M -d ID -o ... --random-from ...`` per
  pretrained method (sharing that random baseline) on the plan's probe task, if it names one; fine-tuning starts
  after them, whatever their outcome;
- ``fewshot``: ``nnssl_fewshot ID --shots ... --folds 0 1 2 3 4 --seed S`` per task and seed;
- ``plan`` of each imported encoder (a method with ``encoder_file``): ``nnssl_align_plans -d ID -pl PLANS
  --variant M --knob nnssl_encoder_file=FILE``, the plans variant ``PLANS_M`` it fine-tunes on (its own model
  folder, the task's preprocessed data; no pretraining);
- ``plan`` of each seed repeat: ``nnssl_align_plans -d ID -pl PLANS --variant seedS --knob nnssl_seed=S`` (of an
  imported encoder: ``--variant M_seedS`` with its encoder knob too) for every seed S of ``seeds`` after the first;
- ``finetune``: ``nnUNetv2_train ID 3d_fullres FOLD -tr SwinUNETR_<M>_Trainer`` per task, trainer and fold
  (``--c`` when a checkpoint exists; done when ``checkpoint_final.pth`` and ``validation/summary.json``
  exist); nnU-Net validates at the end of training. A many-shot fold runs once per seed: the first seed in the
  model folder of ``-p PLANS``, every further seed S in its own, ``-p PLANS_seedS`` (nnU-Net keeps one
  ``fold_F`` per folder); a few-shot fold runs with the seed that drew its cases;
- ``finetune`` of each baseline of the plan (``baselines``, e.g. stock ``nnUNetTrainer``) on the same folds and
  seed repeats (stock nnU-Net seeds nothing: its repeats are independent runs);
- ``cka``: ``nnssl_cka FOLDER:FEWSHOT_FOLD FOLDER:BASE_FOLD -o ...`` (few- vs many-shot per trainer);
- ``report``: ``nnssl_report IDS -o ...``, after every fine-tuning and CKA job, whatever their outcome.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from nnssl.align_plans import CORPUS_PLANS
from nnssl.benchmark.budget import Budget, method_budget
from nnssl.benchmark.job import Job, Settings, device_flag, job_ids
from nnssl.benchmark.probe_jobs import probe_jobs, probe_root
from nnssl.benchmark.results_state import DONE, NEW, RESUME, ResultsState
from nnssl.benchmark.study import BaselineSpec, MethodSpec, Study, TaskSpec
from nnssl.errors import NnsslError
from nnssl.fewshot import NUM_MANY_SHOT_FOLDS, plan_fewshot_folds
from nnssl.plans_variants import SEED_KNOB, seed_variant_name, variant_identifier

MANY_SHOT = "all"  # the --shots value of nnU-Net's folds 0-4
KINDS = ("prepare", "plan", "pretrain", "probe", "fewshot", "finetune", "cka", "report")


@dataclass(frozen=True)
class Selection:
    """What part of the study to run. ``shots`` holds few-shot sizes and/or ``MANY_SHOT``."""

    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    shots: tuple[int | str, ...]
    folds: tuple[int, ...]
    baselines: tuple[str, ...] = ()  # reference nnU-Net trainers of the plan (its ``baselines``)


@dataclass
class StudyPlan:
    jobs: list[Job]
    missing: list[str] = field(default_factory=list)  # inputs no job can make; each says what to run
    budgets: dict[str, Budget] = field(default_factory=dict)  # pretraining budget per method


def select(study: Study, tasks: list[str] | None = None, methods: list[str] | None = None,
           shots: list[str] | None = None, folds: list[int] | None = None) -> Selection:
    """A checked selection; None means everything in the study. ``methods`` may name baselines too."""
    task_keys = tuple(dict.fromkeys(study.task(t).key for t in tasks)) if tasks else tuple(study.tasks)
    method_names = (tuple(dict.fromkeys(study.method(m).name for m in methods if m not in study.baselines))
                    if methods else tuple(study.methods))
    baselines = tuple(dict.fromkeys(m for m in methods if m in study.baselines)) if methods else tuple(study.baselines)
    available = sorted({n for key in task_keys for n in study.tasks[key].few_shot})
    if shots:
        chosen: list[int | str] = []
        for value in shots:
            text = str(value).lower()
            if text == MANY_SHOT:
                chosen.append(MANY_SHOT)
            elif text.isdigit() and int(text) in available:
                chosen.append(int(text))
            else:
                raise NnsslError(f"--shots {value}: the selected tasks have few-shot sizes {available} "
                                 f"({study.source}); use those and/or '{MANY_SHOT}' for the many-shot folds.")
        shot_values = tuple(dict.fromkeys(chosen))
    else:
        shot_values = (*available, MANY_SHOT)
    bad_folds = [f for f in folds or [] if f not in study.folds]
    if bad_folds:
        raise NnsslError(f"--folds {bad_folds}: the study's many-shot folds are {list(study.folds)}.")
    return Selection(task_keys, method_names, shot_values, tuple(folds) if folds else study.folds, baselines)


def predicted_fewshot_folds(study: Study, task: TaskSpec, shots: list[int],
                            existing: dict[str, dict], first_free: int) -> dict[tuple[int, int, int], int]:
    """(base fold, shots, seed) -> fold id, as ``nnssl_fewshot`` assigns them when run once per seed."""
    folds = dict(existing)
    for seed in study.seeds:
        folds = plan_fewshot_folds(shots, list(study.folds), seed, folds, first_free_fold=first_free)
    return {(v["base_fold"], v["shots"], v["seed"]): int(k) for k, v in folds.items()}


def plan_study(study: Study, selection: Selection, settings: Settings, state: ResultsState) -> StudyPlan:
    """Every job of the selected part of the study, in start order (see the module docstring)."""
    plan = StudyPlan(jobs=[])
    to_pretrain = [m for m in selection.methods if study.methods[m].pretrains]
    plan.budgets = {m: method_budget(study.pretraining, m, study.pretrain_args) for m in to_pretrain}
    corpus_job = None
    aligning = study.aligned and any(not state.preprocessed(study.tasks[k].dataset) for k in selection.tasks)
    if aligning or any(state.pretrain(m, study.corpus_run) != DONE for m in to_pretrain):
        corpus_job = _corpus_job(study, settings, state, plan)
    plan_jobs = {}
    for key in selection.tasks:
        task = study.tasks[key]
        if not state.raw_ready(task.dataset) and not state.preprocessed(task.dataset):
            plan.missing.append(f"{task.dataset} is not in $nnUNet_raw; convert the download "
                                f"({task.source.get('download', task.source.get('url', '?'))}) with: "
                                f"nnssl_convert {task.key} <download folder>")
        plan_jobs[key] = (_align_job(study, task, state, corpus_job) if study.aligned
                          else _plan_job(study, task.dataset_id, task.dataset, state))
    pretrain_jobs = {m: _pretrain_job(study, m, plan.budgets[m], settings, state, corpus_job) for m in to_pretrain}
    plan.missing += [f"The encoder file of method {m} ({study.methods[m].encoder_file}) does not exist. Convert the "
                     f"downloaded weights with: nnssl_import <download> -o {study.methods[m].encoder_file}"
                     for m in selection.methods
                     if study.methods[m].encoder_file and not state.file_exists(study.methods[m].encoder_file)]
    plan.jobs += [*plan_jobs.values(), *pretrain_jobs.values()]
    probes = _probe_jobs(study, selection, settings, state, plan_jobs, pretrain_jobs, corpus_job, plan)
    finetune_jobs: list[Job] = []
    cka_jobs: list[Job] = []
    for key in selection.tasks:
        fewshot, finetune, cka = _task_jobs(study, study.tasks[key], selection, settings, state, plan_jobs[key],
                                            pretrain_jobs)
        plan.jobs += fewshot
        finetune_jobs += [replace(job, after=job_ids(*probes)) if probes else job for job in finetune]
        cka_jobs += cka
    # the report reads the plan's baselines and NSD tolerances, and the CKA results of the cka jobs
    custom_plan = ("--plan", str(study.source)) if study.source.is_absolute() else ()
    report = ("nnssl_report", *(str(study.tasks[k].dataset_id) for k in selection.tasks), *custom_plan,
              "--cka", str(settings.output / "cka"), "-o", str(settings.output / "report"),
              *(("--probe", str(probe_root(settings))) if probes else ()))
    plan.jobs += [*finetune_jobs, *cka_jobs,
                  Job("report", "report", report, NEW, after=job_ids(*finetune_jobs, *cka_jobs, *probes))]
    return plan


def _probe_jobs(study: Study, selection: Selection, settings: Settings, state: ResultsState,
                plan_jobs: dict[str, Job], pretrain_jobs: dict[str, Job], corpus_job: Job | None,
                plan: StudyPlan) -> list[Job]:
    """The probe jobs (:mod:`nnssl.benchmark.probe_jobs`) on the plan's probe task, if it names one, appended to
    ``plan`` with the task's planning job when the task is not among the selected ones."""
    if study.probe_task is None or not selection.methods:
        return []
    task = study.tasks[study.probe_task]
    plan_job = plan_jobs.get(task.key)
    if plan_job is None:  # the probe task is not among the selected tasks: it still has to be preprocessed
        plan_job = (_align_job(study, task, state, corpus_job) if study.aligned
                    else _plan_job(study, task.dataset_id, task.dataset, state))
        plan.jobs.append(plan_job)
    jobs = probe_jobs(study, task, selection.methods, settings, state, plan_job, pretrain_jobs)
    plan.jobs += jobs
    return jobs


def _task_jobs(study: Study, task: TaskSpec, selection: Selection, settings: Settings, state: ResultsState,
               plan_job: Job, pretrain_jobs: dict[str, Job]) -> tuple[list[Job], list[Job], list[Job]]:
    """Few-shot fold and plans-variant jobs (those run first), fine-tuning and CKA jobs of one task."""
    shots = [n for n in task.few_shot if n in selection.shots]
    existing, num_splits = state.fewshot(task.dataset)
    fold_of = predicted_fewshot_folds(study, task, shots, existing, num_splits or NUM_MANY_SHOT_FOLDS)
    fewshot_jobs = _fewshot_jobs(study, task, shots, existing, fold_of, plan_job)
    # many-shot folds once per seed (seeds after the first in their own plans variant), few-shot folds with theirs
    runs = [(base, None, seed) for base in selection.folds for seed in study.seeds] if MANY_SHOT in selection.shots \
        else []
    runs += [(base, n, seed) for n in shots for base in selection.folds for seed in study.seeds]
    variant_jobs: dict[str, Job] = {}  # one per plans variant of the task, shared by the trainers fine-tuned on it

    def run_plans(source: str, imported: MethodSpec | None, seed: int) -> tuple[str, tuple[str, ...]]:
        """The plans a run fine-tunes on and the ids of the jobs that make them (a variant's, if it is one)."""
        name, knobs = _variant(study, imported, seed)
        if name is None:
            return source, ()
        plans = variant_identifier(source, name)
        variant_jobs.setdefault(plans, _variant_job(study, task, source, name, knobs, plans, plan_job, state))
        return plans, (variant_jobs[plans].id,)

    finetune_jobs, cka_jobs = [], []
    for name in selection.methods:
        method = study.methods[name]
        imported = method if method.encoder_file else None
        by_run = {}
        for base, n, seed in runs:
            plans, variant_deps = run_plans(study.plans_identifier, imported, seed if n is None else study.seeds[0])
            deps = job_ids(plan_job, *fewshot_jobs, pretrain_jobs.get(name)) + variant_deps
            by_run[(base, n, seed)] = _finetune_job(study, task, method.trainer, method.pretrains,
                                                    base if n is None else fold_of[(base, n, seed)], deps, settings,
                                                    state, seed, plans=plans)
        finetune_jobs += by_run.values()
        first = study.seeds[0]
        for base, n, seed in by_run:
            if n is not None and base in study.cka_base_folds and (base, None, first) in by_run:
                # the few-shot fold against the many-shot fold of its own model folder (the first seed's)
                cka_jobs.append(_cka_job(study, task, method.trainer, n, base, seed, fold_of[(base, n, seed)],
                                         (by_run[(base, n, seed)], by_run[(base, None, first)]), settings, state,
                                         run_plans(study.plans_identifier, imported, first)[0]))
    for name in selection.baselines:
        baseline = study.baselines[name]
        for base, n, seed in runs:
            plans, variant_deps = run_plans(baseline.plans_identifier, None, seed if n is None else study.seeds[0])
            finetune_jobs.append(_finetune_job(study, task, baseline.trainer, False,
                                               base if n is None else fold_of[(base, n, seed)],
                                               job_ids(plan_job, *fewshot_jobs) + variant_deps, settings, state, seed,
                                               baseline, plans))
    return fewshot_jobs + list(variant_jobs.values()), finetune_jobs, cka_jobs


def _processes(study: Study, *flags: str) -> tuple[str, ...]:
    """``-np N`` (and nnU-Net's ``-npfp N``) when the plan sets ``num_processes``; each worker is a fresh
    Python process that imports torch, which costs more than it saves on tiny datasets (the demo)."""
    if study.num_processes is None:
        return ()
    return tuple(arg for flag in flags for arg in (flag, str(study.num_processes)))


def _plan_job(study: Study, dataset_id: int, dataset: str, state: ResultsState, deps: tuple[str, ...] = (),
              plans: str | None = None) -> Job:
    command = ("nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", study.configuration,
               "--verify_dataset_integrity", *_processes(study, "-npfp", "-np"))
    return Job(f"plan/{dataset}", "plan", command, DONE if state.preprocessed(dataset, plans) else NEW, deps=deps)


def _align_job(study: Study, task: TaskSpec, state: ResultsState, corpus_job: Job | None) -> Job:
    """The corpus's plans moved onto the task and nnU-Net's preprocessing with them (nnssl_align_plans)."""
    command = ("nnssl_align_plans", "-d", str(task.dataset_id), "--corpus", str(study.corpus_id),
               "-pl", study.plans_identifier, *(("--study", str(study.source)) if study.source.is_absolute() else ()),
               *_processes(study, "-np"))
    return Job(f"plan/{task.dataset}", "plan", command, DONE if state.preprocessed(task.dataset) else NEW,
               deps=job_ids(corpus_job))


def _pretrain_job(study: Study, method: str, budget: Budget, settings: Settings, state: ResultsState,
                  corpus_job: Job | None) -> Job:
    run_state = state.pretrain(method, study.corpus_run)
    budget_args = budget.args() if study.pretraining.protocol == "shared" else ()
    command = ["nnssl_pretrain", "-m", method, "-d", str(study.corpus_id), "--backbone", study.backbone,
               "--run", study.corpus_run, *budget_args, *study.pretrain_args]
    command += ["--device", "cpu"] if settings.device == "cpu" else []
    command += ["--resume"] if run_state == RESUME else []
    return Job(f"pretrain/{method}", "pretrain", tuple(command), run_state, deps=job_ids(corpus_job), gpu=True)


def _corpus_job(study: Study, settings: Settings, state: ResultsState, plan: StudyPlan) -> Job | None:
    """The job that makes the preprocessed corpus, if it is not there yet (appended to ``plan``)."""
    if state.preprocessed(study.corpus_dataset, CORPUS_PLANS):
        return None
    if settings.corpus_dir is not None:
        command = ("nnssl_prepare_corpus", "-i", str(settings.corpus_dir), "-d", str(study.corpus_id),
                   "-n", study.corpus_name, *_processes(study, "-np"))
        job = Job(f"prepare/{study.corpus_dataset}", "prepare", command, NEW)
    elif state.raw_ready(study.corpus_dataset):
        job = _plan_job(study, study.corpus_id, study.corpus_dataset, state, plans=CORPUS_PLANS)
    else:
        plan.missing.append(f"The pretraining corpus {study.corpus_dataset} is neither preprocessed nor in "
                            f"$nnUNet_raw. Make it with: nnssl_prepare_corpus -i <CT folder> -d {study.corpus_id} "
                            f"-n {study.corpus_name} (or pass --corpus-dir <CT folder>)")
        return None
    plan.jobs.append(job)
    return job


def _variant(study: Study, imported: MethodSpec | None, seed: int) -> tuple[str | None, dict[str, str]]:
    """The plans variant (name, knobs) a run fine-tunes on, None for the plans themselves: an imported encoder's
    (its file), and for a seed after the study's first a seed repeat of that (nnssl.plans_variants)."""
    name = imported.name if imported else None
    knobs = {"nnssl_encoder_file": str(imported.encoder_file)} if imported else {}
    if seed != study.seeds[0]:  # the first seed keeps the run's own model folder
        name, knobs = seed_variant_name(name, seed), {**knobs, SEED_KNOB: str(seed)}
    return name, knobs


def _variant_job(study: Study, task: TaskSpec, source: str, name: str, knobs: dict[str, str], plans: str,
                 plan_job: Job, state: ResultsState) -> Job:
    """The plans variant ``plans`` of ``source``: its own model folder, the task's preprocessed data."""
    command = ("nnssl_align_plans", "-d", str(task.dataset_id), "-pl", source, "--variant", name,
               *(arg for knob, value in knobs.items() for arg in ("--knob", f"{knob}={value}")))
    done = state.preprocessed(task.dataset, plans)
    return Job(f"plan/{task.dataset}/{plans}", "plan", command, DONE if done else NEW, deps=job_ids(plan_job))


def _fewshot_jobs(study: Study, task: TaskSpec, shots: list[int], existing: dict[str, dict],
                  fold_of: dict[tuple[int, int, int], int], plan_job: Job) -> list[Job]:
    jobs: list[Job] = []
    if not shots:
        return jobs
    recorded = {(v["base_fold"], v["shots"], v["seed"]) for v in existing.values()}
    for seed in study.seeds:
        wanted = [(fold_of[(base, n, seed)], base, n, seed) for n in shots for base in study.folds]
        state = DONE if all((base, n, seed) in recorded for _, base, n, seed in wanted) else NEW
        command = ("nnssl_fewshot", str(task.dataset_id), "--shots", *map(str, shots),
                   "--folds", *map(str, study.folds), "--seed", str(seed))
        jobs.append(Job(f"fewshot/{task.dataset}/seed{seed}", "fewshot", command, state,
                        deps=job_ids(plan_job, *jobs[-1:]), expects=tuple(wanted)))
    return jobs


def _finetune_job(study: Study, task: TaskSpec, trainer: str, pretrained: bool, fold: int, deps: tuple[str, ...],
                  settings: Settings, state: ResultsState, seed: int, baseline: BaselineSpec | None = None,
                  plans: str | None = None) -> Job:
    plans = plans or (baseline.plans_identifier if baseline else study.plans_identifier)
    configuration = baseline.configuration if baseline else study.configuration
    run_state = state.finetune(task.dataset, trainer, fold, plans, configuration)
    command = ["nnUNetv2_train", str(task.dataset_id), configuration, str(fold), "-tr", trainer]
    command += ["-p", plans] if plans != CORPUS_PLANS else []
    command += [*device_flag(settings), *(["--c"] if run_state == RESUME else [])]
    # a baseline is no SwinUNETR: of nnssl's knobs it reads at most the schedule's (nnUNetTrainer_nnsslSchedule)
    swin_knobs = {} if baseline else {"nnssl_backbone": study.backbone, SEED_KNOB: str(seed)}
    env = {**swin_knobs, **study.finetune_env, **(baseline.finetune_env if baseline else {})}
    if pretrained:
        env["nnssl_run"] = study.corpus_run  # the study's pretraining run, not whichever is newest
    name = trainer if (plans, configuration) == (study.plans_identifier, study.configuration) else \
        f"{trainer}__{plans}__{configuration}"
    return Job(f"finetune/{task.dataset}/{name}/fold_{fold}", "finetune", tuple(command), run_state,
               deps=deps, env=tuple(env.items()), gpu=True)


def _cka_job(study: Study, task: TaskSpec, trainer: str, shots: int, base: int, seed: int, fold: int,
             pair: tuple[Job, Job], settings: Settings, state: ResultsState, plans: str) -> Job:
    model = state.model_folder(task.dataset, trainer, plans)
    trainer = trainer if plans == study.plans_identifier else f"{trainer}__{plans}"  # one folder per variant
    out = settings.output / "cka" / task.dataset / trainer / f"{shots}shot_fold{base}_seed{seed}"
    command = ("nnssl_cka", f"{model}:{fold}", f"{model}:{base}", *device_flag(settings), *study.cka_args,
               "-o", str(out))
    done = state.file_exists(out / "cka.json")
    return Job(f"cka/{task.dataset}/{trainer}/{shots}shot_fold{base}_seed{seed}", "cka", command,
               DONE if done else NEW, deps=job_ids(*pair), gpu=True)
