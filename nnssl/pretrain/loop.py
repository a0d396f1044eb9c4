"""The pretraining loop, written once for every SSL method.

Per step: learning-rate and weight-decay schedules, the method's own schedules (``on_step``), ``accumulate``
micro-batches through ``forward`` (DDP-synchronised), gradient clipping, dropped gradients of frozen
parameters, one AdamW step, then the EMA teacher update with a momentum that rises to 1 on a cosine.
Runs in one process or under ``torchrun`` (one process per GPU; gloo on CPU).
"""
from __future__ import annotations

import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from nnssl.checkpoints import load_encoder_file, save_encoder
from nnssl.data.loader import Corpus, RegionDataset, load_corpus, make_loader
from nnssl.errors import NnsslError
from nnssl.io import load_json, save_json
from nnssl.methods.base import SSLMethod
from nnssl.methods.registry import build_method, get_method
from nnssl.networks import BackbonePreset, build_encoder, get_preset
from nnssl.networks.heads import update_momentum
from nnssl.paths import nnssl_results
from nnssl import collectives
from nnssl.pretrain.config import PretrainConfig
from nnssl.pretrain.optimizer import make_adamw
from nnssl.pretrain.run_folder import (FINAL, CsvLog, latest_good_checkpoint, plot_progress, reconcile_with_log,
                                       save_checkpoint)
from nnssl.pretrain.tracking import open_tracker, require_tensorboard
from nnssl.provenance import provenance
from nnssl.pretrain.run_lock import RunLock
from nnssl.pretrain.stopping import RunInterrupted, StopFlag
from nnssl.random_state import rng_state, seed_everything, set_rng_state
from nnssl.schedules import ema_momentum, warmup_cosine

log = logging.getLogger(__name__)
# settings a resumed run may change; everything else would change the schedule being continued
RESUMABLE_CHANGES = {"num_workers", "checkpoint_every", "log_every", "device", "compile", "run", "probe", "probe_every",
                     "grad_checkpointing", "logger"}


@dataclass
class RunResult:
    folder: Path
    steps: int
    encoder: Path


def default_run_name(config: PretrainConfig) -> str:
    ids = "-".join(d.replace("Dataset", "").split("_")[0] for d in config.datasets)
    return f"{config.backbone}_d{ids}"


