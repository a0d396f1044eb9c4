"""The benchmark: the study plan (``plans/benchmark.json``), dataset converters and the study driver."""
