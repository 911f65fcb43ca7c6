"""What every method's frozen online state shares: the bounded member cache, pool-row lookups, percentiles.

A replica holds, per method, what the batch run fitted (centroids, per-cluster summaries, thresholds, sorted
per-task score arrays — a few scalars per pool row) and reads a cluster's members from the run directory only
when a score needs them, through a bounded :class:`MemberCache`. Each method's state class (its ``load`` and
``score_new``) sits beside its fit in :mod:`datasel_ray.pipeline.fit`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from datasel_ray import schema
from datasel_ray.io import layout
from datasel_ray.io.rundir import RunDir
from datasel_ray.io.storage import Location
from datasel_ray.pipeline.feature_store import column_to_numpy

__all__ = ["MemberCache", "POOL_MATCH_TOLERANCE", "percentile", "read_columns", "selected_lookup", "was_selected"]

#: a sample within this distance of a pool member is that member re-extracted (1 - cosine for COINCIDE's unit
#: vectors; relative Euclidean distance for DataTailor's last-token states): well above the fp16 rounding of a
#: re-extraction, well below the distance of an injected near-duplicate.
POOL_MATCH_TOLERANCE = 1e-4


def read_columns(loc: Location, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Columns ``names`` (None: all) of the parquet file ``loc`` as numpy arrays."""
    t = loc.read_parquet(names)
    return {name: column_to_numpy(t.column(name)) for name in t.column_names}


def percentile(sorted_pool: np.ndarray, value: float) -> float:
    """Share of a task's pool values below ``value`` (NaN sorts last, as in the batch ranks), in [0, 1]."""
    n = len(sorted_pool)
    return float(np.searchsorted(sorted_pool, value, side="left") / n) if n else 0.0


class MemberCache:
    """Bounded LRU cache of cluster member blocks read from ``stats/<method>/members/`` row ranges.

    ``max_bytes`` bounds the bytes held over all cached clusters (a cluster larger than the bound is read, used
    and not kept), so a replica's memory does not depend on the vectors' width. Thread-safe."""

    def __init__(self, max_bytes: int = 512 << 20):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, dict[str, np.ndarray]] = OrderedDict()
        self._sizes: dict[tuple, tuple[int, int]] = {}
        self._bytes = 0
        self._rows = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, path: Location, offset: int, size: int, columns: list[str]) -> dict[str, np.ndarray]:
        key = (str(path), int(offset), int(size), tuple(columns))
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
        table = path.read_parquet_rows(int(offset), int(size), columns)
        block = {name: column_to_numpy(table.column(name)) for name in columns}
        nbytes = sum(a.nbytes for a in block.values())
        with self._lock:
            self.misses += 1
            if nbytes <= self.max_bytes and key not in self._items:
                self._items[key] = block
                self._sizes[key] = (nbytes, int(size))
                self._bytes += nbytes
                self._rows += int(size)
                while self._bytes > self.max_bytes:
                    old, _ = self._items.popitem(last=False)
                    b, r = self._sizes.pop(old)
                    self._bytes -= b
                    self._rows -= r
        return block

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def nbytes(self) -> int:
        return self._bytes


def selected_lookup(run_dir: RunDir, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted pool row ids and whether the run selected each (int64[N], bool[N]), from ``selections/<method>/``."""
    s = read_columns(layout.selection_dir(run_dir, method) / layout.SCORES, [schema.ROW_ID, layout.SELECTED])
    order = np.argsort(s[schema.ROW_ID], kind="stable")
    return s[schema.ROW_ID][order], s[layout.SELECTED][order]


def was_selected(ids: np.ndarray, selected: np.ndarray, row_id: int) -> bool:
    """Whether pool row ``row_id`` was selected (``ids``/``selected`` from :func:`selected_lookup`)."""
    i = int(np.searchsorted(ids, row_id))
    return bool(i < len(ids) and ids[i] == row_id and selected[i])
