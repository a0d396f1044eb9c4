"""``nnssl_probe``'s library call: resolve the encoder, probe it and the ``random`` baseline, write probe.json.

ENCODER is an encoder file, a pretraining run folder, a method name (its newest finished run under
``$nnssl_results``, or ``$nnssl_run``'s, as the fine-tuning trainers resolve it) or ``random``. Run folders
and method names give the encoder fine-tuning uses (:func:`nnssl.checkpoints.run_encoder_file`: the teacher
for DINO and iBOT). ``random`` is the same Swin preset with seeded random weights; it is probed beside every
encoder, so each probe.json holds its own baseline (``--random-from`` copies it from the probe.json of an
earlier ``nnssl_probe random`` with the same task and settings instead of probing it again).

probe.json (``{"format": "nnssl-probe", "version": 1, ...}``) holds the task and cases, the settings, and
for ``encoder`` and ``random`` the Dice per class, their mean and the encoder fingerprint (SHA-256 of the
``swinViT.*`` weights, as fine-tuning records it). It holds no times or dates: the same inputs and seed give
the same file.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nnssl.checkpoints import (ENCODER_FILES, build_pretrained_encoder, find_encoder_checkpoint, load_encoder_file,
                               run_encoder_file)
from nnssl.errors import NnsslError
from nnssl.io import load_json, save_json
from nnssl.networks import BackbonePreset, get_preset
from nnssl.networks.swin import SwinEncoder, build_encoder, encoder_state_dict
from nnssl.paths import nnssl_results
from nnssl.plans import finetune_encoder
from nnssl.probe.data import ProbeCases, ProbeData, load_probe_data
from nnssl.probe.linear import (PROBE_STAGES, ProbeSettings, dice_per_class, fit_probe, predict_case,
                               training_matrix)

log = logging.getLogger(__name__)

RANDOM = "random"
PROBE_FORMAT, PROBE_VERSION, PROBE_FILENAME = "nnssl-probe", 1, "probe.json"


@dataclass
class Encoder:
    """An encoder to probe, built for the task's input channels, and what identifies it in probe.json."""

    network: SwinEncoder
    info: dict[str, Any]


def resolve_encoder_file(spec: str) -> Path:
    """The encoder file ENCODER names (a file, a run folder, or a method's newest finished run)."""
    from nnssl.methods.registry import list_methods

    path = Path(spec)
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / "config.json").is_file() and not any(path.glob("encoder*_final.pth")):
            raise NnsslError(f"{path} is not a pretraining run folder (no config.json or encoder_final.pth). Give "
                             f"$nnssl_results/<method>/<run>, an encoder file, a method name or '{RANDOM}'.")
        return run_encoder_file(path, _run_method(path))
    if spec in list_methods():
        return find_encoder_checkpoint(spec, nnssl_results(), ENCODER_FILES[finetune_encoder(spec)])
    raise NnsslError(f"ENCODER '{spec}' is neither an encoder file, a pretraining run folder, a method name "
                     f"({', '.join(list_methods())}) nor '{RANDOM}'.")


def _run_method(folder: Path) -> str:
    config = folder / "config.json"
    if config.is_file():
        return str(load_json(config, fix="restore the run's config.json.")["method"])
    return load_encoder_file(next(folder.glob("encoder*_final.pth"))).method


def fingerprint(encoder: SwinEncoder) -> str:
    from nnssl_trainers.pretrained_encoder import encoder_fingerprint

    return encoder_fingerprint(encoder_state_dict(encoder))


def pretrained_encoder(spec: str, path: Path, in_channels: int) -> Encoder:
    """The encoder file ``path`` (that ENCODER ``spec`` named) built for ``in_channels`` inputs."""
    checkpoint = load_encoder_file(path)
    network = build_pretrained_encoder(checkpoint, in_channels)
    info = {"spec": spec, "path": str(path.resolve()), "method": checkpoint.method,
            **{k: checkpoint.meta.get(k) for k in ("run", "step", "source")},
            "backbone": checkpoint.preset.name, "encoder_sha256": fingerprint(network)}
    return Encoder(network, info)


def random_encoder(preset: BackbonePreset, in_channels: int, seed: int) -> Encoder:
    """The ``random`` baseline: ``preset`` with the weights ``torch.manual_seed(seed)`` gives MONAI's init."""
    torch.manual_seed(seed)
    network = build_encoder(preset, in_channels=in_channels).eval()
    return Encoder(network, {"spec": RANDOM, "method": RANDOM, "backbone": preset.name, "seed": seed,
                             "encoder_sha256": fingerprint(network)})


def probe_encoder(network: SwinEncoder, data: ProbeData, settings: ProbeSettings, device: torch.device,
                  progress: bool = True) -> dict[str, Any]:
    """Dice per class and their mean of a linear probe on ``network``'s frozen features (training mode and
    gradients of ``network`` are restored afterwards, so a pretraining run can probe its own encoder)."""
    was_training = network.training
    network.eval()
    try:
        matrix = training_matrix(network, data.train_images, data.train_voxels, settings.feature_batch, device)
        probe = fit_probe(matrix, data.train_labels.reshape(-1), network.out_channels[PROBE_STAGES],
                          data.num_classes, settings, device, progress)
        predictions = [predict_case(network, probe, image, data.patch_size, settings, device)
                       for image in data.val_images]
    finally:
        network.train(was_training)
    dice = dice_per_class(predictions, data.val_labels, data.num_classes)
    defined = [d for d in dice if not math.isnan(d)]
    return {"dice": {name: _json_number(d) for name, d in zip(data.labels, dice)},
            "mean_dice": _json_number(float(np.mean(defined)) if defined else math.nan)}


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 6)


