"""Shared fixtures: one set of nnU-Net folders per test session, tiny synthetic data, real console scripts.

Everything expensive (planning/preprocessing, a scratch training, a pretraining corpus) is made once per test
run, also when pytest-xdist runs several workers (:func:`built_once`), and copied into each worker's session
folders; tests that change things copy what they need into their own ``tmp_path``.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from nnssl.data.synthetic import write_corpus, write_task

BIN = Path(sys.executable).parent
CT_TASK_ID, CT_TASK_NAME = 990, "SynthCT"
CORPUS_ID = 501
CORPUS_DATASET = f"Dataset{CORPUS_ID:03d}_CTcorpus"
# nnssl_pretrain options for a few-second CPU run: tiny Swin, 32^3 crops, batch 2, no worker processes
TINY_PRETRAIN = ("--backbone", "tiny", "--patch-size", "32", "32", "32", "--batch-size", "2", "--device", "cpu",
                 "--num-workers", "0")

# One share of the cores per pytest-xdist worker (make test runs two on two cores): that many torch threads in the
# worker and in every script it starts. OpenMP threads that outnumber the cores spin against each other's.
THREADS = max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
torch.set_num_threads(THREADS)

# Small-CPU settings for nnU-Net and nnssl: no worker pools, tiny network, few iterations.
TEST_ENV = {
    "nnUNet_def_n_proc": "1",
    "nnUNet_n_proc_DA": "0",
    "nnUNet_compile": "false",
    "nnssl_backbone": "tiny",
    "nnssl_num_epochs": "2",
    "nnssl_iterations_per_epoch": "3",
    "OMP_NUM_THREADS": str(THREADS),
    "PYTHONWARNINGS": "ignore",
}


def run_cli(*args: str | os.PathLike, env: dict[str, str] | None = None, timeout: float = 600,
            check: bool = True, cwd: os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run an installed console script (``nnUNetv2_train``, ``nnssl_pretrain``, ...) in a subprocess.

    ``env`` entries are added to the current environment (an entry set to None is removed there).
    With ``check``, a non-zero exit fails the test and shows the command's output.
    """
    return _run([str(BIN / str(args[0])), *map(str, args[1:])], env, timeout, check, cwd)


# nnU-Net's own nnUNetv2_train entry point with the final validation switched off (prefix this to a launcher script).
# That validation predicts every validation case with 8 mirrorings, sliding window: on the CPU it costs more than a
# tiny training itself, and tests of what training writes (checkpoints, the shared plans.json) do not read it.
NO_FINAL_VALIDATION = ("from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n"
                       "nnUNetTrainer.perform_actual_validation = lambda self, *args, **kwargs: None\n")
TRAIN_WITHOUT_VALIDATION = NO_FINAL_VALIDATION + ("import sys\n"
                                                  "from nnunetv2.run.run_training import run_training_entry\n"
                                                  "sys.argv[0] = 'nnUNetv2_train'\nrun_training_entry()\n")


def train_without_validation(*args: str | os.PathLike, env: dict[str, str] | None = None, timeout: float = 600,
                             check: bool = True) -> subprocess.CompletedProcess:
    """``nnUNetv2_train *args`` as :func:`run_cli` runs it, but without the final validation (no fold_X/validation)."""
    return _run([sys.executable, "-c", TRAIN_WITHOUT_VALIDATION, *map(str, args)], env, timeout, check, None)


def _run(command: list[str], env: dict[str, str] | None, timeout: float, check: bool,
         cwd: os.PathLike | None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    result = subprocess.run(command, env=full_env, capture_output=True, text=True, encoding="utf-8",
                            errors="replace", timeout=timeout, cwd=cwd)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {result.returncode}\n--- stdout ---\n{result.stdout[-6000:]}"
                    f"\n--- stderr ---\n{result.stderr[-6000:]}")
    return result


