"""``datasel status RUN``: phase status from the manifest and live progress from ``progress.json``."""

from __future__ import annotations

import time

from datasel_ray.config import PHASES
from datasel_ray.io.rundir import RunDir
from datasel_ray.pipeline.progress import format_eta


def render_status(run: str) -> str:
    run_dir = RunDir(run)
    manifest = run_dir.load_manifest()
    if not manifest:
        return f"{run}: no manifest.json (not a run directory, or no phase has started)"
    progress = (run_dir / "progress.json").read_json() if (run_dir / "progress.json").exists() else {}
    lines = [f"run {manifest.get('run_id')} at {run}  (model {manifest.get('model_id')}, seed {manifest.get('seed')})"]
    for phase in PHASES:
        entry = manifest.get("phases", {}).get(phase)
        if not entry:
            continue
        status = entry.get("status", "pending")
        line = f"  {phase:<10} {status:<8}"
        if status in ("done", "failed"):
            line += f" {entry.get('seconds', 0):8.1f}s"
        snap = progress.get(phase)
        if snap and "done" in snap:
            age = time.time() - snap.get("updated", time.time())
            unit = snap.get("unit", "rows")
            line += (f"  {snap['done']}/{snap['total']} {unit}  {snap['rows_per_second']:.1f} {unit}/s"
                     f"  ETA {format_eta(snap.get('eta_seconds')) if status != 'done' else '-'}"
                     f"  (updated {age:.0f}s ago)")
        lines.append(line)
        if status == "failed" and entry.get("error"):
            error = entry["error"]
            lines.extend(f"    {text}" for text in f"{error.get('kind')}: {error.get('message')}".splitlines())
        elif status == "running" and (snap or {}).get("stall"):
            lines.append(f"    {snap['stall']['message']}")
    return "\n".join(lines)