class Pretrainer:
    """One pretraining run. ``Pretrainer(config, resume).run()``; see ``nnssl_pretrain --help``."""

    def __init__(self, config: PretrainConfig, resume: bool = False, force_unlock: bool = False):
        self.config = config
        self.resume = resume
        self.force_unlock = force_unlock
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.device = self._setup_device()
        self.rank, self.world_size = collectives.rank(), collectives.world_size()
        self.main = self.rank == 0
        self.lr = config.scaled_lr(self.world_size)  # peak lr for this run's global batch
        get_method(config.method)  # unknown method: fail before touching any folder
        if config.logger == "tensorboard" and self.main:
            require_tensorboard()
        self.preset: BackbonePreset = get_preset(config.backbone)
        self.patch_size = list(config.patch_size or self.preset.input_size)
        if any(s % self.preset.divisor for s in self.patch_size):
            raise NnsslError(f"Patch size {self.patch_size} does not fit backbone '{self.preset.name}': every side "
                             f"must be a multiple of {self.preset.divisor}.")
        config.run = config.run or default_run_name(config)
        self.folder = nnssl_results() / config.method / config.run
        self.corpus: Corpus = load_corpus(config.datasets, config.configuration, config.plans)
        self.terms: list[str] | None = None  # the logged loss entries, known after the first logged step
        self.probe = None
        if config.probe and self.main:
            from nnssl.probe.during_pretraining import PretrainProbe

            self.probe = PretrainProbe(config.probe, config.method, self.corpus.in_channels, config.probe_every,
                                       config.seed, self.device)

    def _setup_device(self) -> torch.device:
        if self.config.device == "cuda" and not torch.cuda.is_available():
            raise NnsslError("CUDA is not available on this machine; pretrain on the CPU with --device cpu.")
        if self.distributed and not collectives.is_distributed():
            backend = "nccl" if self.config.device == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
        if self.config.device == "cuda":
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            return torch.device("cuda", local_rank)
        return torch.device("cpu")

    # -- setup -------------------------------------------------------------------------------------------
    def _build(self) -> None:
        config = self.config
        seed_everything(config.seed)  # identical initial weights on every rank
        encoder = build_encoder(self.preset, self.corpus.in_channels, drop_path_rate=config.drop_path_rate,
                                use_checkpoint=config.grad_checkpointing)
        self.method: SSLMethod = build_method(config.method, encoder, **config.method_params).to(self.device)
        if config.channels_last and self.device.type == "cuda":
            self.method.to(memory_format=torch.channels_last_3d)
        if config.compile:
            self.method.encoder.compile()  # in place: parameter names (and checkpoints) stay the same
        self.model: nn.Module = self.method
        if self.distributed:
            if self.device.type == "cuda":
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.method)
            self.model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        self.optimizer = make_adamw(self.method, self.device, self.lr, config.betas, config.weight_decay)
        amp = config.amp
        if amp == "auto":
            amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if self.device.type == "cuda" else "off"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        global_batch = config.batch_size * self.world_size * config.accumulate
        self.steps_per_epoch = config.steps_per_epoch or max(1, math.ceil(len(self.corpus) / global_batch))
        self.total_steps = config.epochs * self.steps_per_epoch
        self.samples_per_step = global_batch

    def _restore(self) -> int:
        """Load the newest good checkpoint (with --resume); returns the step to continue from."""
        found = latest_good_checkpoint(self.folder)
        if self.main:
            reconcile_with_log(self.folder, found)
        if found is None:
            return 0
        path, state = found
        self.method.load_state_dict(state["method_state"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][self.rank] if isinstance(state["rng"], list) else state["rng"])
        if self.main:
            log.info("resuming %s from %s at step %d", self.folder, path.name, state["step"])
        return int(state["step"])

    def _check_existing_run(self) -> None:
        """An existing run folder needs --resume and the settings it was started with (checked before locking,
        so a refused call changes no file)."""
        config_file = self.folder / "config.json"
        if config_file.is_file():
            if not self.resume:
                raise NnsslError(f"Run folder {self.folder} already exists. Continue it with --resume, or start "
                                 f"another with --run NEW_NAME.")
            saved = load_json(config_file)
            changed = {k for k, v in self.config.to_dict().items() if saved.get(k) != v} - RESUMABLE_CHANGES
            if changed:
                raise NnsslError(
                    f"A resumed run keeps its settings, but {sorted(changed)} differ from {config_file} "
                    f"({', '.join(f'{k}: {saved.get(k)!r} -> {getattr(self.config, k)!r}' for k in sorted(changed))}). "
                    f"Drop those options, or start a new run with --run NEW_NAME.")

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        self._check_existing_run()
        self.folder.mkdir(parents=True, exist_ok=True)
        with (RunLock(self.folder, force=self.force_unlock) if self.main else nullcontext()), StopFlag() as stop:
            if self.main:
                save_json({**self.config.to_dict(), "lr_scaled": self.lr,
                           "provenance": provenance(self.device, self.world_size)}, self.folder / "config.json")
            encoder_file = self.folder / "encoder_final.pth"
            if (self.folder / FINAL).is_file() and encoder_file.is_file():
                log.info("run %s is already finished", self.folder)
                return RunResult(self.folder, int(load_encoder_file(encoder_file).meta["step"]), encoder_file)
            self._build()
            start = self._restore() if self.resume else 0
            csv_log = CsvLog(self.folder / "log.csv",
                             mirror=open_tracker(self.config.logger, self.folder, start) if self.main else None)
            if self.main:
                csv_log.truncate_after(start if start else -1)
            try:
                self._train(start, csv_log, stop)
                self._finish(csv_log)
            finally:
                csv_log.close()
        return RunResult(self.folder, self.total_steps, self.folder / "encoder_final.pth")

    def _batches(self, start: int):
        config = self.config
        dataset = RegionDataset(self.corpus, self.method.view_spec(), self.patch_size, self.preset.patch_size,
                                seed=config.seed, rank=self.rank, world_size=self.world_size, start_step=start)
        loader = make_loader(dataset, config.batch_size, config.num_workers, pin_memory=self.device.type == "cuda")
        memory_format = torch.channels_last_3d if config.channels_last and self.device.type == "cuda" else None
        for batch in loader:
            yield {k: v.to(self.device, non_blocking=True,
                           **({"memory_format": memory_format} if memory_format and v.ndim == 5 else {}))
                   for k, v in batch.items()}

    def _train(self, start: int, csv_log: CsvLog, stop: StopFlag) -> None:
        config, method = self.config, self.method
        warmup = config.warmup_epochs * self.steps_per_epoch
        wd_end = config.weight_decay if config.weight_decay_end is None else config.weight_decay_end
        batches = self._batches(start)
        bar = tqdm(total=self.total_steps, initial=start, desc=f"{config.method} {config.run}", disable=not self.main,
                   dynamic_ncols=True)
        if self.probe:
            self.probe.start(method, start)
        skipped, tick = 0, time.perf_counter()
        for step in range(start, self.total_steps):
            epoch = step / self.steps_per_epoch
            lr = warmup_cosine(step, self.total_steps, warmup, self.lr, config.min_lr)
            wd = warmup_cosine(step, self.total_steps, 0, config.weight_decay, wd_end)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
                if group["apply_wd"]:
                    group["weight_decay"] = wd
            scheduled = method.on_step(epoch)
            outputs = self._accumulate(batches)
            finite = self._all_ranks_agree(torch.isfinite(outputs["loss"]).all())
            if finite:
                finite = self._optimizer_step(epoch)
            if not finite:
                skipped = self._handle_nonfinite(step, skipped, outputs)
                continue
            skipped = 0
            momentum = ema_momentum(method.momentum, step, self.total_steps) if method.momentum is not None else None
            for student, teacher in method.ema_pairs():
                update_momentum(student, teacher, momentum)
            done = step + 1
            probed = self.probe.after_step(method, done, self.total_steps) if self.probe else None
            tick += probed.seconds if probed else 0.0  # samples_per_s counts training only
            if self.main and (done % config.log_every == 0 or done == self.total_steps
                              or (probed and probed.dice is not None)):
                now = time.perf_counter()
                values = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in outputs.items()}
                self.terms = list(values)
                row = {"step": done, "epoch": round(done / self.steps_per_epoch, 4), "lr": lr, "weight_decay": wd,
                       "momentum": momentum if momentum is not None else "", **values, **scheduled,
                       "samples_per_s": self.samples_per_step * config.log_every / max(now - tick, 1e-9),
                       "time": f"{time.time():.2f}",  # a string: log.csv writes floats with 6 digits
                       **(probed.columns() if probed else {})}
                tick = now
                for early in self.probe.pending_rows(row) if self.probe else []:
                    csv_log.append(early)
                csv_log.append(row)
                bar.set_postfix(loss=f"{values['loss']:.4f}", samples_s=f"{row['samples_per_s']:.1f}")
            bar.update(1)
            if done % config.checkpoint_every == 0 and done < self.total_steps:
                self._save(done, csv_log)
            signal_number = self._agreed_stop(stop)
            if signal_number:
                self._save(done, csv_log)
                bar.close()
                raise RunInterrupted(f"Interrupted by signal {signal_number} at step {done}/{self.total_steps}; "
                                     f"checkpoint saved in {self.folder}. Continue with the same command plus --resume.",
                                     signal_number)
        bar.close()
        if self.probe:
            log.info(self.probe.report())

    def _accumulate(self, batches) -> dict[str, torch.Tensor]:
        accumulate = self.config.accumulate
        totals: dict[str, torch.Tensor] = {}
        for micro in range(accumulate):
            batch = next(batches)
            sync = micro == accumulate - 1 or not isinstance(self.model, DistributedDataParallel)
            with (nullcontext() if sync else self.model.no_sync()), \
                    torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                outputs = self.model(batch)
            loss = outputs["loss"] / accumulate
            if torch.isfinite(loss).all():
                self.scaler.scale(loss).backward()
            for k, v in outputs.items():
                totals[k] = totals.get(k, 0) + (v.detach() if torch.is_tensor(v) else torch.tensor(v)) / accumulate
        return totals

    def _optimizer_step(self, epoch: float) -> bool:
        """Clip, drop frozen gradients, step. Returns False (and steps nothing) if the gradients are not finite."""
        self.scaler.unscale_(self.optimizer)
        for p in self.method.frozen_parameters(epoch):
            p.grad = None
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        max_norm = self.config.grad_clip if self.config.grad_clip else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.tensor(0.0)
        if self.scaler.is_enabled():  # fp16: the scaler skips overflowing steps itself
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            return True
        finite = self._all_ranks_agree(torch.isfinite(norm))
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    def _all_ranks_agree(self, flag: torch.Tensor) -> bool:
        if not self.distributed:
            return bool(flag)
        value = flag.to(self.device, torch.float32).reshape(1)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item() > 0)

    def _agreed_stop(self, stop: StopFlag) -> int:
        """The stop signal if any rank got one (0: none). A signal may reach one rank only (Slurm signals the
        batch step, Ctrl-C one terminal), so every rank joins this one all-reduce per step and all stop at the
        same step; a rank that stopped alone would leave the others waiting in the checkpoint's gather."""
        local = stop.signal_number or 0
        if not self.distributed:
            return local
        value = torch.tensor([local], device=self.device, dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value.item())

    def _handle_nonfinite(self, step: int, skipped: int, outputs: dict[str, torch.Tensor]) -> int:
        self.optimizer.zero_grad(set_to_none=True)
        bad = [k for k, v in outputs.items() if not torch.isfinite(v).all()] or ["gradients"]
        skipped += 1
        if self.config.nonfinite == "skip" and skipped <= self.config.max_skipped:
            log.warning("step %d: non-finite %s; step skipped (%d in a row)", step + 1, bad, skipped)
            return skipped
        weights_ok = all(torch.isfinite(p).all() for p in self.method.parameters())
        if weights_ok:
            self._save(step, CsvLog(self.folder / "log.csv"))
        raise NnsslError(
            f"Non-finite {', '.join(bad)} at step {step + 1} of {self.folder}"
            f"{f' ({skipped} steps in a row)' if skipped > 1 else ''}. "
            f"{'The last good state (step %d) is saved as checkpoint_latest.pth. ' % step if weights_ok else 'The weights are no longer finite; nothing was saved over the last good checkpoint. '}"
            f"Try a lower --lr or --plans-override grad_clip=1.0, then continue with --resume; or let the run skip "
            f"such steps with --plans-override nonfinite=skip.")

    # -- outputs -----------------------------------------------------------------------------------------
    def _state(self, step: int) -> dict[str, Any]:
        rng = rng_state()
        if self.distributed:
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, rng)
            rng = gathered
        return {"step": step, "epoch": step / self.steps_per_epoch, "config": self.config.to_dict(),
                "method_state": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rng}

    def _save(self, step: int, csv_log: CsvLog, final: bool = False) -> None:
        state = self._state(step)  # every rank joins the RNG gather
        if self.main:
            save_checkpoint(self.folder, state, final=final)
            csv_log.checkpointed(step)
            if self.terms:
                plot_progress(csv_log, self.folder / "progress.png", f"{self.config.method} - {self.config.run}",
                              self.terms)
        if self.distributed:
            dist.barrier()

    def _encoder_meta(self, source: str) -> dict[str, Any]:
        return {
            "backbone": self.preset.to_dict(), "in_channels": self.corpus.in_channels, "method": self.config.method,
            "patch_size": self.patch_size, "corpus": list(self.corpus.datasets), "spacing": list(self.corpus.spacing),
            "normalization": list(self.corpus.normalization), "intensity_properties": self.corpus.intensity_properties,
            "run": self.config.run, "step": self.total_steps,
            "seed": self.config.seed, "source": source,
        }

    def _finish(self, csv_log: CsvLog) -> None:
        self._save(self.total_steps, csv_log, final=True)
        if self.main:
            save_encoder(self.folder / "encoder_final.pth", self.method.encoder, self._encoder_meta("student"))
            teacher = self.method.teacher_encoder()
            if teacher is not None:
                save_encoder(self.folder / "encoder_teacher_final.pth", teacher, self._encoder_meta("teacher"))
            (self.folder / "checkpoint_latest.pth").unlink(missing_ok=True)
            (self.folder / "checkpoint_previous.pth").unlink(missing_ok=True)
            log.info("finished %s: %s", self.folder, self.folder / "encoder_final.pth")


def pretrain(config: PretrainConfig, resume: bool = False, force_unlock: bool = False) -> RunResult:
    """Run (or continue, with ``resume``) the pretraining described by ``config``; ``force_unlock`` takes the run
    folder over from an owner that looks alive (:class:`~nnssl.pretrain.run_lock.RunLock`)."""
    trainer = Pretrainer(config, resume=resume, force_unlock=force_unlock)
    try:
        return trainer.run()
    finally:
        if collectives.is_distributed():
            dist.destroy_process_group()
