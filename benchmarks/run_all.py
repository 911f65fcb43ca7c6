"""``make bench``: every benchmark at a size that fits a 2-CPU, 24 GB machine; each appends a dated JSON record.

``--quick`` runs each script's smoke size (a few minutes in all). Scripts run one after another in their own
processes, so their timings and peak memory do not disturb each other.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_extract.py", "bench_gradients.py", "bench_select.py", "bench_serve.py", "quality.py",
           "duplicate_sensitivity.py", "bench_cluster.py"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", help="script names to run (default: all)")
    args = parser.parse_args()
    failed = []
    for script in SCRIPTS:
        if args.only and script not in args.only and script.removesuffix(".py") not in args.only:
            continue
        cmd = [sys.executable, str(HERE / script)] + (["--quick"] if args.quick else [])
        started = time.monotonic()
        print(f"== {script} ({' '.join(cmd[2:]) or 'default size'})", flush=True)
        code = subprocess.call(cmd)
        print(f"== {script}: exit {code} after {time.monotonic() - started:.0f}s", flush=True)
        if code:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
