"""The run-folder lock: one process writes a pretraining run folder at a time, on one host or many.

Two layers, because a cluster's shared filesystem may not honour kernel locks:

1. A POSIX record lock (``fcntl.lockf``) on ``run.lock``. The kernel drops it the moment its process dies (even by
   SIGKILL), and forked children such as DataLoader workers do not inherit it, so a lingering worker never blocks
   an immediate ``--resume``. NFS honours it through its lock manager; some Lustre and FUSE mounts do not.
2. An owner record, ``run.owner.json``: host, pid, process start time, start time and a heartbeat timestamp the
   owner rewrites every :data:`HEARTBEAT_S` seconds. A second process refuses the folder while the owner lives:
   on the same host when that pid still runs the same process, on another host while the heartbeat is younger
   than :data:`STALE_AFTER_S` (hosts' clocks must agree to within that, as NTP keeps them). An older record is
   stale (its owner died without cleaning up, e.g. a crashed node) and is taken over with a warning;
   ``nnssl_pretrain --force-unlock`` takes over a record that looks alive, for when the user knows better.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from nnssl.errors import NnsslError
from nnssl.io import load_json, save_json, try_lock

log = logging.getLogger(__name__)

LOCK_FILE, OWNER_FILE = "run.lock", "run.owner.json"
HEARTBEAT_S = 30.0  # how often the owner refreshes its heartbeat
STALE_AFTER_S = 300.0  # an owner on another host whose heartbeat is older than this is presumed dead


def process_start_time(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot, from /proc): tells a reused pid from the owner. None when
    the process does not exist, is a zombie, or /proc is unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (command name)": state, ppid, ...
    return None if fields[0] in ("Z", "X") else fields[19]


def _pid_runs(pid: int, start_time: str | None) -> bool:
    if Path("/proc/self/stat").is_file():
        current = process_start_time(pid)
        return current is not None and (start_time is None or current == start_time)
    try:  # no /proc (macOS): a signal 0 only says whether the pid exists
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_alive(owner: dict[str, Any]) -> str | None:
    """Why ``owner`` (a ``run.owner.json`` record) still holds the folder, or None when it is gone."""
    if owner.get("host") == socket.gethostname():
        if _pid_runs(owner["pid"], owner.get("process_start")):
            return f"pid {owner['pid']} on this host ({owner['host']}) is still running"
        return None
    age = time.time() - float(owner.get("heartbeat") or 0)
    if age < STALE_AFTER_S:
        return (f"pid {owner['pid']} on host {owner['host']} refreshed its heartbeat {max(age, 0):.0f} s ago (it "
                f"counts as alive until {STALE_AFTER_S:.0f} s without one)")
    return None


class RunLock:
    """Exclusive ownership of a run folder for the life of the ``with`` block (see the module docstring).

    ``force`` takes over an owner record that looks alive (``--force-unlock``); a kernel lock held by a live
    process is never broken.
    """

    def __init__(self, folder: Path, force: bool = False):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.owner_path = self.folder / OWNER_FILE
        self.force = force
        self._fd: int | None = None
        self._record: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __enter__(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not try_lock(fd, self.path):
            os.close(fd)
            owner = self._read_owner()
            who = f"pid {owner['pid']} on host {owner['host']}" if owner else "another process"
            raise NnsslError(f"Run folder {self.folder} is in use by {who} (it holds {self.path}). Wait for it to "
                             f"finish, stop it, or choose another --run NAME.")
        self._fd = fd
        try:
            self._claim()
        except BaseException:
            self._release_kernel_lock()
            raise
        self._heartbeat = threading.Thread(target=self._beat, name="nnssl-run-heartbeat", daemon=True)
        self._heartbeat.start()
        return self

    def _read_owner(self) -> dict[str, Any] | None:
        try:
            owner = load_json(self.owner_path, wait_s=1.0)
        except (OSError, ValueError):
            return None  # absent, or damaged beyond a concurrent write: no usable claim
        usable = isinstance(owner, dict) and isinstance(owner.get("pid"), int) and "host" in owner
        return owner if usable else None

    def _claim(self) -> None:
        owner = self._read_owner()
        if owner is not None:
            alive = owner_alive(owner)
            if alive and not self.force:
                raise NnsslError(
                    f"Run folder {self.folder} is in use: {self.owner_path} says {alive}. Wait for it to finish or "
                    f"stop it. If that process is gone (e.g. its node crashed), run again after its heartbeat is "
                    f"{STALE_AFTER_S:.0f} s old, or now with --force-unlock.")
            if alive:
                log.warning("--force-unlock: taking over %s from its owner (%s)", self.folder, alive)
            else:
                log.warning("taking over %s from pid %s on %s, which is gone (stale %s)", self.folder,
                            owner["pid"], owner["host"], self.owner_path.name)
        now = time.time()
        self._record = {"host": socket.gethostname(), "pid": os.getpid(),
                        "process_start": process_start_time(os.getpid()),
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)),
                        "heartbeat": now, "token": uuid.uuid4().hex}
        save_json(self._record, self.owner_path)
        # Two hosts on a filesystem without working locks can claim at the same instant: the last rename wins,
        # and the loser sees another token here.
        current = self._read_owner()
        if current is None or current.get("token") != self._record["token"]:
            winner = f"pid {current['pid']} on host {current['host']}" if current else "another process"
            raise NnsslError(f"Run folder {self.folder} was claimed by {winner} at the same moment. Choose another "
                             f"--run NAME, or wait for it to finish.")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            current = self._read_owner()
            if current is None or current.get("token") != self._record["token"]:
                log.error("%s no longer names this process (another process took the run folder over with "
                          "--force-unlock); heartbeats stop", self.owner_path)
                return
            self._record["heartbeat"] = time.time()
            try:
                save_json(self._record, self.owner_path)
            except (OSError, NnsslError) as err:  # a full disk must not kill the run; the next beat retries
                log.warning("could not refresh the heartbeat in %s: %s", self.owner_path, err)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        current = self._read_owner()
        if current is not None and current.get("token") == self._record["token"]:
            self.owner_path.unlink(missing_ok=True)
        self._release_kernel_lock()

    def _release_kernel_lock(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lockf lock
            self._fd = None
