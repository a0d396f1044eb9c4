"""Swin encoders in and out of nnssl: MONAI Swin UNETR checkpoints, MONAI's tutorial and VoCo's public
weights, and the SMIT reference implementation.

Four foreign layouts are understood (``module.``, ``backbone.``, ``swinViT.``, ``swin_vit.`` and ``encoder.``
prefixes are removed first):

- ``monai``: MONAI ``SwinTransformer`` names, ``patch_embed.*``, ``layers{1-4}.0.blocks.{j}.*``,
  ``layers{1-4}.0.downsample.*``. Tang et al.'s ``model_swinvit.pt`` (CVPR 2022) stores them under
  ``state_dict`` with ``module.`` prefixes and the MLP as ``mlp.fc1/fc2``; current MONAI calls the MLP
  ``mlp.linear1/linear2`` and a whole ``SwinUNETR`` state dict has them under ``swinViT.``.
- ``monai-tutorial``: the self-supervised Swin UNETR checkpoint of MONAI's tutorials
  (``ssl_pretrained_weights.pth``, Project-MONAI/tutorials): under ``model``, ``encoder.patch_embed.*`` and
  ``encoder.layers{1-4}.0.0.*`` (one module level more than MONAI's network), with ``encoder.mask_token``,
  ``encoder.norm.*`` and the ``out.*`` reconstruction head, which the encoder does not use.
- ``voco``: VoCo's released SwinUNETR weights (Wu et al. CVPR 2024, Luffy03/Large-Scale-Medical): a whole
  MONAI ``SwinUNETR(use_v2=True)`` state dict, at the top level or under ``state_dict``. Version 2 adds a
  residual convolution block before each Swin stage (``swinViT.layers{1-4}c.*``); nnssl's Swin is version 1
  (the study's encoder), so those blocks are reported as dropped and the imported encoder computes
  without them.
- ``smit``: the SMIT reference implementation (Jiang et al., MICCAI 2022; its Swin comes from
  TransMorph): ``layers.{i}.blocks.{j}.*`` and ``layers.{i}.downsample.*`` for stage i = 0..3 (its
  pretraining Swin has no merging after the last stage), ``mlp.fc1/fc2``, learnable output norms
  ``norm{i}`` and a patch-embedding norm; saved under ``state_dict``, or under ``student``/``teacher``
  with a ``module.backbone.`` prefix.

Patch merging concatenates the eight voxels of each 2x2x2 block before its norm and linear reduction,
and the two implementations concatenate them in different orders (``x5`` and ``x6`` swapped). The
shapes agree, so the weights would load without complaint and compute something else: SMIT merging
weights are permuted into MONAI's order (:func:`merge_permutation`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nnssl.checkpoints import (ENCODER_FILENAME, ENCODER_FORMAT, describe_preset_difference, load_encoder_file,
                               save_encoder)
from nnssl.errors import NnsslError
from nnssl.io import save_torch
from nnssl.networks.presets import BackbonePreset, get_preset, list_presets
from nnssl.networks.swin import SwinEncoder
from nnssl_trainers.imported import IMPORTED

logger = logging.getLogger(__name__)

# (depth, height, width) offset of x0..x7 inside each 2x2x2 block, in concatenation order:
# monai/networks/nets/swin_unetr.py PatchMerging.forward (the v0.9 order SwinUNETR uses by default) ...
MONAI_MERGE_ORDER = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1))
# ... and SMIT's (TransMorph's) PatchMerging.forward: x5 = x[:, 0::2, 1::2, 1::2], x6 = x[:, 1::2, 0::2, 1::2].
SMIT_MERGE_ORDER = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1), (1, 0, 1), (1, 1, 1))

CONTAINER_KEYS = ("state_dict", "student", "model")  # where checkpoints keep their weights, in search order
WRAPPER_PREFIXES = ("module.", "backbone.", "swinViT.", "swin_vit.", "encoder.")
LAYOUTS = {  # name -> how to recognise it (tensor names once wrapper prefixes are removed)
    "monai": "MONAI SwinTransformer/SwinUNETR v1 or Tang et al.'s model_swinvit.pt: layers1.0.blocks.*",
    "monai-tutorial": "MONAI tutorial ssl_pretrained_weights.pth: encoder.layers1.0.0.blocks.*",
    "voco": "VoCo (Large-Scale-Medical) SwinUNETR v2: swinViT.layers1.0.blocks.* and swinViT.layers1c.*",
    "smit": "SMIT reference implementation: layers.0.blocks.*",
}
# who made checkpoints of that layout; VoCo is no method of the study, so its encoders go to the imported trainer
DEFAULT_METHOD = {"monai": "swinssl", "monai-tutorial": "swinssl", "voco": IMPORTED, "smit": "smit"}
EXPORT_FORMAT = "nnssl-monai-swinunetr-encoder"
USAGE = """\
import torch
from monai.networks.nets import SwinUNETR
ckpt = torch.load("{path}", weights_only=False)
net = SwinUNETR(out_channels=NUM_CLASSES, **ckpt["swinunetr_kwargs"])
net.load_state_dict(ckpt["state_dict"], strict=False)  # fills net.swinViT; the decoder keeps its initialisation
"""


def merge_permutation(source_order: tuple, target_order: tuple) -> list[int]:
    """Slot order that turns patch-merging weights of ``source_order`` into ``target_order``.

    Slot k of the target concatenation holds the voxel at offset ``target_order[k]``; its weights are the
    source's slot holding the same offset. For SMIT -> MONAI this is ``[0, 1, 2, 3, 4, 6, 5, 7]``.
    """
    return [source_order.index(offset) for offset in target_order]


def reorder_merging(tensor: Tensor, permutation: list[int]) -> Tensor:
    """Reorder the eight C-wide slots on the last axis of a merging norm ``(8C,)`` or reduction ``(2C, 8C)``.

    The layer norm's statistics are over all 8C channels, so permuting its affine weights together with
    its input leaves the output unchanged.
    """
    slots = tensor.reshape(*tensor.shape[:-1], 8, tensor.shape[-1] // 8)
    return slots[..., permutation, :].reshape(tensor.shape).clone()


def swinunetr_kwargs(preset: BackbonePreset, in_channels: int) -> dict[str, Any]:
    """``monai.networks.nets.SwinUNETR`` arguments (all but ``out_channels``) whose ``swinViT`` is this encoder."""
    return {"in_channels": in_channels, "feature_size": preset.feature_size, "depths": list(preset.depths),
            "num_heads": list(preset.num_heads), "window_size": preset.window_size, "patch_size": preset.patch_size,
            "qkv_bias": preset.qkv_bias, "mlp_ratio": preset.mlp_ratio, "spatial_dims": 3,
            "downsample": "merging", "use_v2": False, "patch_norm": False}


def export_encoder(source: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write an nnssl encoder (file, or run folder holding ``encoder_final.pth``) as a MONAI checkpoint.

    The file holds ``state_dict`` (``swinViT.*`` tensors), ``swinunetr_kwargs`` (the SwinUNETR arguments
    that make them fit), ``usage`` (the three lines that load it) and ``nnssl_meta``.
    """
    source, output = Path(source), Path(output)
    path = source / ENCODER_FILENAME if source.is_dir() else source
    if not path.exists():
        raise NnsslError(f"{source} is neither an encoder file nor a run folder with {ENCODER_FILENAME}. "
                         f"Pass $nnssl_results/<method>/<run> or its {ENCODER_FILENAME}.")
    checkpoint = load_encoder_file(path)
    if output.resolve() == path.resolve():
        raise NnsslError(f"-o {output} would overwrite the encoder being exported; choose another file name.")
    save_torch({"format": EXPORT_FORMAT, "state_dict": dict(checkpoint.state_dict),
                "swinunetr_kwargs": swinunetr_kwargs(checkpoint.preset, checkpoint.in_channels),
                "usage": USAGE.format(path=output), "nnssl_meta": checkpoint.meta}, output)
    return output


