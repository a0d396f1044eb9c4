"""CSV and Markdown tables from lists of row dicts (the analysis tools' outputs)."""
from __future__ import annotations

import csv
import io
import math
import os
from typing import Any, Sequence

from nnssl.io import save_text


def write_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike, columns: Sequence[str] | None = None) -> None:
    """Write ``rows`` atomically as CSV; columns in first-seen order unless given. NaN/None -> empty cell."""
    columns = list(columns or dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell(row.get(key)) for key in columns})
    save_text(buffer.getvalue(), path)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], digits: int = 3) -> str:
    """A GitHub Markdown table of ``rows`` (floats rounded to ``digits``; missing or NaN shown as "-")."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [_cell(row.get(key), digits) for key in columns]
        lines.append("| " + " | ".join(cell if cell != "" else "-" for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any, digits: int | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}" if digits is not None else repr(value)
    return str(value)
