"""``nnssl_cka``: feature reuse between trained SwinUNETR models, and against the encoders they started from.

Every model sees the same inputs: patches of the networks' patch size (from the first trained model's
plans) cut at seeded, recorded positions from preprocessed validation cases of its dataset and fold.
Activations are captured at every Swin stage and decoder block (:mod:`nnssl.analysis.activations`),
pooled, and compared by minibatch CKA (:class:`nnssl.analysis.cka.MinibatchCKA`, Nguyen, Raghu &
Kornblith 2021) over all layer pairs of all models at once, so memory does not grow with the number of
patches. Writes ``cka.json``, ``cka.csv``, ``cka_heatmap.png`` and ``cka_diagonal.png``.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from nnssl.analysis import plots
from nnssl.analysis.activations import (DEFAULT_POOL, LAYER_GROUPS, CaseReader, InputSpec, LayerTaps,
                                        Model, build_encoder_model, cut_patch, encoder_model_of, load_model,
                                        plan_patches)
from nnssl.analysis.cka import DEFAULT_BATCH_SIZE, KERNELS, MIN_BATCH, MinibatchCKA, minibatch_sizes
from nnssl.analysis.cka_options import DEFAULT_PATCHES_PER_CASE
from nnssl.analysis.tables import write_csv
from nnssl.errors import NnsslError
from nnssl.io import save_json

log = logging.getLogger(__name__)

FORWARD_BATCH = 2  # patches per forward pass; activations of a 128^3 paper-preset SwinUNETR fill GPU memory fast
FEW_PATCHES = 40  # below this, debiased CKA is noisy and may leave [0, 1]


def run_cka(models: Sequence[str], output: str | Path, checkpoint: str = "final", cases: int | None = None,
            case_ids: Sequence[str] | None = None, layers: str = "all", vs_pretrained: bool = False,
            patches_per_case: int = DEFAULT_PATCHES_PER_CASE, batch_size: int = DEFAULT_BATCH_SIZE,
            pool: int = DEFAULT_POOL, kernel: str = "linear", rbf_sigma: float = 0.8, seed: int = 0,
            device: str | None = None, patch_size: Sequence[int] | None = None) -> dict[str, Any]:
    """Compare ``models`` (``FOLDER[:fold]`` specs) layer by layer; returns what ``cka.json`` holds.

    Every pair of models is compared; with ``vs_pretrained`` also each fine-tuned model with the encoder
    file its plans record (``pretrained.path``).
    ``cases`` takes the first N validation cases (sorted ids) of the first trained model's fold;
    ``case_ids`` names cases instead. ``batch_size``: patches per HSIC minibatch (the patches are split
    into ``max(1, N // batch_size)`` near-equal minibatches). ``pool``: see
    :func:`nnssl.analysis.activations.pool_features`. ``patch_size``: instead of the plans' patch size
    (multiples of 32; smaller patches give more distinct positions in small cases).
    """
    _check_arguments(cases, case_ids, layers, patches_per_case, batch_size, pool, kernel, rbf_sigma)
    loaded = [load_model(spec, checkpoint) for spec in models]
    inputs = _shared_inputs(loaded)
    if patch_size is not None:
        inputs = dataclasses.replace(inputs, patch_size=tuple(int(s) for s in patch_size))
    pairs, encoder_pairs = _pairs(loaded, vs_pretrained)
    for model in loaded:
        if model.network is None:
            build_encoder_model(model, inputs.num_channels)
        encoder = model.network.swinViT
        encoder.check_input_shape(inputs.patch_size)
        if model.kind == "trained" and max(inputs.patch_size) < 2 * encoder.preset.stride:
            raise NnsslError(f"Patch size {inputs.patch_size} leaves SwinUNETR's bottleneck one voxel, which its "
                             f"instance norm cannot normalise: give one side at least {2 * encoder.preset.stride} "
                             f"(--patch-size).")
    _name_uniquely(loaded)
    selected = [[name for name in LAYER_GROUPS[layers] if name in model.layers] for model in loaded]
    for model, names in zip(loaded, selected):
        if not names:
            raise NnsslError(f"{model.name} ({model.info['folder']}) is an encoder only; it has no {layers} layers. "
                             f"Use --layers encoder or --layers all.")

    reader = CaseReader(inputs)
    chosen = list(case_ids) if case_ids else reader.validation_cases(inputs.fold)[:cases]
    reader.check_cases(chosen)
    patches = plan_patches({case: reader.shape(case) for case in chosen}, inputs.patch_size, patches_per_case, seed)
    if len(patches) < MIN_BATCH:
        raise NnsslError(f"{len(chosen)} case(s) give {len(patches)} distinct patch(es) of {inputs.patch_size}; CKA's "
                         f"unbiased HSIC needs at least {MIN_BATCH}. Raise --patches-per-case or --cases, or take "
                         f"smaller patches than the cases (--patch-size, multiples of 32).")
    if len(patches) < len(chosen) * patches_per_case:
        log.warning("%d distinct patch position(s) of %s in %d case(s), not %d: the cases are barely larger than "
                    "the patch (a smaller --patch-size gives more).", len(patches), inputs.patch_size, len(chosen),
                    len(chosen) * patches_per_case)
    if len(patches) < FEW_PATCHES:
        log.warning("CKA over %d patches only: the debiased estimate is noisy and may leave [0, 1]; use at least %d "
                    "(--patches-per-case, --cases).", len(patches), FEW_PATCHES)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    matrix = _stream(loaded, selected, reader, patches, inputs.patch_size, batch_size, pool, kernel, rbf_sigma,
                     torch.device(device))

    offsets = np.cumsum([0] + [len(names) for names in selected])
    comparisons = []
    for i, j in pairs:
        block = matrix[offsets[i]:offsets[i + 1], offsets[j]:offsets[j + 1]]
        comparisons.append({
            "a": loaded[i].name, "b": loaded[j].name, "layers_a": selected[i], "layers_b": selected[j],
            "cka": block.tolist(),
            "diagonal": {name: float(block[selected[i].index(name), selected[j].index(name)])
                         for name in selected[i] if name in selected[j]},
        })
        if (i, j) in encoder_pairs:
            comparisons[-1]["encoder_unchanged"] = _encoder_unchanged(loaded[i], loaded[j])
    settings = {"checkpoint": checkpoint, "layers": layers, "vs_pretrained": vs_pretrained, "kernel": kernel,
                "rbf_sigma": rbf_sigma if kernel == "rbf" else None, "pool": pool, "batch_size": batch_size,
                "num_minibatches": len(minibatch_sizes(len(patches), batch_size)), "patches_per_case": patches_per_case,
                "num_patches": len(patches), "patch_size": list(inputs.patch_size), "seed": seed,
                "dataset": inputs.dataset, "configuration": inputs.configuration, "fold": inputs.fold,
                "cases": chosen, "device": device}
    result = {"settings": settings,
              "models": [{"name": m.name, "layers": names, **m.info} for m, names in zip(loaded, selected)],
              "patches": [{"case": p.case, "start": list(p.start)} for p in patches],
              "comparisons": comparisons}
    _write_outputs(result, Path(output))
    return result


def _check_arguments(cases: int | None, case_ids: Sequence[str] | None, layers: str,
                     patches_per_case: int, batch_size: int, pool: int, kernel: str, rbf_sigma: float) -> None:
    if layers not in LAYER_GROUPS:
        raise NnsslError(f"--layers {layers!r} is not one of {sorted(LAYER_GROUPS)}.")
    if kernel not in KERNELS:
        raise NnsslError(f"--kernel {kernel!r} is not one of {list(KERNELS)}.")
    if cases is not None and case_ids:
        raise NnsslError("Give --cases N or --case-ids, not both.")
    if cases is not None and cases < 1:
        raise NnsslError(f"--cases must be at least 1, got {cases}.")
    if patches_per_case < 1:
        raise NnsslError(f"--patches-per-case must be at least 1, got {patches_per_case}.")
    if batch_size < MIN_BATCH:
        raise NnsslError(f"--batch-size must be at least {MIN_BATCH} (unbiased HSIC), got {batch_size}.")
    if pool < 0:
        raise NnsslError(f"--pool must be 0 (no pooling) or a positive grid size, got {pool}.")
    if rbf_sigma <= 0:
        raise NnsslError(f"--rbf-sigma must be positive (a fraction of the median distance), got {rbf_sigma}.")


def _shared_inputs(loaded: list[Model]) -> InputSpec:
    """The inputs of the first trained model; every trained model must read the same preprocessed data."""
    trained = [m for m in loaded if m.kind == "trained"]
    if not trained:
        raise NnsslError("At least one model must be an nnU-Net trained-model folder: its dataset's validation "
                         "cases and its patch size define the inputs every model sees.")
    inputs = trained[0].inputs
    for other in trained[1:]:
        if (other.inputs.dataset, other.inputs.data_identifier) != (inputs.dataset, inputs.data_identifier):
            raise NnsslError(f"Models must share their inputs: {other.info['folder']} uses {other.inputs.dataset} "
                             f"({other.inputs.data_identifier}), {trained[0].info['folder']} uses "
                             f"{inputs.dataset} ({inputs.data_identifier}).")
    return inputs


def _pairs(loaded: list[Model], vs_pretrained: bool) -> tuple[list[tuple[int, int]], set[tuple[int, int]]]:
    """Index pairs to compare: every pair of models, and with ``vs_pretrained`` each fine-tuned model with
    its encoder (appended to ``loaded``; one entry per encoder file). Also returns the latter pairs."""
    if len(loaded) < 2 and not vs_pretrained:
        raise NnsslError("Give two or more model folders to compare, or --vs-pretrained to compare a "
                         "fine-tuned model with the encoder it started from.")
    pairs = list(itertools.combinations(range(len(loaded)), 2))
    if not vs_pretrained:
        return pairs, set()
    trained = [m for m in loaded if m.kind == "trained"]
    finetuned = [m for m in trained if m.pretrained_record]
    if not finetuned:
        raise NnsslError(f"--vs-pretrained compares fine-tuned models with the encoders they started from, but "
                         f"{', '.join(m.info['folder'] for m in trained)} record no pretrained encoder in their "
                         f"plans (trained from scratch).")
    for model in trained:
        if not model.pretrained_record:
            log.info("%s was trained from scratch: no encoder to compare it with", model.name)
    index = {m.checkpoint.resolve(): i for i, m in enumerate(loaded) if m.kind == "pretrained"}
    encoder_pairs = set()
    for model in finetuned:
        encoder = encoder_model_of(model)
        if encoder.checkpoint.resolve() not in index:
            loaded.append(encoder)
            index[encoder.checkpoint.resolve()] = len(loaded) - 1
        encoder_pairs.add((loaded.index(model), index[encoder.checkpoint.resolve()]))
    both_ways = encoder_pairs | {(j, i) for i, j in encoder_pairs}  # an encoder may also be given as a folder
    return [p for p in pairs if p not in both_ways] + sorted(encoder_pairs), encoder_pairs


def _encoder_unchanged(trained: Model, encoder: Model) -> bool | None:
    """Whether the encoder file still holds the weights fine-tuning started from (None: not recorded)."""
    recorded = (trained.pretrained_record or {}).get("encoder_sha256")
    if recorded is None:
        return None
    if recorded != encoder.info["encoder_sha256"]:
        log.warning("%s changed since %s was fine-tuned from it (SHA-256 of the swinViT weights differs); "
                    "the comparison is with the file as it is now.", encoder.checkpoint, trained.name)
    return recorded == encoder.info["encoder_sha256"]


def _name_uniquely(models: list[Model]) -> None:
    counts: dict[str, int] = {}
    for model in models:
        counts[model.name] = counts.get(model.name, 0) + 1
        if counts[model.name] > 1:
            model.name = f"{model.name} #{counts[model.name]}"


def _stream(models: list[Model], selected: list[list[str]], reader: CaseReader, patches: list,
            patch_size: tuple[int, int, int], batch_size: int, pool: int, kernel: str, rbf_sigma: float,
            device: torch.device) -> np.ndarray:
    """Run every model on the patches, one case at a time, and accumulate CKA over all layers of all models.

    Minibatch ``k`` holds consecutive patches; forward passes never straddle two minibatches, and the
    pooled activations of only the current minibatch are kept.
    """
    taps = [LayerTaps(model.network.to(device), names, pool) for model, names in zip(models, selected)]
    accumulator = MinibatchCKA(sum(len(names) for names in selected), kernel=kernel, rbf_sigma=rbf_sigma)
    sizes = minibatch_sizes(len(patches), batch_size)
    batch_of = np.repeat(np.arange(len(sizes)), sizes)
    pending: list[list[torch.Tensor]] = []
    by_case = [(case, [i for i, p in enumerate(patches) if p.case == case])
               for case in dict.fromkeys(p.case for p in patches)]
    for case, indices in tqdm(by_case, desc="nnssl_cka", unit="case"):
        volume = reader.load(case)
        for _, run in itertools.groupby(indices, key=lambda i: batch_of[i]):
            run = list(run)
            for start in range(0, len(run), FORWARD_BATCH):
                chunk = run[start:start + FORWARD_BATCH]
                x = torch.from_numpy(np.stack([cut_patch(volume, patches[i].start, patch_size) for i in chunk]))
                pending.append([feature for tap in taps for feature in tap(x.to(device))])
                if sum(len(f[0]) for f in pending) == sizes[batch_of[chunk[-1]]]:
                    accumulator.update([torch.cat(layer) for layer in zip(*pending)])
                    pending = []
    return accumulator.result().numpy()


def _write_outputs(result: dict[str, Any], output: Path) -> None:
    settings = result["settings"]
    output.mkdir(parents=True, exist_ok=True)
    save_json(result, output / "cka.json")
    rows = []
    for comparison in result["comparisons"]:
        for (i, layer_a), (j, layer_b) in itertools.product(enumerate(comparison["layers_a"]),
                                                            enumerate(comparison["layers_b"])):
            rows.append({"model_a": comparison["a"], "model_b": comparison["b"], "layer_a": layer_a,
                         "layer_b": layer_b, "cka": comparison["cka"][i][j], "kernel": settings["kernel"],
                         "pool": settings["pool"], "num_patches": settings["num_patches"],
                         "batch_size": settings["batch_size"], "seed": settings["seed"],
                         "dataset": settings["dataset"], "fold": settings["fold"],
                         "checkpoint": settings["checkpoint"]})
    write_csv(rows, output / "cka.csv")
    plots.cka_heatmaps(result["comparisons"], output / "cka_heatmap.png", kernel=settings["kernel"])
    plots.cka_diagonal(result["comparisons"], LAYER_GROUPS["all"], output / "cka_diagonal.png")
    log.info("nnssl_cka: wrote cka.json, cka.csv, cka_heatmap.png and cka_diagonal.png to %s", output)