@dataclass
class ImportReport:
    """What :func:`import_encoder` took from a foreign checkpoint, and what it could not."""

    output: Path
    layout: str  # a key of LAYOUTS
    container: str  # the checkpoint entry the weights came from, e.g. "state_dict" or "student"
    preset: BackbonePreset
    backbone_inferred: bool  # True: read from tensor shapes; False: given with --backbone
    method: str
    in_channels: int
    loaded: int  # encoder tensors taken from the source
    initialized: list[str] = field(default_factory=list)  # not in the source layout: MONAI's initialisation
    unexpected: list[str] = field(default_factory=list)  # source tensors that are not encoder weights: unused
    dropped: list[str] = field(default_factory=list)  # source encoder tensors nnssl's Swin has no place for

    def summary(self) -> str:
        how = "inferred from tensor shapes" if self.backbone_inferred else "given with --backbone"
        lines = [f"Wrote {self.output}: {self.loaded} encoder tensors from the '{self.container}' entry "
                 f"({self.layout} layout), method '{self.method}', {self.in_channels} input channel(s).",
                 f"Backbone '{self.preset.name}' ({how}): feature_size {self.preset.feature_size}, depths "
                 f"{list(self.preset.depths)}, heads {list(self.preset.num_heads)}, window {self.preset.window_size}."]
        if self.initialized:
            lines.append(f"Not in the source, initialised as MONAI does ({len(self.initialized)}): "
                         f"{', '.join(self.initialized)}")
        if self.dropped:
            lines.append(f"WARNING: dropped {len(self.dropped)} source encoder tensor(s) nnssl's Swin has no place "
                         f"for, so the imported encoder computes differently from the source"
                         f"{' (the residual convolution blocks of SwinUNETR v2; nnssl uses v1)' if self.layout == 'voco' else ''}"
                         f": {', '.join(self.dropped)}")
        if self.unexpected:
            shown = ", ".join(self.unexpected[:10]) + (" ..." if len(self.unexpected) > 10 else "")
            lines.append(f"Unused source tensors (heads, output norms, ...; {len(self.unexpected)}): {shown}")
        return "\n".join(lines)


