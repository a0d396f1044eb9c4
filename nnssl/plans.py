"""Access to the declarative plans in ``plans/`` (installed as ``nnssl/plans``)."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from nnssl.errors import NnsslError
from nnssl.io import load_json


def plans_dir() -> Path:
    """The installed ``nnssl/plans``; in an editable install, the checkout's ``plans/``."""
    installed = Path(__file__).resolve().parent / "plans"
    if installed.is_dir():
        return installed
    checkout = Path(__file__).resolve().parent.parent / "plans"
    if checkout.is_dir():
        return checkout
    raise NnsslError(f"nnssl's plans folder is missing (looked in {installed} and {checkout}); "
                     f"reinstall nnssl: pip install --force-reinstall nnssl")


def load_plan(relative_path: str) -> dict[str, Any]:
    path = plans_dir() / relative_path
    if not path.is_file():
        raise NnsslError(f"Plan file {path} does not exist.")
    return load_json(path, fix="restore it from the nnssl repository (git checkout plans/) or fix the edit.")


ENCODER_CHOICES = ("student", "teacher")


def finetune_encoder(method: str) -> str:
    """Which encoder of a ``method``'s pretraining run fine-tuning (and probing) uses: "student" or "teacher".

    Its plan's ``finetune_encoder`` says, with the reason under ``_sources``; the student where it says nothing.
    """
    path = plans_dir() / "pretrain" / f"{method}.json"
    choice = load_plan(f"pretrain/{method}.json").get("finetune_encoder", "student") if path.is_file() else "student"
    if choice not in ENCODER_CHOICES:
        raise NnsslError(f"{path}: finetune_encoder is {choice!r}; expected one of {list(ENCODER_CHOICES)}.")
    return choice


def did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" Did you mean '{close[0]}'?" if close else ""
