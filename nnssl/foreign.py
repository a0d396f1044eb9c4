"""Detect MIC-DKFZ's nnssl (https://github.com/MIC-DKFZ/nnssl), another project that installs the same import
package ``nnssl`` and uses the same ``nnssl_results`` variable with another folder layout.

Installed into the same environment, one package's files overwrite the other's, and the failures that follow
(missing modules, a results folder the other tool cannot read) say nothing about the cause. Our commands
check for it first and stop with a message that does.
"""
from __future__ import annotations

import re
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from nnssl.errors import NnsslError

# console scripts of MIC-DKFZ's nnssl (its pyproject.toml); ours never declares them
FOREIGN_SCRIPTS = ("nnssl_train", "nnssl_plan_and_preprocess", "nnssl_preprocess")
# modules of its package layout that ours does not have (nnssl/run/run_training.py, nnssl/training/nnsslTrainer/)
FOREIGN_MODULES = ("run/run_training.py", "training/nnsslTrainer")
REMEDY = ("The two projects cannot share one Python environment: uninstall the other one (pip uninstall nnssl, "
          "then reinstall this one: pip install --force-reinstall .), or give each its own virtual environment.")


@lru_cache(maxsize=1)
def foreign_installation() -> str | None:
    """What shows that MIC-DKFZ's nnssl is installed beside this one, or None."""
    scripts = [ep for ep in metadata.entry_points(group="console_scripts")
               if ep.name in FOREIGN_SCRIPTS and ep.value.startswith("nnssl.")]
    if scripts:
        return f"its console script {scripts[0].name} ({scripts[0].value})"
    package = Path(__file__).resolve().parent
    found = [name for name in FOREIGN_MODULES if (package / name).exists()]
    if found:
        return f"its modules in {package} ({', '.join(found)})"
    return None


def check_foreign_installation() -> None:
    found = foreign_installation()
    if found is not None:
        raise NnsslError(f"MIC-DKFZ's nnssl, a different project with the same package name 'nnssl', is installed "
                         f"in this environment: {found}. {REMEDY}")


def check_results_layout(root: Path) -> None:
    """``$nnssl_results`` holds ``<method>/<run>/`` here; MIC-DKFZ's nnssl writes ``DatasetXXX_Name/...`` there."""
    theirs = sorted(p.name for p in root.glob("Dataset*") if p.is_dir() and re.fullmatch(r"Dataset\d{3}_.+", p.name))
    if theirs:
        raise NnsslError(f"nnssl_results={root} holds {theirs[:3]}: the layout of MIC-DKFZ's nnssl (its nnssl_train "
                         f"writes DatasetXXX_Name/ folders), not of this nnssl (<method>/<run>/). Both projects read "
                         f"the variable nnssl_results; point it to a separate folder for this one, e.g. "
                         f"export nnssl_results={root.parent / 'nnssl_swin_results'}")
