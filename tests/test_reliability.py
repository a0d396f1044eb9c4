"""Issue 20: kill -9 with loader workers then an immediate --resume, the run-folder lock across hosts, full disks."""
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import BIN, CORPUS_ID, TINY_PRETRAIN, pretrain_run
from nnssl.checkpoints import load_encoder_file
from nnssl.errors import NnsslError
from nnssl.io import save_json
from nnssl.pretrain import run_lock
from nnssl.pretrain.run_folder import LATEST, CsvLog, latest_good_checkpoint, reconcile_with_log, save_checkpoint
from nnssl.pretrain.run_lock import OWNER_FILE, RunLock, process_start_time

KILLS = 10
STEPS = 30  # each killed segment is killed at its first new checkpoint (one step): room for ten of them


def _rows(run: Path) -> list[dict]:
    if not (run / "log.csv").is_file():
        return []
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def _logged_checkpoint(run: Path) -> int:
    return max([int(r["checkpoint"]) for r in _rows(run) if r.get("checkpoint")], default=0)


def _children(pid: int) -> list[int] | None:
    """Child pids of ``pid``; None where the kernel does not list them."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return None


def _start(run: str, log_file: Path, *extra: str) -> subprocess.Popen:
    command = [str(BIN / "nnssl_pretrain"), "-m", "simmim", "-d", str(CORPUS_ID), *TINY_PRETRAIN, "--num-workers",
               "1", "--epochs", "1", "--steps-per-epoch", str(STEPS), "--run", run, "--plans-override",
               "checkpoint_every=1", *extra]
    with open(log_file, "w") as stderr:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)


def _foreign_owner(heartbeat_age: float) -> dict:
    return {"host": "node-b.cluster", "pid": 4242, "process_start": "1", "started": "2026-01-01T00:00:00+0000",
            "heartbeat": time.time() - heartbeat_age, "token": "theirs"}


@pytest.mark.slow
def test_sigkill_with_loader_workers_then_immediate_resume_ten_times(pretrain_corpus, nnunet_env, tmp_path):
    run = nnunet_env.nnssl_results / "simmim" / "killed_workers"
    seen_workers = 0
    for attempt in range(KILLS):
        before = _logged_checkpoint(run)
        extra = ("--resume",) if attempt else ()
        if attempt == 6:  # an owner on another host that looks alive: refused without --force-unlock
            save_json(_foreign_owner(heartbeat_age=5), run / OWNER_FILE)
            extra += ("--force-unlock",)
        log_file = tmp_path / f"attempt_{attempt}.txt"
        process = _start("killed_workers", log_file, *extra)
        deadline = time.time() + 300
        while _logged_checkpoint(run) <= before:  # a new checkpoint: the resume was accepted and made progress
            assert process.poll() is None, f"attempt {attempt} exited {process.returncode}: {log_file.read_text()}"
            assert time.time() < deadline, log_file.read_text()
            time.sleep(0.05)
        workers = _children(process.pid)
        seen_workers += workers is None or len(workers) > 0
        process.send_signal(signal.SIGKILL)
        process.wait()
        if attempt == 6:
            assert "--force-unlock: taking over" in log_file.read_text()
    assert seen_workers == KILLS  # every kill left a live loader worker behind
    pretrain_run("simmim", "--resume", "--num-workers", "1", "--plans-override", "checkpoint_every=1",
                 run="killed_workers", epochs=1, steps_per_epoch=STEPS)
    _, uninterrupted = pretrain_run("simmim", "--num-workers", "1", run="not_killed", epochs=1,
                                    steps_per_epoch=STEPS)
    steps = [int(r["step"]) for r in _rows(run)]
    assert steps == [int(r["step"]) for r in _rows(uninterrupted)] == list(range(1, STEPS + 1))
    assert load_encoder_file(run / "encoder_final.pth").meta["step"] == \
        load_encoder_file(uninterrupted / "encoder_final.pth").meta["step"] == STEPS
    assert not (run / OWNER_FILE).exists()


def test_lock_dies_with_its_process_not_with_its_forked_children(tmp_path):
    """The owner forks a long-lived child (as DataLoader does) and is SIGKILLed: the folder is free at once."""
    script = ("import os, time\n"
              "from pathlib import Path\nfrom nnssl.pretrain.run_lock import RunLock\n"
              f"lock = RunLock(Path({str(tmp_path)!r})).__enter__()\n"
              "child = os.fork()\n"
              "if child == 0:\n    time.sleep(60)\n    os._exit(0)\n"
              "print(child, flush=True)\ntime.sleep(60)\n")
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(owner.stdout.readline())
    try:
        with pytest.raises(NnsslError, match="is in use by pid"):
            RunLock(tmp_path).__enter__()
        owner.kill()
        owner.wait()
        assert process_start_time(child) is not None  # the forked child still lives and holds the descriptor
        with RunLock(tmp_path) as lock:
            assert json.loads(lock.owner_path.read_text())["pid"] == os.getpid()
    finally:
        os.kill(child, signal.SIGKILL)


def test_owner_record_decides_across_hosts(tmp_path, monkeypatch, caplog):
    owner_file = tmp_path / OWNER_FILE
    save_json(_foreign_owner(heartbeat_age=10), owner_file)
    with pytest.raises(NnsslError, match="node-b.cluster refreshed its heartbeat 10 s ago.*--force-unlock"):
        RunLock(tmp_path).__enter__()
    assert json.loads(owner_file.read_text())["token"] == "theirs"  # a refusal changes nothing
    save_json(_foreign_owner(heartbeat_age=run_lock.STALE_AFTER_S + 1), owner_file)
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    with RunLock(tmp_path) as lock:  # stale: taken over with a warning
        first = json.loads(owner_file.read_text())
        assert (first["host"], first["pid"]) == (socket.gethostname(), os.getpid())
        time.sleep(0.5)
        assert json.loads(owner_file.read_text())["heartbeat"] > first["heartbeat"]  # the owner keeps beating
    assert "which is gone" in caplog.text and not owner_file.exists()
    save_json(_foreign_owner(heartbeat_age=1), owner_file)
    with RunLock(tmp_path, force=True):
        assert json.loads(owner_file.read_text())["pid"] == os.getpid()
    assert "--force-unlock: taking over" in caplog.text


def test_owner_record_on_this_host_is_checked_by_pid(tmp_path):
    owner_file = tmp_path / OWNER_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": process_start_time(os.getpid()),
          "heartbeat": 0, "token": "mine"}
    save_json(me, owner_file)  # a live pid on this host (heartbeats do not matter here)
    with pytest.raises(NnsslError, match=f"pid {os.getpid()} on this host .* is still running"):
        RunLock(tmp_path).__enter__()
    if Path("/proc/self/stat").is_file():  # the same pid, reused by another process, is not the owner
        save_json({**me, "process_start": "1"}, owner_file)
        with RunLock(tmp_path):
            pass
    dead = subprocess.Popen(["true"])
    dead.wait()
    save_json({**me, "pid": dead.pid}, owner_file)
    with RunLock(tmp_path):
        pass


def test_resume_says_when_the_checkpoint_is_older_than_the_log(tmp_path, caplog):
    """A crash lost the newest checkpoint's rename: log.csv records step 6, the file on disk holds step 4."""
    log = CsvLog(tmp_path / "log.csv")
    for step in range(1, 8):
        log.append({"step": step, "loss": 1.0})
        if step in (4, 6):
            log.checkpointed(step)
    save_checkpoint(tmp_path, {"step": 4})
    reconcile_with_log(tmp_path, latest_good_checkpoint(tmp_path))
    assert "holds step 4, but log.csv records a checkpoint of step 6" in caplog.text
    assert "resuming from step 4" in caplog.text
    caplog.clear()
    (tmp_path / LATEST).unlink()
    reconcile_with_log(tmp_path, latest_good_checkpoint(tmp_path))
    assert "records a checkpoint of step 6, but the folder has no checkpoint" in caplog.text
    caplog.clear()
    save_checkpoint(tmp_path, {"step": 7})  # saved after the last row: the usual case after a kill
    reconcile_with_log(tmp_path, latest_good_checkpoint(tmp_path))
    assert "WARNING" not in caplog.text


