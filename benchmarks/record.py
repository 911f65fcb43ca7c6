"""One JSON record per benchmark run: printed, and appended with an ISO date to ``benchmarks/results/<name>.jsonl``."""

from __future__ import annotations

import datetime as dt
import json
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def emit_record(name: str, params: dict, metrics: dict) -> dict:
    record = {
        "benchmark": name,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpus": _cpus()},
        "params": params,
        "metrics": metrics,
    }
    line = json.dumps(record, sort_keys=True)
    print(line, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"{name}.jsonl", "a") as f:
        f.write(line + "\n")
    return record


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0