def plan_and_preprocess(dataset_id: int, *extra: str, env: dict[str, str] | None = None) -> None:
    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which rejects the 0 used for training
    run_cli("nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", "3d_fullres", "-np", "1",
            "--verify_dataset_integrity", *extra, env={**(env or {}), "nnUNet_n_proc_DA": "1"})


@dataclass
class NnunetFolders:
    raw: Path
    preprocessed: Path
    results: Path
    nnssl_results: Path

    @classmethod
    def under(cls, root: Path) -> "NnunetFolders":
        folders = cls(root / "raw", root / "preprocessed", root / "results", root / "nnssl_results")
        for path in vars(folders).values():
            path.mkdir(parents=True, exist_ok=True)
        return folders

    def env(self) -> dict[str, str]:
        """The folders as nnU-Net's and nnssl's environment variables."""
        return {"nnUNet_raw": str(self.raw), "nnUNet_preprocessed": str(self.preprocessed),
                "nnUNet_results": str(self.results), "nnssl_results": str(self.nnssl_results)}


def built_once(tmp_path_factory, name: str, build: Callable[[NnunetFolders], None]) -> NnunetFolders:
    """nnU-Net folders filled by ``build`` once per test run, whatever the number of pytest-xdist workers: the first
    worker to ask builds them under a file lock, the others wait and then read them. Tests never change these
    folders: each worker copies what it uses into its own session folders."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / f"built_once_{name}"
    with open(f"{root}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this worker dies
        if not (root / ".complete").is_file():
            shutil.rmtree(root, ignore_errors=True)
            build(NnunetFolders.under(root))
            (root / ".complete").touch()
    return NnunetFolders.under(root)


OUR_VARIABLES = ("nnssl_", "nnUNet_")  # the knobs and folders our code reads; libraries may set their own on import


@pytest.fixture(autouse=True)
def environment_left_as_found(request):
    """Fail the test that leaves an nnssl_/nnUNet_ variable changed in os.environ (set them through monkeypatch), and
    restore them, so that a later test on the same xdist worker cannot depend on which tests ran before it."""
    before = {k: v for k, v in os.environ.items() if k.startswith(OUR_VARIABLES)}
    yield
    after = {k: v for k, v in os.environ.items() if k.startswith(OUR_VARIABLES)}
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    for key in after.keys() - before.keys():
        del os.environ[key]
    os.environ.update(before)
    if changed:
        pytest.fail(f"{request.node.nodeid} left these environment variables changed: {changed}", pytrace=False)


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for a test of tiny networks: on a shared 2-core machine a second thread mostly waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def nnunet_env(tmp_path_factory) -> NnunetFolders:
    """Session-wide nnU-Net/nnssl folders, exported as environment variables for every subprocess."""
    folders = NnunetFolders.under(tmp_path_factory.mktemp("nnunet"))
    saved = dict(os.environ)
    os.environ.update({**folders.env(), **TEST_ENV})
    yield folders
    os.environ.clear()
    os.environ.update(saved)


@dataclass
class Task:
    dataset_id: int
    name: str
    raw: Path
    preprocessed: Path

    @property
    def dataset(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.name}"


CT_TASK = f"Dataset{CT_TASK_ID:03d}_{CT_TASK_NAME}"
SCRATCH_MODEL = "SwinUNETR_Scratch_Trainer__nnUNetPlans__3d_fullres"


def _ct_task_built(tmp_path_factory) -> NnunetFolders:
    def build(folders: NnunetFolders) -> None:
        write_task(folders.raw, CT_TASK_ID, CT_TASK_NAME, num_training=8, num_test=2, seed=1)
        plan_and_preprocess(CT_TASK_ID, env=folders.env())
    return built_once(tmp_path_factory, "ct_task", build)


@pytest.fixture(scope="session")
def ct_task(nnunet_env, tmp_path_factory) -> Task:
    """Synthetic CT task (8 training + 2 test cases), planned and preprocessed by the real nnU-Net script."""
    built = _ct_task_built(tmp_path_factory)
    raw = copy_tree(built.raw / CT_TASK, nnunet_env.raw / CT_TASK)
    return Task(CT_TASK_ID, CT_TASK_NAME, raw, copy_tree(built.preprocessed / CT_TASK, nnunet_env.preprocessed / CT_TASK))


@pytest.fixture(scope="session")
def trained_scratch(ct_task, nnunet_env, tmp_path_factory) -> Path:
    """Fold 0 of SwinUNETR_Scratch_Trainer (tiny backbone, 2 epochs x 3 iterations), trained for real."""
    def build(folders: NnunetFolders) -> None:
        copy_tree(_ct_task_built(tmp_path_factory).preprocessed / CT_TASK, folders.preprocessed / CT_TASK)
        run_cli("nnUNetv2_train", CT_TASK_ID, "3d_fullres", "0", "-tr", "SwinUNETR_Scratch_Trainer", "-device", "cpu",
                env=folders.env())
    built = built_once(tmp_path_factory, "trained_scratch", build)
    return copy_tree(built.results / CT_TASK / SCRATCH_MODEL, nnunet_env.results / CT_TASK / SCRATCH_MODEL)


@pytest.fixture(scope="session")
def pretrain_corpus(nnunet_env, tmp_path_factory) -> int:
    """Dataset501_CTcorpus: 6 synthetic CT volumes through the real nnssl_prepare_corpus (2 mm, body masks)."""
    def build(folders: NnunetFolders) -> None:
        volumes = folders.raw.parent / "volumes"
        volumes.mkdir()
        write_corpus(volumes, 6, seed=5)
        run_cli("nnssl_prepare_corpus", "-i", volumes, "-d", CORPUS_ID, "-n", "CTcorpus", "-np", "1", env=folders.env())
    built = built_once(tmp_path_factory, "pretrain_corpus", build)
    for kind in ("raw", "preprocessed"):
        copy_tree(getattr(built, kind) / CORPUS_DATASET, getattr(nnunet_env, kind) / CORPUS_DATASET)
    return CORPUS_ID


def pretrain_run(method: str, *extra: str, run: str | None = None, epochs: int = 2, steps_per_epoch: int = 5,
                 check: bool = True, env: dict[str, str] | None = None, timeout: float = 600):
    """Run the real ``nnssl_pretrain`` on the session corpus (tiny settings); returns (result, run folder).

    Needs the ``pretrain_corpus`` fixture. ``extra`` options are appended (later options win).
    """
    run = run or f"test_{method}"
    result = run_cli("nnssl_pretrain", "-m", method, "-d", str(CORPUS_ID), *TINY_PRETRAIN, "--epochs", str(epochs),
                     "--steps-per-epoch", str(steps_per_epoch), "--run", run, *extra, check=check, env=env,
                     timeout=timeout)
    return result, Path(os.environ["nnssl_results"]) / method / run


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


# The files that take longest (pytest --durations on two workers), started first so that no long file starts last
# and finishes alone; make test keeps this order (--no-loadscope-reorder). A stale list costs time, not correctness.
LONGEST_FILES = ("test_concurrent_jobs", "test_probe", "test_slurm", "test_alignment", "test_pretrain_engine",
                 "test_finetune", "test_reliability", "test_methods_contrastive_e2e", "test_cka_e2e", "test_bench_gpu",
                 "test_review_e2e", "test_compile", "test_everyday_use", "test_plans_variants", "test_foundation_e2e")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: the rest keep their order


def pytest_terminal_summary(terminalreporter):
    """Issue 10 asks the suite to print how many bad-input cases it checked."""
    passed = [r for r in terminalreporter.stats.get("passed", []) if "test_bad_inputs.py::test_bad_input[" in r.nodeid]
    if passed:
        terminalreporter.write_line(f"bad-input cases checked (exit 2, message, files unchanged): {len(passed)}")