def run_probe(encoder: str, cases: ProbeCases, output: str | os.PathLike, settings: ProbeSettings | None = None,
              backbone: str | None = None, device: str | None = None,
              random_from: str | os.PathLike | None = None) -> dict[str, Any]:
    """Probe ``encoder`` and ``random`` on the task ``cases`` names; write ``output/probe.json``, return its content.

    ``backbone`` is the preset of ``random`` when ENCODER is ``random`` (default: ``$nnssl_backbone``, else
    ``paper``, as the scratch trainer); otherwise ``random`` takes the encoder's preset. ``random_from``: the
    probe.json of an ``nnssl_probe random`` run with the same task, settings and preset, whose ``random`` result
    is taken instead of probing the same random encoder again (the study probes it once per task).
    """
    settings = settings or ProbeSettings()
    torch_device = _device(device)
    if random_from is not None and encoder == RANDOM:
        raise NnsslError(f"--random-from {random_from}: ENCODER is '{RANDOM}' itself; drop --random-from.")
    path = None if encoder == RANDOM else resolve_encoder_file(encoder)  # a bad ENCODER fails before reading data
    data = load_probe_data(cases)
    probed = None if path is None else pretrained_encoder(encoder, path, data.in_channels)
    if probed is not None and backbone and backbone != probed.info["backbone"]:
        raise NnsslError(f"--backbone {backbone}: the encoder {probed.info['path']} has backbone "
                         f"'{probed.info['backbone']}', and the random baseline takes the encoder's. Drop --backbone.")
    preset = get_preset(probed.info["backbone"] if probed else backbone or os.environ.get("nnssl_backbone") or "paper")
    record = {"format": PROBE_FORMAT, "version": PROBE_VERSION,
              "task": {"dataset": data.dataset, "configuration": cases.configuration, "plans": cases.plans,
                       "fold": cases.fold, "shots": cases.shots, "patch_size": list(data.patch_size),
                       "labels": data.labels, "train_cases": data.train_cases, "val_cases": data.val_cases,
                       "train_patches": len(data.train_images)},
              "settings": {**asdict(settings), "patches_per_case": cases.patches_per_case,
                           "voxels_per_patch": cases.voxels_per_patch, "device": torch_device.type}}
    shared = None if random_from is None else shared_random(Path(random_from), record, preset)
    baseline = None if shared else random_encoder(preset, data.in_channels, settings.seed)
    results = {RANDOM: shared} if shared else {}
    for name, item in (("encoder", probed), (RANDOM, baseline)):
        if item is not None:
            log.info("probing %s on %s", item.info.get("path", RANDOM), data.dataset)
            item.network.to(torch_device)
            results[name] = {**item.info, **probe_encoder(item.network, data, settings, torch_device)}
    results.setdefault("encoder", results[RANDOM])
    record.update({name: results[name] for name in ("encoder", RANDOM)})
    save_json(record, Path(output) / PROBE_FILENAME)
    return record


def shared_random(path: Path, record: dict[str, Any], preset: BackbonePreset) -> dict[str, Any]:
    """The ``random`` result of the probe.json ``path``, checked to be the one this probe would compute: same
    task and cases (``record["task"]``), same settings, same preset."""
    fix = "run it again: nnssl_probe random -d DATASET -o FOLDER with this probe's options"
    if not path.is_file():
        raise NnsslError(f"--random-from {path} does not exist; {fix}.")
    other = load_json(path, fix=fix)
    if not isinstance(other, dict) or other.get("format") != PROBE_FORMAT or RANDOM not in other:
        raise NnsslError(f"--random-from {path} is no probe.json with a '{RANDOM}' result; {fix}.")
    theirs = {**other.get("task", {}), **other.get("settings", {}), "backbone": other[RANDOM].get("backbone")}
    ours = {**record["task"], **record["settings"], "backbone": preset.name}
    differ = sorted(key for key in ours if theirs.get(key) != ours[key])
    if differ:
        raise NnsslError(f"--random-from {path} probed another setting: {', '.join(differ)} differ "
                         f"({', '.join(f'{k}: {theirs.get(k)!r} there, {ours[k]!r} here' for k in differ)}). "
                         f"Pass the same options to both probes, or drop --random-from to probe random here.")
    return other[RANDOM]


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise NnsslError("CUDA is not available on this machine; probe on the CPU with -device cpu.")
    return torch.device(name)


def summary_line(record: dict[str, Any]) -> str:
    """One line: task, fold, encoder and random mean Dice, per-class Dice of the encoder."""
    encoder, baseline, task = record["encoder"], record[RANDOM], record["task"]
    name = RANDOM if encoder["method"] == RANDOM else f"{encoder['method']} ({encoder.get('run')}, {encoder.get('source')})"
    classes = ", ".join(f"{k} {_fmt(v)}" for k, v in encoder["dice"].items())
    shots = f", {task['shots']} shots" if task["shots"] else ""
    return (f"probe {task['dataset']} fold {task['fold']}{shots}: {name} mean Dice {_fmt(encoder['mean_dice'])} "
            f"vs random {_fmt(baseline['mean_dice'])} ({classes})")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