# -- full disks ----------------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 256 MiB tmpfs mounted for the test (needs root; CI runs as root and must not skip)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mount)], capture_output=True,
                          text=True) if shutil.which("mount") else None
    if made is None or made.returncode != 0:
        reason = f"cannot mount a tmpfs ({made.stderr.strip() if made else 'no mount command'}); needs root"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def _fill(disk: Path, leave: int) -> None:
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(free - leave, 0))


def test_full_disk_keeps_the_previous_results_file(small_disk):
    target = small_disk / "results.json"
    save_json({"dice": 0.5}, target)
    _fill(small_disk, leave=4096)
    with pytest.raises(NnsslError, match=rf"Could not write {target}: no space left \(ENOSPC\); .* free"):
        save_json({"dice": 0.7, "padding": "x" * 100_000}, target)
    assert json.loads(target.read_text()) == {"dice": 0.5}
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "results.json"]  # no temporary file left


def test_full_disk_during_a_checkpoint_stops_the_run_and_keeps_the_last_one(pretrain_corpus, small_disk, tmp_path):
    env = {"nnssl_results": str(small_disk)}
    command = [str(BIN / "nnssl_pretrain"), "-m", "simmim", "-d", str(CORPUS_ID), *TINY_PRETRAIN, "--epochs", "1",
               "--steps-per-epoch", "8", "--run", "full", "--plans-override", "checkpoint_every=2"]
    process = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    latest = small_disk / "simmim" / "full" / "checkpoint_latest.pth"
    deadline = time.time() + 300
    while not latest.is_file():
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.01)
    _fill(small_disk, leave=latest.stat().st_size // 2)  # room for log rows, not for the step-4 checkpoint
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr
    assert f"Could not write {latest}: no space left (ENOSPC)" in stderr and "free on its filesystem" in stderr
    assert "Traceback" not in stderr
    state = torch.load(latest, map_location="cpu", weights_only=False)
    assert state["step"] == 2
    assert not list(latest.parent.glob(".*.tmp"))