def import_encoder(source: str | os.PathLike, output: str | os.PathLike, method: str | None = None,
                   backbone: str | None = None, key: str | None = None) -> ImportReport:
    """Turn a MONAI/Tang or SMIT checkpoint into an nnssl ``encoder_final.pth`` (see the module docstring).

    Every encoder tensor must come from the source with the right shape, except those the source layout
    does not have (SMIT's pretraining Swin lacks the merging after stage 4), which keep MONAI's
    initialisation (seed 0); anything else missing is an error. Source tensors that are not used are
    listed in the report and in the file's metadata, never ignored in silence. The backbone preset is
    inferred from tensor shapes unless ``backbone`` names one (which must then match). The method recorded
    is ``method``, else the one an ``nnssl_export`` file carries, else ``smit`` for the SMIT layout and
    ``swinssl`` (Tang et al.'s Swin UNETR pretraining) for the MONAI layout.
    """
    source, output = Path(source), Path(output)
    if method is not None:
        _check_method(method)
    blob = _load_foreign(source)
    if isinstance(blob, dict) and blob.get("format") == ENCODER_FORMAT:
        raise NnsslError(f"{source} already is an nnssl encoder file; use it as it is (e.g. nnUNetv2_train ... "
                         f"-pretrained_weights {source}).")
    container, weights = _find_weights(blob, key, source)
    tensors = _strip_wrappers(weights, source)
    layout = _detect_layout(tensors, source)
    mapped, unexpected = _from_smit(tensors) if layout == "smit" else _from_monai(tensors, layout)
    inferred = infer_preset(mapped, source)
    preset = inferred
    if backbone is not None:
        preset = get_preset(backbone)
        difference = describe_preset_difference(
            preset, dataclasses.replace(inferred, name=preset.name, input_size=preset.input_size))
        if difference:
            raise NnsslError(f"{source} does not have the shape of backbone '{backbone}'{difference} (the "
                             f"checkpoint's value second). Leave out --backbone to use the shapes found.")
    in_channels = int(mapped["patch_embed.proj.weight"].shape[1])
    exported_by_nnssl = blob.get("nnssl_meta", {}) if isinstance(blob, dict) else {}
    method = _check_method(method or exported_by_nnssl.get("method") or DEFAULT_METHOD[layout])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = SwinEncoder(preset, in_channels=in_channels)
    target = encoder.state_dict()
    wrong = [(k, tuple(mapped[k].shape), tuple(v.shape)) for k, v in target.items()
             if k in mapped and mapped[k].shape != v.shape]
    if wrong:
        raise NnsslError(f"{source}: {len(wrong)} tensor(s) have other shapes than backbone '{preset.name}' needs "
                         f"(name, file, needed): {wrong[:3]}.")
    missing = [k for k in target if k not in mapped]
    structural = [k for k in missing if layout == "smit" and k.startswith("layers4.0.downsample.")]
    absent = [k for k in missing if k not in structural]
    if absent:
        raise NnsslError(f"{source} lacks {len(absent)} encoder tensor(s) of the {layout} layout: {absent[:5]}"
                         f"{' ...' if len(absent) > 5 else ''}. The file is incomplete or not a Swin encoder.")
    extra = [k for k in mapped if k not in target]
    dropped = sorted(k for k in extra if re.match(r"patch_embed\.|layers\d", k))  # would change what the encoder computes
    encoder.load_state_dict({**target, **{k: mapped[k] for k in target if k in mapped}}, strict=True)
    report = ImportReport(output=output, layout=layout, container=container, preset=preset,
                          backbone_inferred=backbone is None, method=method, in_channels=in_channels,
                          loaded=len(target) - len(structural), initialized=sorted(structural),
                          unexpected=sorted(unexpected + [k for k in extra if k not in dropped]), dropped=dropped)
    save_encoder(output, encoder, {
        "backbone": preset.to_dict(), "in_channels": in_channels, "method": method, "run": None, "step": None,
        "normalization": None, "source": "imported",
        "imported": {"path": str(source.resolve()), "layout": layout, "container": container,
                     "initialized": report.initialized, "dropped": report.dropped, "unexpected": report.unexpected},
    })
    return report


