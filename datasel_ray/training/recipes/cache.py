"""Idempotent, atomic, fingerprint-keyed builds of a model directory (shared by every recipe)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path


def marker_matches(out_dir: Path, marker_file: str, expected: dict) -> bool:
    """True when ``out_dir/marker_file`` is a JSON object whose values at ``expected``'s keys equal it."""
    try:
        meta = json.loads((out_dir / marker_file).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and all(meta.get(k) == v for k, v in expected.items())


def cached_build(out_dir: str | Path, marker_file: str, expected: Callable[[], dict],
                 write: Callable[[Path], dict], log_key: str = "build") -> Path:
    """Return ``out_dir`` (resolved), building it with ``write(tmp_dir) -> build log`` unless its marker matches.

    ``expected()`` gives the marker fields that identify the recipe (e.g. version, seed, fingerprint); the marker
    stores them plus ``{log_key: log}``. The model is written to a sibling temp dir, marked, then renamed into
    place, so concurrent builders (e.g. several Ray workers) never see a half-written model; a stale or partial
    directory is replaced.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    meta = expected()
    if marker_matches(out_dir, marker_file, meta):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}-", dir=out_dir.parent))
    try:
        log = write(tmp)
        (tmp / marker_file).write_text(json.dumps({**meta, log_key: log}))
        if out_dir.exists() and not marker_matches(out_dir, marker_file, meta):
            shutil.rmtree(out_dir, ignore_errors=True)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            # another builder won the race; its directory is complete once marked
            if not marker_matches(out_dir, marker_file, meta):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
