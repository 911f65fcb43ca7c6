"""Seeded generator of a realistic feature store (the columns the extract phase writes), for benchmarks.

Structure (defaults = the tiny reference model's dims):

* ``n_tasks`` tasks (default 20) with unequal sizes; the last one is text-only (zero visual halves in
  ``coincide_vector``, ``n_image_tokens = 0``).
* per task ``concepts_per_task`` latent concepts (default 300): Gaussian centres on the unit sphere, built as
  a task direction plus a concept direction, so tasks are separable and concepts within a task are related;
  each row is a concept centre plus isotropic noise.
* ``coincide_vector`` fp16 [N, n_layers·2·hidden] laid out ``concat_l [v_l, t_l]``, unit-normalised;
  ``last_token`` fp16 [N, hidden], unnormalised (norm ~ 20-40); ``grad_proj`` f32 [N, proj_dim] Gaussian around
  a per-task mean direction; ``grad_norm`` positive (log-normal with a per-task scale).
* ``tau`` in (0, 1) (per-task mean, logistic noise), ``informativeness`` > 0 anti-correlated with ``tau``,
  ``n_turns`` in 1..3, token counts and a finite positive ``answer_loss``.
* ``dup_fraction`` of the rows (default 3%) are near-duplicates of another row of the same chunk (the copied
  row's vectors plus 1e-3 noise).

Every column is generated chunk by chunk (``chunk_rows``) from its own seeded stream, so memory stays at the
output arrays plus one float32 chunk, and asking for a subset of columns gives the same values as asking for all.

    feats = generate_features(100_000, seed=0)                       # dict of numpy arrays (select-phase layout)
    write_run_dir("/tmp/run", feats)                                 # features/ + samples/ shards (optional)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ALL_COLUMNS = ("row_id", "task", "n_turns", "coincide_vector", "last_token", "informativeness", "tau",
               "answer_loss", "n_image_tokens", "n_text_tokens", "n_answer_tokens", "grad_proj", "grad_norm")
_STREAM = {name: i + 1 for i, name in enumerate(ALL_COLUMNS)}


@dataclass(frozen=True)
class StoreSpec:
    n_rows: int
    seed: int = 0
    n_tasks: int = 20
    n_layers: int = 4
    hidden: int = 128
    proj_dim: int = 512
    concepts_per_task: int = 300
    dup_fraction: float = 0.03
    noise: float = 0.35  # per-row noise relative to a unit concept centre (per-dim sigma = noise / sqrt(d))
    chunk_rows: int = 65536

    @property
    def coincide_dim(self) -> int:
        return self.n_layers * 2 * self.hidden

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# Version of the on-disk layout write_store produces (2: samples/ in ingest-sized shards); part of cache keys.
STORE_LAYOUT = 2

def task_names(n_tasks: int) -> np.ndarray:
    names = [f"task_{t:02d}" for t in range(n_tasks - 1)] + ["text_only"]
    return np.asarray(names[:n_tasks], dtype=object)


def _unit(a: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(a, axis=-1, keepdims=True)
    return a / np.where(n > 0, n, 1.0)


class _Latents:
    """Task / concept centres shared by every chunk (small: n_tasks x concepts x d)."""

    def __init__(self, spec: StoreSpec):
        rng = np.random.default_rng([spec.seed, 0])
        T, C = spec.n_tasks, spec.concepts_per_task
        w = rng.gamma(2.0, 1.0, size=T)
        self.task_p = w / w.sum()
        d = spec.coincide_dim

        def centres(dim: int, task_weight: float) -> np.ndarray:
            tdir = _unit(rng.standard_normal((T, 1, dim)))
            cdir = _unit(rng.standard_normal((T, C, dim)))
            return _unit(task_weight * tdir + cdir).astype(np.float32)

        self.cv = centres(d, 1.2)  # [T, C, d]
        text_only = T - 1
        v = self.cv.reshape(T, C, spec.n_layers, 2, spec.hidden)
        v[text_only, :, :, 0, :] = 0.0  # zero visual halves for the text-only task
        self.cv = _unit(v.reshape(T, C, d)).astype(np.float32)
        self.lt = centres(spec.hidden, 1.0) * rng.uniform(20, 40, size=(T, C, 1)).astype(np.float32)
        self.gmean = _unit(rng.standard_normal((T, spec.proj_dim))).astype(np.float32)
        self.gscale = rng.uniform(0.5, 2.0, size=T)
        self.tau_mu = rng.normal(-1.0, 0.6, size=T)


def _chunk_structure(spec: StoreSpec, lat: _Latents, c: int, rows: int):
    """task, concept and duplicate source (or -1) of each row of chunk c."""
    rng = np.random.default_rng([spec.seed, 0, c])
    task = rng.choice(spec.n_tasks, size=rows, p=lat.task_p)
    concept = rng.integers(0, spec.concepts_per_task, size=rows)
    dup = np.full(rows, -1, dtype=np.int64)
    n_dup = int(round(spec.dup_fraction * rows))
    if n_dup and rows > 1:
        who = rng.choice(rows, size=n_dup, replace=False)
        src = rng.integers(0, rows, size=n_dup)
        ok = src != who
        who, src = who[ok], src[ok]
        # a duplicate copies a non-duplicate source; same task/concept
        src_ok = ~np.isin(src, who)
        who, src = who[src_ok], src[src_ok]
        dup[who] = src
        task[who] = task[src]
        concept[who] = concept[src]
    return task, concept, dup


def _apply_dups(x: np.ndarray, dup: np.ndarray, rng: np.random.Generator, eps: float) -> None:
    who = np.flatnonzero(dup >= 0)
    if len(who):
        x[who] = x[dup[who]] + eps * rng.standard_normal((len(who), x.shape[1])).astype(np.float32)


def generate_features(n_rows: int | StoreSpec, seed: int = 0, columns=None, **kw) -> dict[str, np.ndarray]:
    """The select-phase ``feats`` dict (row id order) for ``n_rows`` generated rows.

    ``columns``: subset of :data:`ALL_COLUMNS` (``row_id`` and ``task`` are always included).
    """
    spec = n_rows if isinstance(n_rows, StoreSpec) else StoreSpec(int(n_rows), seed=seed, **kw)
    want = set(ALL_COLUMNS if columns is None else columns) | {"row_id", "task"}
    unknown = want - set(ALL_COLUMNS)
    if unknown:
        raise ValueError(f"unknown columns {sorted(unknown)}")
    N = spec.n_rows
    lat = _Latents(spec)
    names = task_names(spec.n_tasks)
    out: dict[str, np.ndarray] = {}
    for c, s in enumerate(range(0, N, spec.chunk_rows)):
        part = generate_chunk(spec, lat, c, s, min(N, s + spec.chunk_rows), want)
        for name, values in part.items():
            if name not in out:
                out[name] = np.empty((N, *values.shape[1:]), dtype=values.dtype)
            out[name][s:s + len(values)] = values
    out["task"] = names[out.pop("task_code")]
    order = ["row_id", "task"] + [c for c in ALL_COLUMNS if c in out and c not in ("row_id", "task")]
    return {name: out[name] for name in order}


def generate_chunk(spec: StoreSpec, lat: "_Latents", c: int, s: int, e: int, want: set[str]) -> dict[str, np.ndarray]:
    """Rows ``[s, e)`` = chunk ``c`` of the store (every column from its own seeded stream of that chunk)."""
    d, h, k = spec.coincide_dim, spec.hidden, spec.proj_dim
    text_only = spec.n_tasks - 1
    rows = e - s
    part: dict[str, np.ndarray] = {"row_id": np.arange(s, e, dtype=np.int64)}
    task, concept, dup = _chunk_structure(spec, lat, c, rows)
    part["task_code"] = task

    def rng_for(name):
        return np.random.default_rng([spec.seed, _STREAM[name], c])

    if "coincide_vector" in want:
        r = rng_for("coincide_vector")
        x = lat.cv[task, concept] + (spec.noise / np.sqrt(d)) * r.standard_normal((rows, d), dtype=np.float32)
        to = task == text_only
        if to.any():
            xv = x[to].reshape(-1, spec.n_layers, 2, h)
            xv[:, :, 0, :] = 0.0
            x[to] = xv.reshape(-1, d)
        _apply_dups(x, dup, r, 1e-3 / np.sqrt(d))
        if to.any():
            xv = x[to].reshape(-1, spec.n_layers, 2, h)
            xv[:, :, 0, :] = 0.0
            x[to] = xv.reshape(-1, d)
        part["coincide_vector"] = _unit(x).astype(np.float16)
        del x
    if "last_token" in want:
        r = rng_for("last_token")
        base = lat.lt[task, concept]
        x = base + np.linalg.norm(base, axis=1, keepdims=True) * (spec.noise / np.sqrt(h)) * \
            r.standard_normal((rows, h), dtype=np.float32)
        _apply_dups(x, dup, r, 1e-2)
        part["last_token"] = x.astype(np.float16)
    if "grad_proj" in want:
        r = rng_for("grad_proj")
        g = lat.gmean[task] * 3.0 + r.standard_normal((rows, k), dtype=np.float32)
        _apply_dups(g, dup, r, 1e-3)
        part["grad_proj"] = g
    if "grad_norm" in want:
        r = rng_for("grad_norm")
        part["grad_norm"] = (lat.gscale[task] * np.exp(0.4 * r.standard_normal(rows))).astype(np.float32)
    if "tau" in want or "informativeness" in want:
        r = rng_for("tau")
        z = lat.tau_mu[task] + 0.5 * r.standard_normal(rows)
        tau = 1.0 / (1.0 + np.exp(-z))
        tau = np.clip(tau, 1e-3, 1 - 1e-3)
        if "tau" in want:
            part["tau"] = tau
        if "informativeness" in want:
            inf = np.maximum(0.05, 4.0 - 3.0 * tau + 0.2 * r.standard_normal(rows))
            part["informativeness"] = inf
    if "n_turns" in want:
        part["n_turns"] = rng_for("n_turns").integers(1, 4, size=rows)
    if "n_image_tokens" in want:
        part["n_image_tokens"] = np.where(task == text_only, 0, 16)
    if "n_text_tokens" in want:
        part["n_text_tokens"] = rng_for("n_text_tokens").integers(20, 300, size=rows)
    if "n_answer_tokens" in want:
        part["n_answer_tokens"] = rng_for("n_answer_tokens").integers(5, 150, size=rows)
    if "answer_loss" in want:
        part["answer_loss"] = rng_for("answer_loss").gamma(4.0, 0.4, size=rows)
    return {name: v.astype(_DTYPES[name]) if name in _DTYPES else v for name, v in part.items()}


_DTYPES = {"grad_norm": np.float32, "tau": np.float32, "informativeness": np.float32, "answer_loss": np.float32,
           "n_turns": np.int32, "n_image_tokens": np.int32, "n_text_tokens": np.int32, "n_answer_tokens": np.int32}


def write_store(run_dir: str | Path, spec: StoreSpec, columns=None, shard_rows: int = 4096) -> Path:
    """``features/`` shards (extract-phase layout) + ``samples/`` of a generated store, written chunk by chunk:
    memory stays at one chunk of ``spec.chunk_rows`` rows, whatever the store's size."""
    run_dir = Path(run_dir)
    want = set(ALL_COLUMNS if columns is None else columns) | {"row_id", "task"}
    lat = _Latents(spec)
    names = task_names(spec.n_tasks)
    tasks = np.empty(spec.n_rows, dtype=object)
    shard = 0
    for c, s in enumerate(range(0, spec.n_rows, spec.chunk_rows)):
        part = generate_chunk(spec, lat, c, s, min(spec.n_rows, s + spec.chunk_rows), want)
        part["task"] = names[part.pop("task_code")]
        tasks[s:s + len(part["task"])] = part["task"]
        order = ["row_id", "task"] + [c for c in ALL_COLUMNS if c in part and c not in ("row_id", "task")]
        feats = {name: part[name] for name in order}
        for lo in range(0, len(feats["row_id"]), shard_rows):
            write_features(run_dir, {k: v[lo:lo + shard_rows] for k, v in feats.items()}, shard_rows=shard_rows,
                           first_shard=shard)
            shard += 1
    write_samples(run_dir, np.arange(spec.n_rows, dtype=np.int64), tasks)
    return run_dir