def infer_preset(state: dict[str, Tensor], source: Path) -> BackbonePreset:
    """The Swin shape of MONAI-named encoder tensors; a known preset (plans/backbones.json) when one matches."""
    embedding = state.get("patch_embed.proj.weight")
    if embedding is None or embedding.dim() != 5:
        raise NnsslError(f"{source} has no 3D patch embedding (patch_embed.proj.weight); it is not a 3D Swin encoder.")
    stages = sorted({int(m[1]) for k in state if (m := re.match(r"layers(\d+)\.0\.", k))})
    if stages != [1, 2, 3, 4]:
        raise NnsslError(f"{source} has Swin stages {stages}; SwinUNETR needs exactly 4.")
    depths, heads, windows = [], [], set()
    for stage in stages:
        blocks = {int(m[1]) for k in state if (m := re.match(rf"layers{stage}\.0\.blocks\.(\d+)\.", k))}
        table = state.get(f"layers{stage}.0.blocks.0.attn.relative_position_bias_table")
        if not blocks or table is None:
            raise NnsslError(f"{source}: stage {stage} has no attention blocks with relative position tables.")
        depths.append(max(blocks) + 1)
        heads.append(int(table.shape[1]))
        windows.add(int(table.shape[0]))
    rows = windows.pop() if len(windows) == 1 else 0
    side = round(rows ** (1 / 3))  # a table has (2 * window - 1) ** 3 rows
    if side % 2 == 0 or side**3 != rows:
        raise NnsslError(f"{source}: the relative position tables do not describe one cubic attention window.")
    feature_size = int(embedding.shape[0])
    architecture = {
        "feature_size": feature_size, "depths": tuple(depths), "num_heads": tuple(heads), "window_size": (side + 1) // 2,
        "patch_size": int(embedding.shape[2]), "qkv_bias": "layers1.0.blocks.0.attn.qkv.bias" in state,
        "mlp_ratio": float(state["layers1.0.blocks.0.mlp.linear1.weight"].shape[0] / feature_size),
    }
    for name in list_presets():
        known = get_preset(name)
        if all(getattr(known, k) == v for k, v in architecture.items()):
            return known
    divisor = architecture["patch_size"] ** 5
    return BackbonePreset(name="imported", input_size=(4 * divisor,) * 3,
                          description=f"inferred from the tensor shapes of {source.name}", **architecture)


def _load_foreign(source: Path) -> Any:
    if not source.is_file():
        raise NnsslError(f"Checkpoint {source} does not exist.")
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # weights_only refuses Python objects some trainers save beside the weights (SMIT: argparse.Namespace)
        logger.info("%s holds Python objects besides tensors; loading it with full unpickling", source)
    except Exception as err:  # torch raises many types for truncated or non-checkpoint files
        raise NnsslError(f"Cannot read {source}: the file is truncated or not a PyTorch checkpoint "
                         f"({type(err).__name__}: {err}).") from None
    try:
        return torch.load(source, map_location="cpu", weights_only=False)
    except Exception as err:
        raise NnsslError(f"Cannot read {source} ({type(err).__name__}: {err}).") from None


