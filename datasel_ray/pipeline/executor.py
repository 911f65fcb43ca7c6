"""How partition tasks run: in this process (:class:`LocalExecutor`) or as Ray tasks (``ray_adapter.RayExecutor``).

Both run the same top-level functions on the same items and return their results in item order, so a phase
gives bit-identical outputs on either. :func:`resumable_map` persists each item's result (a dict of numpy arrays)
under a work directory before returning it; a re-run after a kill loads finished items instead of recomputing.
"""

from __future__ import annotations

import io
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from datasel_ray.io.storage import Location

__all__ = ["Executor", "LocalExecutor", "load_result", "resumable_map"]


class Executor(Protocol):
    """``map(fn, items)`` → ``[fn(item) for item in items]`` in item order; ``fn`` is a picklable top-level
    function. ``progress`` (a :class:`~datasel_ray.pipeline.progress.Progress`) counts finished items."""

    name: str

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], progress=None) -> list[Any]: ...


class LocalExecutor:
    """Runs every item in this process, one after the other (small pools, tests, the reference path)."""

    name = "local"

    def map(self, fn, items, progress=None):
        out = []
        for item in items:
            out.append(fn(item))
            if progress is not None:
                progress.update(1)
        return out


def save_result(loc: Location, result: dict[str, np.ndarray]) -> None:
    """Write a dict of numpy arrays (npz) atomically; :func:`load_result` reads it back."""
    sink = io.BytesIO()
    np.savez(sink, **{k: np.asarray(v) for k, v in result.items()})
    loc.write_bytes(sink.getvalue())


def load_result(loc: Location) -> dict[str, np.ndarray]:
    """A result written by :func:`resumable_map` (a dict of numpy arrays)."""
    with np.load(io.BytesIO(loc.read_bytes()), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _run_resumable(item: tuple[Callable, Any, str]) -> dict[str, np.ndarray]:
    fn, arg, path = item
    loc = Location.parse(path)
    if loc.exists():
        return load_result(loc)
    result = fn(arg)
    save_result(loc, result)
    return result


def resumable_map(executor: Executor, fn: Callable[[Any], dict[str, np.ndarray]], items: Sequence[Any],
                  keys: Sequence[str], work: Location, progress=None) -> list[dict[str, np.ndarray]]:
    """``executor.map(fn, items)`` where item ``i``'s result is stored at ``work/<keys[i]>.npz`` once computed.

    ``fn`` returns a dict of numpy arrays (small: per-partition partials, never a feature column). Items whose
    result file exists (a resumed run of the same phase config) are loaded, not recomputed.
    """
    if len(keys) != len(items) or len(set(keys)) != len(keys):
        raise ValueError("resumable_map needs one unique key per item")
    work.mkdir()
    wrapped = [(fn, item, str(work / f"{key}.npz")) for item, key in zip(items, keys)]
    return executor.map(_run_resumable, wrapped, progress=progress)
