"""A small run directory for the dedup tests: generated features plus samples with image files and turns."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datasel_ray.pipeline.ingest import IMAGES_TYPE

from benchmarks.feature_store_gen import generate_features, write_features

N = 1500
EXACT_COPIES = {7: 3, 9: 3, 400: 12}  # row -> the earlier row whose image bytes and (case-changed) text it repeats


def generated_features() -> dict:
    """1,500 generated rows over 4 tasks, 5% near-duplicates (benchmarks/feature_store_gen.py)."""
    return generate_features(N, seed=6, n_tasks=4, dup_fraction=0.05,
                             columns=["coincide_vector", "last_token", "informativeness", "tau", "n_turns",
                                      "answer_loss", "n_image_tokens", "n_text_tokens", "n_answer_tokens"])


def write_run(tmp: Path, feats: dict) -> None:
    """``features/`` (100-row shards) and ``samples/`` with image files and turns; rows ``EXACT_COPIES`` repeat an
    earlier row's image bytes and (upper-cased) text."""
    shutil.rmtree(tmp, ignore_errors=True)
    write_features(tmp, feats, shard_rows=100)
    images = tmp / "images"
    images.mkdir(parents=True)
    ids = feats["row_id"]
    paths, convs, raws = [], [], []
    for i in ids.tolist():
        src = EXACT_COPIES.get(i, i)
        path = images / f"{src}.bin"
        path.write_bytes(f"image-bytes-{src}".encode())
        text = f"What is in picture {src}?"
        paths.append(str(path) if src % 5 else "")  # every fifth source row is text-only
        turns = [{"from": "human", "value": text.upper() if i != src else text}, {"from": "gpt", "value": "x"}]
        convs.append(json.dumps(turns))
        raws.append(json.dumps({"id": str(i), "conversations": turns}))
    (tmp / "samples").mkdir()
    for s in range(0, len(ids), 700):
        sl = slice(s, s + 700)
        pq.write_table(pa.table({
            "row_id": pa.array(ids[sl], pa.int64()), "task": pa.array(feats["task"][sl].astype(str)),
            "raw": pa.array(raws[sl]), "source_file": pa.array([str((tmp / "pool.jsonl").resolve())] * len(raws[sl])),
            "source_index": pa.array(np.arange(s, s + len(raws[sl]), dtype=np.int64)),
            "image_path": pa.array(paths[sl]), "conversations": pa.array(convs[sl]),
            "images": pa.array([[{"ref": p, "uri": p, "data": None}] if p else [] for p in paths[sl]], IMAGES_TYPE)}),
            tmp / "samples" / f"part-{s // 700:05d}.parquet")
