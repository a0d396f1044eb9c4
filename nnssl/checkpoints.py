"""Pretrained-encoder files: the one format pretraining writes and fine-tuning, export and CKA read.

``encoder_final.pth`` is a ``torch.save`` dict::

    {"format": "nnssl-encoder", "version": 1,
     "state_dict": {"swinViT.patch_embed.proj.weight": ..., ...},   # MONAI SwinUNETR names
     "meta": {"backbone": {...BackbonePreset...}, "in_channels": 1, "method": "smit",
              "patch_size": [96, 96, 96], "corpus": [...], "spacing": [...], "normalization": [...],
              "intensity_properties": {"0": {"mean": ..., "std": ..., "percentile_00_5": ..., ...}},
              "run": "...", "step": 1234, "source": "student"}}

``SwinUNETR(...).load_state_dict(state_dict, strict=False)`` fills exactly the encoder.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nnssl.errors import NnsslError
from nnssl.io import save_torch
from nnssl.networks.presets import BackbonePreset
from nnssl.networks.swin import ENCODER_PREFIX, SwinEncoder, build_encoder

ENCODER_FORMAT = "nnssl-encoder"
ENCODER_VERSION = 1
ENCODER_FILENAME = "encoder_final.pth"
ENCODER_FILES = {"student": ENCODER_FILENAME, "teacher": "encoder_teacher_final.pth"}  # by nnssl.plans.ENCODER_CHOICES
RUN_ENV = "nnssl_run"  # names the run a fine-tuning trainer takes instead of the newest one
PATCH_EMBED_KEY = ENCODER_PREFIX + "patch_embed.proj.weight"


@dataclass
class EncoderCheckpoint:
    """A validated encoder file: weights under ``swinViT.*`` names and the metadata to rebuild it."""

    path: Path
    state_dict: dict[str, Tensor]
    meta: dict[str, Any]

    @property
    def preset(self) -> BackbonePreset:
        return BackbonePreset.from_dict(self.meta["backbone"])

    @property
    def in_channels(self) -> int:
        return int(self.meta.get("in_channels", 1))

    @property
    def method(self) -> str:
        return str(self.meta.get("method", "unknown"))


def save_encoder(path: str | os.PathLike, encoder: nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``encoder``'s weights (``swinViT.*`` names) and ``meta`` atomically to ``path``."""
    if "backbone" not in meta:
        raise ValueError("encoder metadata needs 'backbone' (a BackbonePreset dict)")
    state = {ENCODER_PREFIX + k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
    save_torch({"format": ENCODER_FORMAT, "version": ENCODER_VERSION, "state_dict": state, "meta": meta}, path)
    return Path(path)


def load_encoder_file(path: str | os.PathLike) -> EncoderCheckpoint:
    """Read and validate an nnssl encoder file; foreign or damaged files raise an NnsslError saying so."""
    path = Path(path)
    if not path.is_file():
        raise NnsslError(f"Encoder checkpoint {path} does not exist.")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # torch raises many types for truncated/corrupt zip files
        raise NnsslError(f"Cannot read {path}: the file is truncated or not a PyTorch checkpoint "
                         f"({type(err).__name__}: {err}). Re-create it or pick another run.") from None
    if not isinstance(blob, dict) or blob.get("format") != ENCODER_FORMAT:
        hint = ""
        if isinstance(blob, dict) and "network_weights" in blob:
            hint = " It is an nnU-Net training checkpoint; nnU-Net's own -pretrained_weights path loads those."
        elif isinstance(blob, dict) and ("state_dict" in blob or "student" in blob or "model" in blob):
            hint = (" It looks like a MONAI/Swin UNETR or SMIT checkpoint: convert it first with "
                    f"nnssl_import {path} -o encoder_final.pth")
        raise NnsslError(f"{path} is not an nnssl encoder checkpoint (no format '{ENCODER_FORMAT}').{hint}")
    if blob.get("version", 0) > ENCODER_VERSION:
        raise NnsslError(f"{path} was written by a newer nnssl (format version {blob['version']}); upgrade nnssl.")
    meta, state = blob.get("meta"), blob.get("state_dict")
    if not isinstance(meta, dict) or "backbone" not in meta or not isinstance(state, dict) or not state:
        raise NnsslError(f"{path} is damaged: it lacks the encoder weights or the 'backbone' metadata.")
    checkpoint = EncoderCheckpoint(path=path, state_dict=state, meta=meta)
    embedding = state.get(PATCH_EMBED_KEY)
    if embedding is not None and embedding.shape[1] != checkpoint.in_channels:
        raise NnsslError(f"{path} is damaged: its metadata says {checkpoint.in_channels} input channel(s) but the "
                         f"patch embedding {PATCH_EMBED_KEY} takes {embedding.shape[1]}. Re-create the file.")
    return checkpoint


def is_nnunet_checkpoint(path: str | os.PathLike) -> bool:
    """True for an nnU-Net training checkpoint (a dict with ``network_weights``); False for anything else."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # missing, truncated or foreign files are judged by load_encoder_file later
        return False
    return isinstance(blob, dict) and "network_weights" in blob


def find_encoder_checkpoint(method: str, results_root: Path, filename: str = ENCODER_FILENAME) -> Path:
    """``$nnssl_results/<method>/<run>/<filename>``: the run named by ``$nnssl_run``, else the newest.

    Raises an NnsslError naming the paths searched and the command that creates a checkpoint.
    """
    method_dir = results_root / method
    run = os.environ.get(RUN_ENV)
    if run:
        searched = [method_dir / run / filename]
        found = [p for p in searched if p.is_file()]
    else:
        searched = [method_dir / "*" / filename]
        found = sorted(method_dir.glob(f"*/{filename}"), key=lambda p: p.stat().st_mtime)
    if not found:
        runs = sorted(p.name for p in method_dir.iterdir() if p.is_dir()) if method_dir.is_dir() else []
        unfinished = f" Runs without a finished encoder: {runs}." if runs else ""
        raise NnsslError(
            f"No pretrained '{method}' encoder found. Searched: {', '.join(str(p) for p in searched)}."
            f"{unfinished}\nCreate one with: nnssl_pretrain -m {method} -d <corpus dataset id>"
            f"{' --run ' + run if run else ''}\n"
            f"or pass a file with: nnUNetv2_train ... -pretrained_weights /path/to/{filename}"
        )
    return found[-1]


def run_encoder_file(folder: Path, method: str) -> Path:
    """The encoder file of a finished run folder that fine-tuning and probing use for ``method``: the teacher's
    where :func:`nnssl.plans.finetune_encoder` says so (DINO, iBOT), else the student's."""
    from nnssl.plans import finetune_encoder

    choice = finetune_encoder(method)
    path = folder / ENCODER_FILES[choice]
    if not path.is_file():
        raise NnsslError(f"{folder} has no {path.name} (the {choice} encoder, which '{method}' fine-tuning uses): the "
                         f"run is unfinished. Continue it with: nnssl_pretrain -m {method} -d <corpus dataset id> "
                         f"--run {folder.name} --resume")
    return path


def build_pretrained_encoder(checkpoint: EncoderCheckpoint, in_channels: int) -> SwinEncoder:
    """The checkpoint's Swin encoder for ``in_channels`` inputs (patch embedding adapted as in fine-tuning,
    :func:`adapt_patch_embedding`), in eval mode."""
    holder = nn.Module()  # exposes the encoder as ``swinViT``, the key prefix the loader expects
    holder.swinViT = build_encoder(checkpoint.preset, in_channels=in_channels)
    load_encoder_weights(holder, checkpoint)
    return holder.swinViT.eval()


def adapt_patch_embedding(weight: Tensor, in_channels: int) -> Tensor:
    """Patch-embedding weight ``(F, C_src, p, p, p)`` for ``in_channels`` inputs.

    Rule: average over the source channels, repeat for each target channel and divide by the number of
    target channels. A task whose C channels all carry the same image then gets exactly the pretrained
    response, and each channel (e.g. 4 MRI sequences) starts with an equal share of it.
    :func:`load_encoder_weights` applies it to single-channel encoders only (``C_src == 1``).
    """
    if weight.shape[1] == in_channels:
        return weight
    mean = weight.mean(dim=1, keepdim=True)
    return mean.repeat(1, in_channels, 1, 1, 1) / in_channels


def describe_preset_difference(ours: BackbonePreset, theirs: BackbonePreset) -> str:
    """``''`` for equal presets, else what differs besides the name, e.g. ``" (window_size 4 vs 7)"``."""
    if ours == theirs:
        return ""
    fields = [f"{name} {getattr(ours, name)} vs {getattr(theirs, name)}" for name in ours.__dataclass_fields__
              if name not in ("name", "description") and getattr(ours, name) != getattr(theirs, name)]
    return f" ({', '.join(fields)})" if fields else f" (the same architecture, named '{ours.name}' and '{theirs.name}')"


def unwrap(network: nn.Module) -> nn.Module:
    """The plain module inside DDP and torch.compile wrappers."""
    module = getattr(network, "module", network)  # DistributedDataParallel
    return getattr(module, "_orig_mod", module)  # torch.compile's OptimizedModule


def load_encoder_weights(network: nn.Module, checkpoint: EncoderCheckpoint) -> int:
    """Copy every ``swinViT.*`` tensor of ``checkpoint`` into ``network`` (a SwinUNETR); returns the count.

    Strict where it matters: the file and the network must have the same ``swinViT.*`` keys with the same
    shapes, else an NnsslError lists the missing, unexpected and mismatched keys. Input channels: a
    single-channel encoder is adapted to a network with C input channels by
    :func:`adapt_patch_embedding` (repeat, divide by C); an encoder pretrained on several channels only
    loads into a network with the same number. Nothing outside ``swinViT`` is touched.
    """
    module = unwrap(network)
    target = {k: v for k, v in module.state_dict().items() if k.startswith(ENCODER_PREFIX)}
    source = dict(checkpoint.state_dict)
    if PATCH_EMBED_KEY in source and PATCH_EMBED_KEY in target:
        have, need = source[PATCH_EMBED_KEY].shape[1], target[PATCH_EMBED_KEY].shape[1]
        if have not in (1, need):
            raise NnsslError(
                f"Encoder checkpoint {checkpoint.path} was pretrained on {have} input channels, but this task has "
                f"{need}. Only single-channel encoders are adapted to other channel counts (which of {have} "
                f"pretraining channels should feed which task channel is unknown). Use an encoder pretrained on "
                f"1 or {need} channels."
            )
        source[PATCH_EMBED_KEY] = adapt_patch_embedding(source[PATCH_EMBED_KEY], need)
    missing = sorted(set(target) - set(source))
    unexpected = sorted(set(source) - set(target))
    mismatched = sorted(k for k in set(target) & set(source) if source[k].shape != target[k].shape)
    if missing or unexpected or mismatched:
        details = [f"missing: {_first(missing)}" if missing else "",
                   f"unexpected: {_first(unexpected)}" if unexpected else "",
                   f"wrong shape: {[(k, tuple(source[k].shape), tuple(target[k].shape)) for k in mismatched[:3]]}"
                   if mismatched else ""]
        raise NnsslError(
            f"Encoder checkpoint {checkpoint.path} does not fit this SwinUNETR "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} wrong-shape swinViT "
            f"tensors; {'; '.join(d for d in details if d)}). It was pretrained with backbone "
            f"'{checkpoint.preset.name}'; build the network with the same preset."
        )
    module.load_state_dict({k: source[k] for k in target}, strict=False)
    return len(target)


def _first(keys: list[str], n: int = 5) -> str:
    return f"{keys[:n]}{' ...' if len(keys) > n else ''}"
