"""Does the task's plan show the encoder what it saw in pretraining? The trainer's check, recorded and logged.

The encoder file records the corpus's target spacing, normalization schemes and nnU-Net's intensity
statistics (``intensity_properties``: CTNormalization clips to [percentile_00_5, percentile_99_5] and subtracts
the mean, divides by the std). A CT channel of the task is aligned when it uses CTNormalization with the
same numbers; a channel with another scheme (MRI z-score) keeps it on purpose (the modality gap the study
measures). The spacing is aligned when no axis differs by more than :data:`SPACING_TOLERANCE`, or when the
plans record it as a deliberate override of ``nnssl_align_plans``.
"""
from __future__ import annotations

import math
from typing import Any

from nnssl.align_plans import ALIGNED_PLANS, ALIGNMENT_KEY, CT_SCHEME

SPACING_TOLERANCE = 1.5  # max ratio per axis, either way
ALIGNED, NOT_ALIGNED, UNKNOWN = "aligned", "not aligned", "unknown"
CLIP_KEYS = ("percentile_00_5", "percentile_99_5")
RELATIVE_TOLERANCE = 1e-3


def _close(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=RELATIVE_TOLERANCE, abs_tol=1e-3)


def _intensity(props: dict[str, float]) -> str:
    return (f"clip [{props['percentile_00_5']:.4g}, {props['percentile_99_5']:.4g}], mean {props['mean']:.4g}, "
            f"std {props['std']:.4g}")


def check_alignment(meta: dict[str, Any], plans: dict[str, Any], configuration: str, dataset: str) -> dict[str, Any]:
    """Compare an encoder file's ``meta`` with the task's ``plans``; returns the record for plans.json.

    ``{"status": "aligned" | "not aligned" | "unknown", "pretraining": {...}, "task": {...},
    "differences": [...], "notes": [...], "remedy": "..."}``
    """
    config = plans["configurations"][configuration]
    task_props = plans.get("foreground_intensity_properties_per_channel", {})
    pretraining = {"spacing": meta.get("spacing"), "normalization": meta.get("normalization"),
                   "intensity_properties": meta.get("intensity_properties")}
    task = {"plans": plans.get("plans_name"), "spacing": config["spacing"],
            "normalization": config["normalization_schemes"], "intensity_properties": task_props}
    record: dict[str, Any] = {"status": ALIGNED, "pretraining": pretraining, "task": task, "differences": [],
                              "notes": []}
    encoder_props = meta.get("intensity_properties") or {}
    if not meta.get("spacing") or not encoder_props:
        record["status"] = UNKNOWN
        record["notes"].append("the encoder file does not record its pretraining spacing and intensity statistics "
                               "(written by an older nnssl); re-run nnssl_pretrain to record them")
        return record
    for channel, scheme in enumerate(config["normalization_schemes"]):
        source = encoder_props.get(str(channel), encoder_props.get("0"))  # single-channel encoders feed every channel
        if scheme != CT_SCHEME:
            record["notes"].append(f"channel {channel} keeps its own {scheme} (not CT: the modality gap is measured)")
            continue
        if CT_SCHEME not in (meta.get("normalization") or []):
            record["differences"].append(f"channel {channel}: {CT_SCHEME} in fine-tuning, "
                                         f"{meta.get('normalization')} in pretraining")
            continue
        own = task_props.get(str(channel), {})
        if not all(_close(own.get(k, math.nan), source[k]) for k in (*CLIP_KEYS, "mean", "std")):
            record["differences"].append(f"channel {channel} CT intensities: task {_intensity(own)} HU vs "
                                         f"pretraining {_intensity(source)} HU")
    ratios = [max(a / b, b / a) for a, b in zip(config["spacing"], meta["spacing"])]
    worst = max(range(len(ratios)), key=ratios.__getitem__)
    if ratios[worst] > SPACING_TOLERANCE:
        text = (f"spacing {config['spacing']} mm vs pretraining {meta['spacing']} mm ({ratios[worst]:.2f}x on "
                f"axis {worst}, more than {SPACING_TOLERANCE}x)")
        override = plans.get(ALIGNMENT_KEY, {})
        if override.get("spacing_from") == "benchmark plan override" and override.get("spacing") == config["spacing"]:
            record["notes"].append(f"{text}: a deliberate override recorded by nnssl_align_plans")
        else:
            record["differences"].append(text)
    if record["differences"]:
        record["status"] = NOT_ALIGNED
        corpus = (meta.get("corpus") or ["<corpus id>"])[0]
        corpus_id = corpus[len("Dataset"):len("Dataset") + 3] if corpus.startswith("Dataset") else corpus
        record["remedy"] = (f"nnssl_align_plans -d {dataset} --corpus {corpus_id}, then train with -p {ALIGNED_PLANS}")
    return record


def describe_alignment(record: dict[str, Any]) -> str:
    """The training log's line about the check."""
    if record["status"] == ALIGNED:
        pre = record["pretraining"]
        props = (pre["intensity_properties"] or {}).get("0")
        numbers = f", CT {_intensity(props)} HU" if props and CT_SCHEME in (pre["normalization"] or []) else ""
        notes = f" ({'; '.join(record['notes'])})" if record["notes"] else ""
        return (f"nnssl: the task's plans are aligned with the encoder's pretraining: spacing {record['task']['spacing']} "
                f"vs {pre['spacing']} mm{numbers}{notes}")
    if record["status"] == UNKNOWN:
        return f"nnssl: WARNING: alignment with pretraining unknown: {'; '.join(record['notes'])}"
    return (f"nnssl: WARNING: the task's plans ({record['task']['plans']}) are not aligned with the encoder's "
            f"pretraining, so the encoder sees other numbers and scales than it learned: "
            f"{'; '.join(record['differences'])}. Align them with: {record['remedy']}")