def write_samples(run_dir: str | Path, row_ids: np.ndarray, tasks: np.ndarray) -> list[Path]:
    """Minimal ``samples/`` shards (row_id, raw, source_file, source_index, task) so that the select phase's
    subset writer works; the source is a (not written) ``pool.jsonl`` in the run directory. One shard per
    ``pool.records_per_block`` rows (the default), as the ingest phase writes them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from datasel_ray.config import PoolConfig

    samples = Path(run_dir) / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    src = str((Path(run_dir) / "pool.jsonl").resolve())
    block = PoolConfig.model_fields["records_per_block"].default
    tasks = np.asarray(tasks).astype(str)
    paths = []
    for start in range(0, max(len(row_ids), 1), block):
        ids = row_ids[start:start + block]
        raw = [json.dumps({"id": str(i), "conversations": []}) for i in ids.tolist()]
        table = pa.table({"row_id": pa.array(ids, pa.int64()), "task": pa.array(tasks[start:start + block]),
                          "raw": pa.array(raw, pa.string()), "source_file": pa.array([src] * len(raw), pa.string()),
                          "source_index": pa.array(np.arange(start, start + len(raw), dtype=np.int64))})
        paths.append(samples / f"part-{start // block:05d}.parquet")
        pq.write_table(table, paths[-1])
    return paths


def write_features(run_dir: str | Path, feats: dict[str, np.ndarray], shard_rows: int = 65536,
                   first_shard: int = 0) -> list[Path]:
    """``features/part-*.parquet`` shards in the extract phase's layout (vectors as fixed-size lists)."""
    import pyarrow as pa

    from datasel_ray.io.storage import Location
    from datasel_ray.pipeline.feature_store import vector_column

    root = Path(run_dir) / "features"
    root.mkdir(parents=True, exist_ok=True)
    n = len(feats["row_id"])
    paths = []
    for i, s in enumerate(range(0, n, shard_rows)):
        cols = {}
        for name, a in feats.items():
            part = a[s:s + shard_rows]
            if name == "task":
                cols[name] = pa.array(part.astype(str))
            elif part.ndim == 2:
                cols[name] = vector_column(part)
            else:
                cols[name] = pa.array(part)
        path = root / f"part-{first_shard + i:06d}.parquet"
        Location.parse(str(path)).write_parquet(pa.table(cols))
        paths.append(path)
    return paths


def write_run_dir(run_dir: str | Path, feats: dict[str, np.ndarray], features: bool = True) -> Path:
    """features/ (optional) + samples/ of a run directory holding ``feats``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if features:
        write_features(run_dir, feats)
    write_samples(run_dir, feats["row_id"], feats["task"])
    return run_dir
