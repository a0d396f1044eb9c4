"""What software and hardware produced a result: recorded in a pretraining run's ``config.json`` and in the
``nnssl`` section of a fine-tuned model's ``plans.json``, compared by ``nnssl_report``.

Versions come from the installed distributions (``importlib.metadata``), so recording them imports nothing
heavy; the git commit is added when nnssl runs from a checkout (an editable install), with ``+dirty`` when
the checkout has uncommitted changes.
"""
from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

# the packages whose versions decide what a run computes; compared across runs by nnssl_report
PACKAGES = ("nnssl", "torch", "monai", "nnunetv2")
VERSION_KEYS = (*PACKAGES, "nnssl_commit", "python")


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the checkout nnssl is imported from (``<sha>+dirty`` with local changes), or None."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None  # no git on this machine: the version alone identifies the code
    return f"{sha}+dirty" if dirty else sha


def device_name(device: Any) -> str:
    """``"cuda: NVIDIA H100 80GB HBM3"`` or ``"cpu: AMD EPYC 7763 64-Core Processor"``."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"{device.type}: {_cpu_model()}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device: Any, world_size: int) -> dict[str, Any]:
    """Versions of nnssl (and its git commit), torch, MONAI, nnU-Net and Python; the device; the world size."""
    return {**{name: package_version(name) for name in PACKAGES}, "nnssl_commit": git_commit(),
            "python": platform.python_version(), "device": device_name(device), "world_size": int(world_size),
            "platform": f"{platform.system()} {platform.machine()}"}


def version_differences(records: dict[str, dict[str, Any]]) -> dict[str, dict[str, list[str]]]:
    """``{key: {value: [record names]}}`` for every version key on which ``records`` (name -> provenance)
    disagree; ``{}`` when they all used the same software."""
    differences = {}
    for key in VERSION_KEYS:
        by_value: dict[str, list[str]] = {}
        for name, record in records.items():
            by_value.setdefault(str(record.get(key)), []).append(name)
        if len(by_value) > 1:
            differences[key] = by_value
    return differences
