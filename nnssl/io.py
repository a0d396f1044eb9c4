"""Atomic writes: a reader never sees a half-written file, and a crash never replaces a good one."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_json(obj: Any, path: str | os.PathLike, indent: int = 2) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n", encoding="utf-8")


def save_text(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    import torch  # here, not at the top: light tools (nnssl_benchmark --dry-run, nnssl_fewshot) start faster

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_json(path: str | os.PathLike, fix: str | None = None) -> Any:
    """``path`` parsed as JSON. With ``fix`` (what the user should do), a file that is not valid JSON is an
    :class:`~nnssl.errors.NnsslError` naming it, instead of a ``JSONDecodeError``."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            if fix is None:
                raise
            from nnssl.errors import NnsslError

            raise NnsslError(f"{path} is not valid JSON ({err}); {fix}") from None


def _json_default(value: Any) -> Any:
    # numpy scalars/arrays and paths appear in configs and metrics
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
