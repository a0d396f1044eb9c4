"""Fine-tunings that save when they are told to stop.

Slurm signals a job before its time limit or at preemption (``nnssl_benchmark --executor slurm`` passes that on
as SIGTERM), the local executor stops its commands with SIGTERM on Ctrl-C, and ``kill`` sends SIGTERM. Stock
nnU-Net dies there and ``--c`` falls back to the last ``checkpoint_latest.pth``, up to ``save_every`` epochs
(50 by default) earlier. With :class:`SaveOnSignal` the trainer finishes its current iteration, writes
``checkpoint_latest.pth`` and exits with status 128 + the signal number; ``nnUNetv2_train ... --c`` then restarts
the interrupted epoch, so only that epoch's iterations are lost.
"""
from __future__ import annotations

import signal
from os.path import join

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class SaveOnSignal:
    """Mixin for nnU-Net trainers: ``class T(SaveOnSignal, nnUNetTrainer)``."""

    _stop_signal: int | None = None

    def on_train_start(self) -> None:
        super().on_train_start()
        for number in STOP_SIGNALS:
            signal.signal(number, self._request_stop)

    def _request_stop(self, signum: int, frame) -> None:
        # acted on between iterations: a checkpoint written inside an optimizer step would mix two states
        self._stop_signal = signum

    def train_step(self, batch: dict) -> dict:
        result = super().train_step(batch)
        if self._stop_signal is not None:
            self._save_and_exit()
        return result

    def _save_and_exit(self) -> None:
        interrupted = self.current_epoch
        self.print_to_log_file(f"nnssl: {signal.Signals(self._stop_signal).name} in epoch {interrupted}: saving "
                               f"checkpoint_latest.pth and stopping; nnUNetv2_train ... --c restarts epoch {interrupted}")
        self.current_epoch -= 1  # nnU-Net stores current_epoch + 1 as the epoch --c starts with
        self.save_checkpoint(join(self.output_folder, "checkpoint_latest.pth"))
        self.current_epoch = interrupted
        for loader in (self.dataloader_train, self.dataloader_val):
            getattr(loader, "_finish", lambda: None)()  # augmentation workers, as nnU-Net's on_train_end stops them
        raise SystemExit(128 + self._stop_signal)
