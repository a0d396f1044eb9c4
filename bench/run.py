"""Run nnssl's benchmarks and merge their rows into ``bench/results.json`` (``make bench``).

    python -m bench.run                   # every bench/bench_*.py, quick CPU sizes
    python -m bench.run --full            # the GPU benchmark (bench/bench_gpu.py); refused without CUDA
    python -m bench.run --full --only swin  # a module's paper-size setting, on a GPU
    python -m bench.run --only swin cka   # some modules (topic names, i.e. bench_<topic>.py)

Rows are merged by name: a row replaces the stored row of the same name, other stored rows stay. The
harness adds ``config["machine"]`` (CPU model, cores, GPU, torch version, threads, load average) and
``config["measured"]`` (UTC time) to every row, so each figure says where and when it was taken. A module
that fails is reported and the others still run; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import logging
import math
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from nnssl.errors import NnsslError, exit_on_user_error
from nnssl.io import load_json, save_json, save_text
from nnssl.plans import did_you_mean

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results.json"
RESULTS_MD = BENCH_DIR / "RESULTS.md"  # results.json as tables, rewritten with it
ROW_KEYS = ("name", "ours", "baseline", "unit", "ratio", "config")


def discover() -> dict[str, str]:
    """Topic -> module for every ``bench/bench_<topic>.py``, sorted by topic."""
    return {path.stem[len("bench_"):]: f"bench.{path.stem}" for path in sorted(BENCH_DIR.glob("bench_*.py"))}


def select(available: dict[str, str], only: list[str] | None) -> dict[str, str]:
    """The modules named by ``--only`` (topic or module name), or all of them."""
    if not only:
        return available
    chosen = {}
    for name in only:
        topic = name.removeprefix("bench.").removeprefix("bench_").removesuffix(".py")
        if topic not in available:
            raise NnsslError(f"--only: no benchmark '{name}'.{did_you_mean(topic, list(available))} "
                             f"Available: {', '.join(available)} (the files bench/bench_<name>.py).")
        chosen[topic] = available[topic]
    return chosen


def check_rows(module: str, rows: Any) -> list[dict]:
    """``rows`` as returned by ``module.run``, checked against the row contract (see ``bench/__init__``)."""
    if not isinstance(rows, list):
        raise NnsslError(f"{module}.run returned {type(rows).__name__}; expected a list of row dicts.")
    for row in rows:
        missing = [key for key in ROW_KEYS if not isinstance(row, dict) or key not in row]
        if missing:
            raise NnsslError(f"{module}.run returned a row without {missing}: {row!r}; every row needs "
                             f"{', '.join(ROW_KEYS)}.")
        numbers = [key for key in ("ours", "baseline", "ratio")
                   if not isinstance(row[key], (int, float)) or not math.isfinite(row[key])]
        if numbers or not isinstance(row["config"], dict):
            raise NnsslError(f"{module}.run: row '{row['name']}' needs finite numbers for ours, baseline and "
                             f"ratio and a dict config; got {row!r}.")
    return rows


def machine() -> dict[str, Any]:
    """Where a figure was measured: CPU model and cores, GPU, torch version, threads, load average."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": [round(load, 2) for load in os.getloadavg()],
    }


def stamp(rows: list[dict]) -> list[dict]:
    """``rows`` with ``config["machine"]`` and ``config["measured"]`` (UTC) added: where and when they were taken."""
    where = {"machine": machine(), "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds")}
    for row in rows:
        row["config"] = {**row["config"], **where}
    return rows


def merge(rows: list[dict], path: Path = RESULTS) -> list[dict]:
    """Write ``rows`` into the results file at ``path``, replacing stored rows of the same name."""
    stored = load_json(path) if path.is_file() else []
    by_name = {row["name"]: row for row in stored}
    by_name.update({row["name"]: row for row in rows})
    merged = [by_name[name] for name in sorted(by_name)]
    save_json(merged, path)
    return merged


