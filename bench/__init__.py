"""nnssl's performance benchmarks (issue 9): ours versus a baseline, measured in the same run.

Each ``bench/bench_<topic>.py`` exposes ``run(full: bool) -> list[dict]``; every row is
``{"name", "ours", "baseline", "unit", "ratio", "config"}`` with ``ratio > 1`` meaning ours is better
(faster, less memory, more throughput), both figures from the same inputs and seed. ``full=False`` is the
quick CPU setting (``make bench``, all modules within 15 minutes on 2 cores); ``full=True`` the paper-size
setting for a GPU. ``make bench ARGS=--full`` runs one script, ``bench/bench_gpu.py``, the GPU benchmark. :mod:`bench.run` discovers the modules, runs them, prints
the rows and merges them by name into ``bench/results.json``; ``bench/RESULTS.md`` records the tables
with the machines they came from.
"""
