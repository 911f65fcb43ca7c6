"""On a machine with a CUDA GPU: every ``gpu`` test, then a short extraction throughput measurement; one record.

Runs ``pytest -m gpu`` (the CUDA projector and generator, GPU extraction actors, GPU serve replica options, GPU
faiss k-means) and ``benchmarks/bench_extract.py`` at a small row count (the Ray arm then uses GPU actors:
``extract.num_gpus_per_actor`` defaults to 1 when the cluster has a GPU, and the bare loop runs the model on CUDA).
Appends ``{"params", "metrics"}`` to ``benchmarks/results/gpu_check.jsonl`` with the test counts, every skip reason
and the extraction record's metrics. Exits non-zero when a test fails, the extraction fails or no CUDA device is
visible; a failure is recorded with its error, never as a skip.

Usage: ``python benchmarks/gpu_check.py [--num-samples 600]`` (``make gpu-check``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from record import emit_record  # noqa: E402


def run_gpu_tests() -> dict:
    """``pytest -m gpu`` in a subprocess; counts and skip reasons from its JUnit XML."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "gpu.xml"
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", f"--junitxml={report}"],
                              cwd=ROOT, capture_output=True, text=True)
        tail = (proc.stdout + proc.stderr)[-4000:]
        if not report.exists():
            return {"exit_code": proc.returncode, "error": tail}
        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        skipped = {}
        failed = []
        for case in suite.iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if (skip := case.find("skipped")) is not None:
                skipped[name] = skip.get("message", "")
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(name)
        total = int(suite.get("tests", 0))
        return {"exit_code": proc.returncode, "tests": total, "failed": failed, "skipped": skipped,
                "passed": total - len(failed) - len(skipped), **({"output_tail": tail} if proc.returncode else {})}


def run_extraction(num_samples: int) -> dict:
    proc = subprocess.run([sys.executable, str(HERE / "bench_extract.py"), "--num-samples", str(num_samples),
                           "--no-save"], cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"exit_code": proc.returncode, "error": (proc.stdout + proc.stderr)[-4000:]}
    record = json.loads(lines[-1])
    return {"exit_code": 0, "params": record["params"], "metrics": record["metrics"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=600, help="rows of the extraction measurement")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device visible to torch {torch.__version__} (CUDA build "
              f"{torch.version.cuda or 'none'}); run it on a machine with a GPU", file=sys.stderr)
        return 2
    params = {"num_samples": args.num_samples, "torch": torch.__version__, "cuda": torch.version.cuda,
              "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    tests = run_gpu_tests()
    extraction = run_extraction(args.num_samples)
    ok = tests["exit_code"] == 0 and extraction["exit_code"] == 0
    emit_record("gpu_check", params, {"ok": ok, "gpu_tests": tests, "extraction": extraction})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