def markdown(rows: list[dict]) -> str:
    """``rows`` (the stored results) as RESULTS.md: a table per benchmark, each row with its machine label."""
    machines: dict[str, str] = {}
    for row in rows:
        machines.setdefault(_machine_text(row), f"M{len(machines) + 1}")
    lines = ["# nnssl benchmark results", "",
             "Written by `make bench` (`python -m bench.run`) from `bench/results.json`; do not edit by hand. "
             "`ratio` > 1: ours is better (faster, less memory, more throughput), against the baseline measured "
             "in the same run. What each row measures: the docstring of `bench/bench_<topic>.py`.", ""]
    topics: dict[str, list[dict]] = {}
    for row in rows:
        topics.setdefault(row["name"].split("_")[0], []).append(row)
    for topic, group in topics.items():
        lines += [f"## {topic} (`bench/bench_{topic}.py`)", "",
                  "| name | ours | baseline | unit | ratio | measured | machine | load |",
                  "|---|---:|---:|---|---:|---|---|---|"]
        for row in sorted(group, key=lambda r: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", r["name"])]):
            load = row["config"].get("machine", {}).get("load_average", ["?"])[0]
            lines.append(f"| {row['name']} | {row['ours']:.4g} | {row['baseline']:.4g} | {row['unit']} | "
                         f"{row['ratio']:.2f} | {row['config'].get('measured', '?')} | "
                         f"{machines[_machine_text(row)]} | {load} |")
        lines.append("")
    from bench.bench_gpu import results_section

    lines += results_section(rows)
    lines += ["## Machines", ""] + [f"- {label}: {described}" for described, label in machines.items()]
    return "\n".join(lines) + "\n"


def _machine_text(row: dict) -> str:
    m = row["config"].get("machine", {})
    return (f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('gpu') or 'no GPU'}, torch "
            f"{m.get('torch', '?')}, {m.get('threads', '?')} threads")


def format_table(rows: list[dict]) -> str:
    """The rows as a fixed-width table: name, ours, baseline, unit, ratio."""
    width = max([len("name")] + [len(row["name"]) for row in rows])
    lines = [f"{'name':<{width}}  {'ours':>10}  {'baseline':>10}  {'unit':<8} {'ratio':>6}"]
    for row in rows:
        lines.append(f"{row['name']:<{width}}  {row['ours']:>10.4g}  {row['baseline']:>10.4g}  "
                     f"{row['unit']:<8} {row['ratio']:>6.2f}")
    return "\n".join(lines)


def record(rows: list[dict], results: Path = RESULTS) -> None:
    """Merge stamped ``rows`` into ``results`` and rewrite the RESULTS.md beside it."""
    save_text(markdown(merge(rows, results)), results.with_name(RESULTS_MD.name))


def run_benchmarks(full: bool = False, only: list[str] | None = None, results: Path = RESULTS) -> list[str]:
    """Run the selected modules, print each one's table, merge its rows into ``results`` as soon as it
    finishes (an interrupted run keeps what it measured). Returns the names of the modules that failed."""
    failed = []
    for topic, module_name in select(discover(), only).items():
        print(f"== {module_name} ({'full' if full else 'quick'})", flush=True)
        start = time.perf_counter()
        try:
            rows = stamp(check_rows(module_name, importlib.import_module(module_name).run(full)))
        except Exception:  # one broken benchmark must not cost the others' figures
            traceback.print_exc()
            failed.append(topic)
            continue
        record(rows, results)
        print(format_table(rows), flush=True)
        print(f"({len(rows)} rows, {time.perf_counter() - start:.0f} s, merged into {results})\n", flush=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.run", description="Run nnssl's benchmarks (ours vs baseline).")
    parser.add_argument("--full", action="store_true",
                        help="the GPU benchmark, bench/bench_gpu.py (with --only: those modules' paper-size settings); "
                             "needs CUDA")
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"benchmarks to run: {', '.join(discover())}")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results file to merge into")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with exit_on_user_error("bench.run"):
        if args.full:
            from bench.bench_gpu import require_cuda

            require_cuda("cuda")
        # --full alone is the one GPU script; the quick CPU run skips it (it measures nothing on a CPU)
        only = args.only or (["gpu"] if args.full else [topic for topic in discover() if topic != "gpu"])
        failed = run_benchmarks(full=args.full, only=only, results=args.results)
    if failed:
        print(f"bench.run: failed: {', '.join(failed)} (tracebacks above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
