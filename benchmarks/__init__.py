"""Benchmark scripts (run as ``python benchmarks/<name>.py``; each prints JSON and appends a dated record under
``benchmarks/results/``). A package so that tests import their helpers as ``benchmarks.<name>``."""
