"""Stopping a pretraining cleanly: SIGINT/SIGTERM/SIGUSR1 become a flag the loop checks between steps."""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # Ctrl-C, kill/scancel, Slurm's --signal=USR1@s


class RunInterrupted(Exception):
    """SIGINT/SIGTERM/SIGUSR1 arrived (on any rank); a consistent checkpoint was saved. ``signal_number`` says
    which."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number


class StopFlag:
    """Turns SIGINT/SIGTERM/SIGUSR1 into a flag the loop checks between steps (so a checkpoint is never
    half-made). Under DDP the ranks agree on it once per step (:meth:`Pretrainer._agreed_stop`)."""

    def __init__(self):
        self.signal_number: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopFlag":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal_number is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signal_number = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
