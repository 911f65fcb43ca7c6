"""One JSON record per benchmark run: printed, and appended with an ISO date to ``benchmarks/results/<name>.jsonl``."""

from __future__ import annotations

import datetime as dt
import json
import math
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def emit_record(name: str, params: dict, metrics: dict, save: bool = True) -> dict:
    record = {
        "benchmark": name,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpus": machine_cpus()},
        "params": params,
        "metrics": metrics,
    }
    line = json.dumps(_finite(record), sort_keys=True, allow_nan=False)
    print(line, flush=True)
    if not save:
        return record
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"{name}.jsonl", "a") as f:
        f.write(line + "\n")
    return record


def _finite(value):
    """NaN/inf → None, so that records are strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def machine_cpus() -> int:
    """CPUs this process may run on (its affinity set), else the machine's count."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


_cpus = machine_cpus  # the name bench_select.py imports
