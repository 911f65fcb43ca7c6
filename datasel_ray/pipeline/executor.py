"""How partition tasks run: in this process (:class:`LocalExecutor`) or as Ray tasks (``ray_adapter.RayExecutor``).

Both run the same top-level functions on the same items and return their results in item order, so a phase
gives bit-identical outputs on either. :func:`resumable_map` persists each item's result (a dict of numpy arrays)
under a work directory before returning it; a re-run after a kill loads finished items instead of recomputing.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from datasel_ray.io.storage import Location
from datasel_ray.pipeline.memory import release_free_memory

__all__ = ["Executor", "LocalExecutor", "StoredResult", "load_result", "resumable_map"]


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
    """Write a dict of numpy arrays (npz, streamed) atomically; :func:`load_result` reads it back."""
    loc.write_with(lambda f: np.savez(f, **{k: np.asarray(v) for k, v in result.items()}))


def _open_npz(loc: Location):
    source = loc.path if loc.is_local else io.BytesIO(loc.read_bytes())
    return np.load(source, allow_pickle=False)


def load_result(loc: Location) -> dict[str, np.ndarray]:
    """A result written by :func:`resumable_map` (a dict of numpy arrays)."""
    with _open_npz(loc) as data:
        return {k: data[k] for k in data.files}


class StoredResult(Mapping):
    """A saved result read lazily: each array is read from the file when indexed, so a driver can merge large
    per-partition partials one array at a time."""

    def __init__(self, loc: Location):
        self.loc = loc
        with _open_npz(loc) as data:
            self._names = list(data.files)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        with _open_npz(self.loc) as data:
            return data[name]

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _run_resumable(item: tuple[Callable, Any, str]) -> None:
    fn, arg, path = item
    loc = Location.parse(path)
    if loc.exists():
        return
    save_result(loc, fn(arg))
    release_free_memory()  # a worker runs many tasks: the next one starts without this one's freed pages


def resumable_map(executor: Executor, fn: Callable[[Any], dict[str, np.ndarray]], items: Sequence[Any],
                  keys: Sequence[str], work: Location, progress=None, stored: bool = False) -> list[Mapping]:
    """``executor.map(fn, items)`` where item ``i``'s result is stored at ``work/<keys[i]>.npz`` once computed.

    ``fn`` returns a dict of numpy arrays (per-partition partials, never a feature column). Items whose result
    file exists (a resumed run of the same phase config) are not recomputed. Results come back through those
    files, never through the executor (a Ray object the caller reads stays mapped into its resident memory as
    shared pages after it is freed, so results read that way grow the driver with the number of partitions):
    ``stored=False`` loads every result; ``stored=True`` gives :class:`StoredResult` views of the files instead
    (for partials too large to hold for every partition at once).
    """
    if len(keys) != len(items) or len(set(keys)) != len(keys):
        raise ValueError("resumable_map needs one unique key per item")
    work.mkdir()
    paths = [str(work / f"{key}.npz") for key in keys]
    executor.map(_run_resumable, [(fn, item, path) for item, path in zip(items, paths)], progress=progress)
    return [(StoredResult if stored else load_result)(Location.parse(p)) for p in paths]