def _is_weights(value: Any) -> bool:
    return isinstance(value, dict) and any(isinstance(v, Tensor) for v in value.values())


def _find_weights(blob: Any, key: str | None, source: Path) -> tuple[str, dict[str, Any]]:
    top = sorted(blob) if isinstance(blob, dict) else []
    if key is not None:
        if not isinstance(blob, dict) or not _is_weights(blob.get(key)):
            raise NnsslError(f"--key {key}: {source} has no weights under '{key}'; its top-level entries: {top}.")
        return key, blob[key]
    if _is_weights(blob):
        return "(top level)", blob
    for name in CONTAINER_KEYS:
        if isinstance(blob, dict) and _is_weights(blob.get(name)):
            return name, blob[name]
    raise NnsslError(f"No weights found in {source}: expected a state dict, or one under {list(CONTAINER_KEYS)}; "
                     f"its top-level entries: {top}. Name the entry with --key NAME (e.g. --key teacher).")


def _strip_wrappers(weights: dict[str, Any], source: Path) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    for name, value in weights.items():
        if not isinstance(value, Tensor):
            continue
        short = name
        while short.startswith(WRAPPER_PREFIXES):
            short = short.split(".", 1)[1]
        if short in tensors:
            raise NnsslError(f"{source}: two tensors are both '{short}' once wrappers are removed ({name}); "
                             f"the file mixes two models. Pick one with --key.")
        tensors[short] = value
    return tensors


def _detect_layout(tensors: dict[str, Tensor], source: Path) -> str:
    def has(pattern: str) -> bool:
        return any(re.match(pattern, k) for k in tensors)

    smit, monai = has(r"layers\.\d+\."), has(r"layers[1-4]\.0\.")
    if smit != monai:
        if smit:
            return "smit"
        if has(r"layers[1-4]\.0\.0\."):
            return "monai-tutorial"
        return "voco" if has(r"layers[1-4]c\.") else "monai"
    known = "; ".join(f"{name}: {description}" for name, description in LAYOUTS.items())
    raise NnsslError(f"{source} is in no Swin checkpoint layout nnssl_import knows (first keys, wrapper prefixes "
                     f"removed: {sorted(tensors)[:5]}). Known layouts: {known}. A checkpoint with the weights under "
                     f"another entry: name it with --key NAME.")


def _rename_mlp(name: str) -> str:
    return re.sub(r"\.mlp\.fc([12])\.", r".mlp.linear\1.", name)


def _from_monai(tensors: dict[str, Tensor], layout: str) -> tuple[dict[str, Tensor], list[str]]:
    if layout == "monai-tutorial":  # the tutorial's encoder nests each stage one module deeper
        tensors = {re.sub(r"^layers([1-4])\.0\.0\.", r"layers\1.0.", k): v for k, v in tensors.items()}
    return {_rename_mlp(k): v for k, v in tensors.items()}, []


def _from_smit(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    permutation = merge_permutation(SMIT_MERGE_ORDER, MONAI_MERGE_ORDER)
    mapped, unexpected = {}, []
    for name, value in tensors.items():
        stage = re.match(r"layers\.(\d+)\.(.*)", name)
        if stage:
            name = f"layers{int(stage[1]) + 1}.0.{stage[2]}"
        elif not name.startswith("patch_embed."):
            unexpected.append(name)
            continue
        if ".downsample." in name:
            value = reorder_merging(value, permutation)
        mapped[_rename_mlp(name)] = value
    return mapped, unexpected


def _check_method(method: str) -> str:
    from nnssl.methods.registry import trainer_names  # the methods a fine-tuning trainer exists for
    from nnssl.plans import did_you_mean

    known = sorted([*trainer_names(), IMPORTED])
    if method not in known:
        raise NnsslError(f"--method {method} is not an nnssl method.{did_you_mean(method, known)} "
                         f"Known: {', '.join(known)} ({IMPORTED}: SwinUNETR_Imported_Trainer).")
    return method
