"""Online near-duplicate answer: is a new sample a duplicate of a pool row of the run?

Read from the run's ``dedup/`` (:mod:`datasel_ray.pipeline.dedup`), with the batch rules:

* **exact** — the sample's digest (image file bytes + normalised turns, :mod:`datasel_ray.dedup.exact`) equals a
  pool row's (``dedup/digests.parquet``, sorted, held in memory: 24 bytes per pool row). Not checked for
  ``image_base64`` samples (no file bytes to hash as the pool's files were hashed).
* **semantic** — the sample's ``dedup.feature`` vector (:func:`~datasel_ray.dedup.semantic.feature_vectors`),
  unit-normalised, is assigned to its nearest centroid;
  only that cluster's members are read (``dedup/members/``, through the scorer's bounded
  :class:`~datasel_ray.scoring.state.MemberCache`), and the most similar member is reported; the sample is a
  near duplicate when that cosine is ``>= 1 - dedup.eps``. Pool rows dropped by the exact pass are not members
  (their exact copy is).

The answer (``duplicate`` in each ``/score`` result): ``is_duplicate``, ``pass`` (``exact`` / ``semantic`` /
null), ``row_id`` (the matching pool row, or the most similar member when none matches), ``similarity``,
``cluster`` and ``threshold``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datasel_ray import schema
from datasel_ray.config import RunConfig
from datasel_ray.dedup import exact as exact_pass
from datasel_ray.dedup import semantic
from datasel_ray.io import layout
from datasel_ray.io.rundir import RunDir
from datasel_ray.io.storage import Location
from datasel_ray.pipeline.feature_store import column_to_numpy

__all__ = ["DuplicateIndex"]


@dataclass
class DuplicateIndex:
    """What the online answer needs from ``dedup/``: centroids, cluster table, sorted digests, member files."""

    dedup: Location
    feature: str
    threshold: float
    centroids: np.ndarray | None  # float32 [K, d] unit; None when the run had no semantic pass
    bucket: np.ndarray  # int64 [K]
    offset: np.ndarray  # int64 [K]
    size: np.ndarray  # int64 [K]
    digests: np.ndarray | None  # S16 [N] sorted; None when the run had no exact pass
    digest_ids: np.ndarray | None  # int64 [N] row id of each digest
    cache: object

    @classmethod
    def load(cls, run_dir: RunDir, cfg: RunConfig, cache) -> DuplicateIndex | None:
        """The run's index, or None when the run has no finished dedup phase."""
        out = run_dir / layout.DEDUP
        if not (out / layout.META).exists():
            return None
        centroids = bucket = offset = size = None
        if (out / layout.CENTROIDS).exists():
            centroids = (out / layout.CENTROIDS).read_npy().astype(np.float32)
            t = out / layout.CLUSTERS
            table = t.read_parquet([layout.BUCKET, layout.OFFSET, layout.SIZE])
            bucket, offset, size = (column_to_numpy(table.column(c)).astype(np.int64)
                                    for c in (layout.BUCKET, layout.OFFSET, layout.SIZE))
        digests = ids = None
        if (out / layout.DIGESTS).exists():
            table = (out / layout.DIGESTS).read_parquet()
            digests = np.array(table.column("digest").to_pylist(), dtype=f"S{exact_pass.DIGEST_BYTES}")
            ids = column_to_numpy(table.column(schema.ROW_ID)).astype(np.int64)
        empty = np.zeros(0, dtype=np.int64)
        return cls(out, cfg.dedup.feature, float(1.0 - cfg.dedup.eps), centroids,
                   bucket if bucket is not None else empty, offset if offset is not None else empty,
                   size if size is not None else empty, digests, ids, cache)

    def exact_match(self, images: list[bytes], conversations: list[dict]) -> int | None:
        """Row id of a pool row with the same digest (``images``: each image's bytes, placeholder order), or None."""
        if self.digests is None or not len(self.digests):
            return None
        d = np.array([exact_pass.row_digest(images, exact_pass.normalise_text(conversations))],
                     dtype=self.digests.dtype)[0]
        at = int(np.searchsorted(self.digests, d))
        return int(self.digest_ids[at]) if at < len(self.digests) and self.digests[at] == d else None

    def nearest_member(self, vector: np.ndarray) -> tuple[int, int | None, float | None]:
        """(cluster, most similar member's row id, its cosine) for one float[d] vector of ``feature``."""
        from datasel_ray.clustering import assign_nearest, normalize_rows

        unit = normalize_rows(np.asarray(vector)[None])
        c = int(assign_nearest(unit, self.centroids)[0])
        if self.size[c] == 0:
            return c, None, None
        from datasel_ray.io.layout import members_file

        block = self.cache.get(members_file(self.dedup, int(self.bucket[c])), int(self.offset[c]), int(self.size[c]),
                               [schema.ROW_ID, layout.VECTOR])
        sims = normalize_rows(block[layout.VECTOR]) @ unit[0]
        best = int(np.argmax(sims))
        return c, int(block[schema.ROW_ID][best]), float(sims[best])

    def answer(self, row: dict, conversations: list[dict], images: list[bytes]) -> dict:
        """The ``duplicate`` field of one scored sample (``row``: its ``features/`` columns; ``images``: its
        images' bytes in placeholder order, as the request sent or named them)."""
        out = {"is_duplicate": False, "pass": None, "row_id": None, "similarity": None, "cluster": None,
               "threshold": self.threshold, "feature": self.feature}
        match = self.exact_match(images, conversations)
        if match is not None:
            out.update(is_duplicate=True, row_id=match, similarity=1.0)
            out["pass"] = layout.PASS_EXACT
        source = semantic.source_column(self.feature)
        if self.centroids is not None and source in row:
            hidden = len(row[schema.LAST_TOKEN]) if schema.LAST_TOKEN in row else 0
            vector = semantic.feature_vectors(self.feature, np.asarray(row[source])[None], hidden)[0]
            c, member, sim = self.nearest_member(vector)
            out["cluster"] = c
            if not out["is_duplicate"] and member is not None:
                out.update(row_id=member, similarity=sim)
                if sim >= self.threshold:
                    out.update(is_duplicate=True)
                    out["pass"] = layout.PASS_SEMANTIC
        return out
