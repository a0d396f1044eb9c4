"""Networks rebuilt from what nnU-Net and nnssl wrote to disk, their layer activations, and the input patches.

A model is either an nnU-Net trained-model folder (``$nnUNet_results/DatasetXXX/<Trainer>__<plans>__<config>``,
one fold), rebuilt exactly as ``nnUNetPredictor.initialize_from_trained_model_folder`` does, or an nnssl
pretraining run folder (``$nnssl_results/<method>/<run>`` with ``encoder_final.pth``), an encoder only.

Layers (MONAI ``SwinUNETR`` module names, in order of depth):

- encoder: the five outputs of ``swinViT`` (layer-normalised, as SwinUNETR consumes them):
  ``patch_embed`` (stride 2), ``stage1`` .. ``stage4`` (strides 4-32);
- decoder: the convolutional blocks ``encoder1`` .. ``encoder4``, ``encoder10`` (skip paths and
  bottleneck) and ``decoder5`` .. ``decoder1`` (up-sampling blocks, stride 16 back to 1).

Each activation ``(B, C, x, y, z)`` is average-pooled per channel to at most ``pool`` cells along each
axis (``adaptive_avg_pool3d``; an axis shorter than ``pool`` is kept) and flattened, so a patch's
representation at a layer has at most ``C * pool**3`` features; ``pool=0`` keeps every voxel.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from nnssl.analysis.cka_options import CHECKPOINTS, DECODER_LAYERS, DEFAULT_POOL, ENCODER_LAYERS, LAYER_GROUPS
from nnssl.analysis.results import ModelFolder, parse_model_folder, trainer_method
from nnssl.checkpoints import ENCODER_FILENAME, build_pretrained_encoder, load_encoder_file
from nnssl.errors import NnsslError
from nnssl.io import load_json
from nnssl.paths import dataset_folder, nnssl_results, nnunet_preprocessed, nnunet_results

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class InputSpec:
    """Where a trained model's inputs come from: its dataset's preprocessed data and validation split."""

    dataset: str
    configuration: str
    data_identifier: str
    fold: str
    patch_size: tuple[int, int, int]
    num_channels: int


@dataclass
class Model:
    """A network to compare, its layers, and how it was made (``info`` goes into cka.json)."""

    name: str
    kind: str  # "trained" or "pretrained"
    method: str
    checkpoint: Path
    layers: tuple[str, ...]
    network: nn.Module | None = None  # None for an encoder until the input channels are known
    inputs: InputSpec | None = None  # trained models only
    pretrained_record: dict | None = None  # trained models: plans' nnssl.pretrained
    info: dict[str, Any] = field(default_factory=dict)


# -- finding and rebuilding models --------------------------------------------------------------------
def parse_model_spec(spec: str) -> tuple[Path, str | None]:
    """``FOLDER[:fold]`` -> (folder, fold or None). FOLDER may be relative to ``$nnUNet_results`` or
    ``$nnssl_results``."""
    path, fold = Path(spec), None
    if not path.exists() and ":" in spec:
        head, tail = spec.rsplit(":", 1)
        if tail.isdigit() or tail == "all":
            path, fold = Path(head), tail
    if not path.exists() and not path.is_absolute():
        for root_of in (nnunet_results, nnssl_results):
            with contextlib.suppress(NnsslError):  # an unset variable just means no such place to look
                if (root_of() / path).is_dir():
                    path = root_of() / path
                    break
    if not path.is_dir():
        raise NnsslError(f"Model folder {spec!r} does not exist (also looked under $nnUNet_results and "
                         f"$nnssl_results). Give an nnU-Net trained-model folder "
                         f"($nnUNet_results/DatasetXXX_Name/<Trainer>__<plans>__<configuration>[:fold]) or a "
                         f"pretraining run folder ($nnssl_results/<method>/<run>).")
    return path, fold


def load_model(spec: str, checkpoint: str = "final") -> Model:
    """The model named by ``spec`` (``FOLDER[:fold]``, fold 0 by default), on CPU, in eval mode.

    Trained folders are rebuilt from their ``plans.json``/``dataset.json`` and the checkpoint's
    ``trainer_name`` and ``network_weights``. Pretraining run folders are read with
    :func:`nnssl.checkpoints.load_encoder_file`; their network is built by :func:`build_encoder_model`.
    """
    if checkpoint not in CHECKPOINTS:
        raise NnsslError(f"--checkpoint {checkpoint!r} is not one of {sorted(CHECKPOINTS)}.")
    folder, fold = parse_model_spec(spec)
    if (folder / ENCODER_FILENAME).is_file():
        if fold is not None:
            raise NnsslError(f"{folder} is a pretraining run folder; it has no folds (drop ':{fold}').")
        return _pretrained_model(folder / ENCODER_FILENAME)
    if (folder / "plans.json").is_file():
        return _trained_model(parse_model_folder(folder), fold or "0", checkpoint)
    raise NnsslError(f"{folder} is neither an nnU-Net trained-model folder (no plans.json) nor a pretraining "
                     f"run folder (no {ENCODER_FILENAME}).")


def _trained_model(folder: ModelFolder, fold: str, checkpoint_kind: str) -> Model:
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    fold_dir = folder.path / f"fold_{fold}"
    if not fold_dir.is_dir():
        raise NnsslError(f"{folder.path} has no fold {fold} (no {fold_dir.name}/). Folds present: "
                         f"{folder.folds or 'none'}. Pick one with {folder.path}:FOLD.")
    path = fold_dir / CHECKPOINTS[checkpoint_kind]
    if not path.is_file():
        present = sorted(p.name for p in fold_dir.glob("checkpoint_*.pth"))
        raise NnsslError(
            f"No {path.name} in {fold_dir} (checkpoints present: {present or 'none'}). The training is "
            f"unfinished: continue it with nnUNetv2_train {folder.dataset} {folder.configuration} {fold} "
            f"-tr {folder.trainer} -p {folder.plans} --c"
            + (", or use --checkpoint best." if "checkpoint_best.pth" in present else ".")
        )
    if not (folder.path / "dataset.json").is_file():
        raise NnsslError(f"{folder.path} has no dataset.json; nnUNetv2_train writes it beside plans.json. Copy the "
                         f"dataset's dataset.json from $nnUNet_preprocessed/{folder.dataset}/ there.")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for truncated/corrupt zip files
        raise NnsslError(f"Cannot read {path}: the file is truncated or not a PyTorch checkpoint "
                         f"({type(err).__name__}: {err}).") from None
    dataset_json = load_json(folder.path / "dataset.json")
    plans_manager = PlansManager(load_json(folder.path / "plans.json"))
    configuration = blob["init_args"]["configuration"]
    configuration_manager = plans_manager.get_configuration(configuration)
    num_inputs = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    num_outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints its search path
            trainer_class = recursive_find_trainer_class_by_name(blob["trainer_name"])
    except RuntimeError:
        raise NnsslError(f"Trainer {blob['trainer_name']} of {path} cannot be found; install the package that "
                         f"defines it (nnssl trainers are found automatically).") from None
    network = trainer_class.build_network_architecture(plans_manager, configuration_manager, num_inputs,
                                                       num_outputs, enable_deep_supervision=False)
    if not hasattr(network, "swinViT"):
        raise NnsslError(f"{folder.path} holds a {type(network).__name__}, not a SwinUNETR; nnssl_cka compares "
                         f"the Swin encoder and decoder blocks of SwinUNETR models (nnssl trainers).")
    network.load_state_dict(blob["network_weights"])
    settings = configuration_manager.configuration.get("nnssl") or {}
    method = trainer_method(trainer_class)
    inputs = InputSpec(dataset=folder.dataset, configuration=configuration,
                       data_identifier=configuration_manager.data_identifier, fold=fold,
                       patch_size=tuple(int(s) for s in configuration_manager.patch_size),
                       num_channels=num_inputs)
    return Model(
        name=f"{method} fold {fold}", kind="trained", method=method, checkpoint=path,
        layers=LAYER_GROUPS["all"], network=network.eval(), inputs=inputs,
        pretrained_record=settings.get("pretrained"),
        info={"kind": "trained", "folder": str(folder.path), "fold": fold, "checkpoint": str(path),
              "trainer": blob["trainer_name"], "method": method, "dataset": folder.dataset,
              "configuration": configuration, "plans": folder.plans,
              "backbone": (settings.get("backbone") or {}).get("name"),
              "pretrained": settings.get("pretrained")},
    )


def _pretrained_model(path: Path) -> Model:
    encoder = load_encoder_file(path)
    meta = {k: encoder.meta.get(k) for k in ("method", "run", "step", "in_channels", "patch_size")}
    return Model(name=f"{encoder.method} encoder ({path.parent.name})", kind="pretrained", method=encoder.method,
                 checkpoint=encoder.path, layers=ENCODER_LAYERS,
                 info={"kind": "pretrained", "folder": str(path.parent), "checkpoint": str(encoder.path),
                       "method": encoder.method, "backbone": encoder.preset.name, **meta})


def encoder_model_of(trained: Model) -> Model:
    """The pretrained encoder a fine-tuned model started from (``pretrained.path`` in its plans)."""
    path = Path(trained.pretrained_record["path"])
    if not path.is_file():
        raise NnsslError(f"{trained.info['folder']} was fine-tuned from {path}, which no longer exists. Restore "
                         f"that pretraining run (or pass its folder as a model) to compare with it.")
    return _pretrained_model(path)


def build_encoder_model(model: Model, num_channels: int) -> None:
    """Give an encoder-only model its network for ``num_channels`` inputs (the patch embedding adapted as in
    fine-tuning, :func:`nnssl.checkpoints.adapt_patch_embedding`)."""
    from nnssl_trainers.pretrained_encoder import encoder_fingerprint

    holder = nn.Module()  # exposes the encoder as ``swinViT``, as in a SwinUNETR
    holder.swinViT = build_pretrained_encoder(load_encoder_file(model.checkpoint), num_channels)
    model.network = holder.eval()
    # the fingerprint fine-tuning recorded of the weights it started from (pretrained.encoder_sha256)
    model.info["encoder_sha256"] = encoder_fingerprint(holder.state_dict())


# -- activations ----------------------------------------------------------------------------------------
def pool_features(activation: Tensor, pool: int = DEFAULT_POOL) -> Tensor:
    """``(B, C, x, y, z)`` -> ``(B, C * x' * y' * z')``, each axis average-pooled to ``min(side, pool)``
    cells (``pool=0``: no pooling)."""
    if pool > 0:
        activation = F.adaptive_avg_pool3d(activation, [min(side, pool) for side in activation.shape[2:]])
    return activation.flatten(1)


class LayerTaps:
    """Runs a model's network on patches ``(B, C, X, Y, Z)`` and returns the pooled activation of each of
    ``layers`` (``(B, features)`` each, in the given order). Forward hooks capture the decoder blocks;
    with encoder layers only, the decoder is not run."""

    def __init__(self, network: nn.Module, layers: Sequence[str], pool: int = DEFAULT_POOL):
        unknown = [name for name in layers if name not in LAYER_GROUPS["all"]]
        if unknown:
            raise ValueError(f"unknown layers {unknown}; known: {LAYER_GROUPS['all']}")
        self.network, self.layers, self.pool = network, tuple(layers), pool
        self.run_decoder = any(name in DECODER_LAYERS for name in self.layers)
        self._captured: dict[str, Tensor] = {}
        network.swinViT.register_forward_hook(self._keep_encoder)
        for name in self.layers:
            if name in DECODER_LAYERS:
                getattr(network, name).register_forward_hook(partial(self._keep, name))

    def _keep(self, name: str, module: nn.Module, args: Any, output: Tensor) -> None:
        self._captured[name] = pool_features(output, self.pool)

    def _keep_encoder(self, module: nn.Module, args: Any, outputs: list[Tensor]) -> None:
        for name, output in zip(ENCODER_LAYERS, outputs):
            if name in self.layers:
                self._keep(name, module, args, output)

    @torch.inference_mode()
    def __call__(self, patches: Tensor) -> list[Tensor]:
        self._captured.clear()
        if self.run_decoder:
            self.network(patches)
        else:
            self.network.swinViT(patches, getattr(self.network, "normalize", True))
        return [self._captured[name] for name in self.layers]


# -- input patches --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Patch:
    """A patch of a preprocessed case: lower corner ``start`` (voxels, may be negative where the case is
    smaller than the patch and is zero-padded on both sides, as nnU-Net pads)."""

    case: str
    start: tuple[int, int, int]


class CaseReader:
    """Preprocessed cases of a dataset (nnU-Net's own dataset class for the folder's file format)."""

    def __init__(self, spec: InputSpec):
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        preprocessed_root = nnunet_preprocessed()
        dataset = dataset_folder(preprocessed_root, spec.dataset, "nnUNet_preprocessed")
        self.folder = dataset / spec.data_identifier
        self.dataset_folder = dataset
        if not self.folder.is_dir() or not any(self.folder.iterdir()):
            raise NnsslError(
                f"{spec.dataset} is not preprocessed for configuration {spec.configuration} (no data in "
                f"{self.folder}). Run: nnUNetv2_plan_and_preprocess -d {spec.dataset} -c {spec.configuration}"
            )
        try:
            self.dataset = infer_dataset_class(str(self.folder))(str(self.folder))
        except AssertionError as err:  # nnU-Net asserts one file format per folder
            raise NnsslError(f"Cannot read the preprocessed data in {self.folder}: {err}") from None

    def validation_cases(self, fold: str) -> list[str]:
        """Validation case ids of ``fold`` in the dataset's ``splits_final.json`` (``all``: every case)."""
        if fold == "all":
            return list(self.dataset.identifiers)
        path = self.dataset_folder / "splits_final.json"
        if not path.is_file():
            raise NnsslError(f"No {path}: the dataset has no cross-validation split yet. nnUNetv2_train writes it "
                             f"when it starts; or pass the cases with --case-ids.")
        splits = load_json(path)
        if int(fold) >= len(splits):
            raise NnsslError(f"{path} has folds 0-{len(splits) - 1}; fold {fold} is not among them.")
        return sorted(splits[int(fold)]["val"])

    def check_cases(self, cases: Sequence[str]) -> None:
        missing = sorted(set(cases) - set(self.dataset.identifiers))
        if missing:
            raise NnsslError(f"Cases {missing} are not in {self.folder} (present: "
                             f"{self.dataset.identifiers[:5]}{' ...' if len(self.dataset.identifiers) > 5 else ''}).")

    def shape(self, case: str) -> tuple[int, ...]:
        return tuple(self.dataset.load_case(case)[0].shape)

    def load(self, case: str) -> np.ndarray:
        """``(C, X, Y, Z)`` float32 voxels of ``case`` (nnU-Net-normalised)."""
        return np.asarray(self.dataset.load_case(case)[0][:], dtype=np.float32)


def plan_patches(shapes: dict[str, Sequence[int]], patch_size: Sequence[int], per_case: int,
                 seed: int) -> list[Patch]:
    """Up to ``per_case`` distinct patch positions per case, uniform over the positions that stay inside the
    case (seeded, case order as given); a side shorter than the patch is centred (zero padding). A case with
    fewer distinct positions gives each once: a repeated patch adds no information to CKA, only weight.
    ``shapes``: case -> ``(C, X, Y, Z)``."""
    rng = np.random.default_rng(seed)
    patches = []
    for case, shape in shapes.items():
        ranges = [max(side - size + 1, 1) for side, size in zip(shape[1:], patch_size)]
        chosen = rng.choice(math.prod(ranges), size=min(per_case, math.prod(ranges)), replace=False)
        for index in chosen:
            offsets = np.unravel_index(int(index), ranges)
            start = tuple(int(o) if side >= size else -((size - side) // 2)
                          for o, side, size in zip(offsets, shape[1:], patch_size))
            patches.append(Patch(case, start))  # type: ignore[arg-type]
    return patches


def cut_patch(volume: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """The ``(C, *size)`` block of ``volume`` (``(C, X, Y, Z)``) at ``start``; outside the volume is 0."""
    out = np.zeros((volume.shape[0], *size), dtype=np.float32)
    source, target = [slice(None)], [slice(None)]
    for lo, length, side in zip(start, size, volume.shape[1:]):
        first, last = max(lo, 0), min(lo + length, side)
        source.append(slice(first, last))
        target.append(slice(first - lo, last - lo))
    out[tuple(target)] = volume[tuple(source)]
    return out

