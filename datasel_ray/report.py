"""The report phase: ``report/index.html`` plus PNG plots and ``report/summary.json`` for a run directory.

Reads what the other phases wrote (all optional): ``manifest.json``, ``samples/``, ``quarantine/{ingest,extract}/``,
``selections/<method>/{scores.parquet,summary.json}``, ``stats/<method>/clusters.parquet`` of the methods whose
class names a cluster plot (``SelectionMethod.report_clusters``; COINCIDE) and ``dedup/`` (counts, similarities and
the images of the largest duplicate groups, read from the samples' own image references). A missing input
skips its plot with a note on the page; it is never an error. All I/O goes through :class:`Location`, so the
run directory may live on object storage. Plots use matplotlib's object API (``Figure``, Agg canvas): no pyplot
global state, safe inside Ray workers.
"""

from __future__ import annotations

import functools
import html
import io
import json
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from datasel_ray.config import PHASES
from datasel_ray.io import layout
from datasel_ray.io.rundir import RunDir
from datasel_ray.io.storage import Location
from datasel_ray.methods.registry import registry

FIG_WIDTH_IN = 7.0
FIG_HEIGHT_IN = 3.5
FIG_DPI = 100
MAX_TASKS_SHOWN = 20
POOL_LABEL = "pool"
OTHER_TASKS_LABEL = "(other tasks)"
NO_SELECTIONS_NOTE = "No selections: selections/ holds no method output (the select phase has not run)."


# --- inputs ---------------------------------------------------------------------------------------------------


@dataclass
class MethodResult:
    """One selection method's outputs: its summary and the columns of its scores table the report needs."""

    name: str
    summary: dict = field(default_factory=dict)
    scores: np.ndarray | None = None  # float64 [N], the method's main score
    selected: np.ndarray | None = None  # bool [N]
    tasks: np.ndarray | None = None  # object [N]

    @property
    def selected_rows(self) -> int | None:
        if "selected" in self.summary:
            return int(self.summary["selected"])
        return int(self.selected.sum()) if self.selected is not None else None

    @property
    def task_counts(self) -> dict[str, int]:
        if self.summary.get("task_counts"):
            return {str(k): int(v) for k, v in self.summary["task_counts"].items()}
        if self.selected is not None and self.tasks is not None:
            return _count(self.tasks[self.selected])
        return {}


@dataclass
class RunInputs:
    """Everything the report reads from a run directory; absent pieces are None or empty."""

    manifest: dict
    pool_task_counts: dict[str, int]
    quarantine: pa.Table | None
    methods: list[MethodResult]
    clusters: dict[str, pa.Table | None]  # per method with a cluster plot: its stats/<method>/clusters.parquet
    dedup: dict | None = None  # read_dedup(): the dedup phase's counts, per-task table, similarities, examples


def _count(values) -> dict[str, int]:
    names, counts = np.unique(np.asarray(values, dtype=object).astype(str), return_counts=True)
    return {str(n): int(c) for n, c in zip(names, counts)}


def _read_parquet_columns(file: Location, columns: list[str]) -> pa.Table:
    """Only those of ``columns`` that ``file`` has (wide columns such as centroids are never read)."""
    with file.open_input() as handle:
        names = pq.ParquetFile(handle).schema_arrow.names
    return file.read_parquet([c for c in columns if c in names])


def _read_table(loc: Location, columns: list[str]) -> pa.Table | None:
    """The parquet file, or the files of the folder, at ``loc`` with the present ``columns``; None when empty."""
    files = [loc] if loc.is_file() else loc.list(".parquet")
    tables = [_read_parquet_columns(f, columns) for f in files]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="default")


def _read_quarantine(run_dir: RunDir) -> pa.Table | None:
    tables = []
    for phase in ("ingest", "extract"):
        table = _read_table(run_dir / "quarantine" / phase, ["reason"])
        if table is not None and "reason" in table.column_names:
            tables.append(table.append_column("phase", pa.array([phase] * table.num_rows, pa.string())))
    return pa.concat_tables(tables) if tables else None


def _method_dirs(run_dir: RunDir) -> list[Location]:
    """``selections/<method>/`` folders that hold a summary or a scores table, sorted by method name."""
    files = (run_dir / "selections").list(recursive=True)
    wanted = {"summary.json", "scores.parquet"}
    parents = {f.parent.path: f.parent for f in files if f.name in wanted}
    return [parents[p] for p in sorted(parents)]


def _read_method(folder: Location) -> MethodResult:
    result = MethodResult(name=folder.name)
    summary_loc = folder / "summary.json"
    if summary_loc.is_file():
        result.summary = summary_loc.read_json()
    table = _read_table(folder / "scores.parquet", ["task", "selected", "score"])
    if table is not None:
        if "score" in table.column_names:
            result.scores = table.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
        if "selected" in table.column_names:
            result.selected = table.column("selected").fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
        if "task" in table.column_names:
            result.tasks = np.asarray(table.column("task").to_pylist(), dtype=object)
    return result


def _pool_task_counts(run_dir: RunDir, methods: list[MethodResult]) -> dict[str, int]:
    samples = _read_table(run_dir / "samples", ["task"])
    if samples is not None and "task" in samples.column_names:
        return _count(samples.column("task").to_pylist())
    for method in methods:
        if method.summary.get("pool_task_counts"):
            return {str(k): int(v) for k, v in method.summary["pool_task_counts"].items()}
    return {}


def read_run_inputs(run_dir: RunDir) -> RunInputs:
    """Load the report's inputs from ``run_dir``."""
    methods = [_read_method(folder) for folder in _method_dirs(run_dir)]
    return RunInputs(
        manifest=run_dir.load_manifest(),
        pool_task_counts=_pool_task_counts(run_dir, methods),
        quarantine=_read_quarantine(run_dir),
        methods=methods,
        clusters={name: _read_table(layout.method_stats(run_dir, name) / layout.CLUSTERS, list(CLUSTER_COLUMNS))
                  for name in _cluster_plot_methods()},
        dedup=read_dedup(run_dir),
    )


DEDUP_EXAMPLE_GROUPS = 5
DEDUP_EXAMPLE_MEMBERS = 6  # rows drawn per example group: the kept row and its most similar dropped rows
_EXAMPLE_COLUMNS = ("row_id", "images", "image_path", "conversations")


def _example_rows(run_dir: RunDir, wanted: set[int]) -> dict[int, dict]:
    """``{row_id: samples row}`` (the columns of :data:`_EXAMPLE_COLUMNS` the table has) of the ``wanted`` rows."""
    rows: dict[int, dict] = {}
    for f in (run_dir / "samples").list(".parquet"):
        with f.open_input() as handle:
            names = pq.ParquetFile(handle).schema_arrow.names
        t = f.read_parquet([c for c in _EXAMPLE_COLUMNS if c in names])
        ids = t.column("row_id").to_numpy()
        for i in np.flatnonzero(np.isin(ids, list(wanted))).tolist():
            rows[int(ids[i])] = {name: t.column(name)[i].as_py() for name in t.column_names}
    return rows


def _describe(row: dict | None) -> dict:
    """An example member's image references and first turn (120 characters), JSON-ready."""
    if row is None:
        return {}
    images = [i.get("ref") or i.get("uri") or "" for i in row["images"]] if row.get("images") is not None \
        else [row["image_path"]] if row.get("image_path") else []
    turns = json.loads(row.get("conversations") or "[]")
    return {"images": images, "text": str(turns[0].get("value", ""))[:120] if turns else ""}


def read_dedup(run_dir: RunDir) -> dict | None:
    """The dedup phase's outputs for the report (None when the run has no finished dedup phase): ``meta``,
    ``tasks`` (per-task rows/kept/dropped/groups), ``similarity`` and ``pass`` of every dropped row, the largest
    groups (``examples``: per group the kept row, then its dropped rows by descending similarity, at most
    :data:`DEDUP_EXAMPLE_MEMBERS`, each with its image references, first turn, similarity and pass) and
    ``example_rows`` (their samples rows, from which the report draws their images)."""
    out = run_dir / layout.DEDUP
    if not (out / layout.META).exists():
        return None
    dropped = (out / layout.DROPPED).read_parquet()
    groups = (out / layout.GROUPS).read_parquet().sort_by([(layout.SIZE, "descending"),
                                                            (layout.REPRESENTATIVE, "ascending")])
    reps = groups.column(layout.REPRESENTATIVE).to_pylist()[:DEDUP_EXAMPLE_GROUPS]
    rep_col = dropped.column(layout.REPRESENTATIVE).to_numpy()
    row_col = dropped.column("row_id").to_numpy()
    similarity = dropped.column(layout.SIMILARITY).to_numpy(zero_copy_only=False).astype(np.float64)
    passes = np.asarray(dropped.column(layout.PASS).to_pylist(), dtype=object)
    members = {}
    for r in reps:
        at = np.flatnonzero(rep_col == r)
        at = at[np.lexsort((row_col[at], -similarity[at]))][:DEDUP_EXAMPLE_MEMBERS - 1]
        members[r] = [(int(row_col[i]), float(similarity[i]), str(passes[i])) for i in at]
    rows = _example_rows(run_dir, set(reps) | {m for ms in members.values() for m, _, _ in ms}) if reps else {}
    examples = [[{"row_id": int(r), "kept": True, **_describe(rows.get(int(r)))}]
                + [{"row_id": m, "kept": False, "similarity": round(sim, 4), "pass": kind, **_describe(rows.get(m))}
                   for m, sim, kind in members[r]] for r in reps]
    return {"meta": (out / layout.META).read_json(), "tasks": (out / layout.TASKS).read_parquet().to_pylist(),
            "similarity": similarity, "pass": passes, "examples": examples, "example_rows": rows}


# --- plots ----------------------------------------------------------------------------------------------------


def _new_figure(rows: int = 1, cols: int = 1, height: float = FIG_HEIGHT_IN) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(FIG_WIDTH_IN, height), dpi=FIG_DPI)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    return fig, axes


def _png_bytes(fig: Figure) -> bytes:
    fig.tight_layout()
    sink = io.BytesIO()
    fig.savefig(sink, format="png", dpi=FIG_DPI)
    return sink.getvalue()


def _tasks_by_pool_size(pool: dict[str, int], methods: list[MethodResult]) -> list[str]:
    """Tasks ordered by pool count (descending, then name), including tasks only a selection has."""
    names = set(pool)
    for method in methods:
        names |= set(method.task_counts)
    return sorted(names, key=lambda t: (-pool.get(t, 0), t))


def _shares(counts: dict[str, int], tasks: list[str], shown: list[str]) -> list[float]:
    """Percent of ``counts`` per task in ``shown``; tasks beyond ``shown`` go into one trailing bucket."""
    total = sum(counts.values()) or 1
    values = [100.0 * counts.get(t, 0) / total for t in shown]
    if len(shown) < len(tasks):
        values.append(100.0 * sum(counts.get(t, 0) for t in tasks[len(shown):]) / total)
    return values


def plot_task_mix(inputs: RunInputs) -> bytes | None:
    """Grouped bars: share of rows per task in the pool and in each selection."""
    series = [(POOL_LABEL, inputs.pool_task_counts)] if inputs.pool_task_counts else []
    series += [(m.name, m.task_counts) for m in inputs.methods if m.task_counts]
    if not series:
        return None
    tasks = _tasks_by_pool_size(inputs.pool_task_counts, inputs.methods)
    shown = tasks[:MAX_TASKS_SHOWN]
    labels = shown + ([OTHER_TASKS_LABEL] if len(shown) < len(tasks) else [])
    fig, (ax,) = _new_figure()
    width = 0.8 / len(series)
    x = np.arange(len(labels))
    for i, (name, counts) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, _shares(counts, tasks, shown), width, label=name,
               color="0.6" if name == POOL_LABEL else None)
    ax.set_xticks(x, labels, rotation=30 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center")
    ax.set_ylabel("share of rows (%)")
    ax.set_xlabel("task")
    ax.set_title("Task mix: pool vs selections" if len(series) > 1 else f"Task mix: {series[0][0]}")
    ax.legend(fontsize="small", ncols=min(len(series), 4))
    ax.grid(axis="y", alpha=0.3)
    return _png_bytes(fig)


def plot_score_distributions(inputs: RunInputs) -> bytes | None:
    """One histogram per method of its main score: all rows, with the selected rows overlaid."""
    methods = [m for m in inputs.methods if m.scores is not None and np.isfinite(m.scores).any()]
    if not methods:
        return None
    cols = min(len(methods), 3)
    rows = math.ceil(len(methods) / cols)
    fig, axes = _new_figure(rows, cols, height=2.6 * rows + 0.4)
    for ax, method in zip(axes, methods):
        finite = np.isfinite(method.scores)
        scores = method.scores[finite]
        bins = np.histogram_bin_edges(scores, bins=30)
        ax.hist(scores, bins=bins, color="0.7", label="all")
        if method.selected is not None:
            ax.hist(method.scores[finite & method.selected], bins=bins, color="tab:blue", label="selected")
        ax.set_title(method.name, fontsize="medium")
        ax.set_xlabel("score")
        ax.set_ylabel("rows")
        ax.legend(fontsize="x-small")
    for ax in axes[len(methods):]:
        ax.set_visible(False)
    fig.suptitle("Score distributions per method")
    return _png_bytes(fig)


#: columns of ``stats/<method>/clusters.parquet`` a cluster plot reads: size (needed) and density (optional)
CLUSTER_COLUMNS = (layout.CLUSTER, layout.SIZE, "density")


def _cluster_plot_methods() -> dict[str, str]:
    """{method: plot title} of the registered methods that name a cluster plot."""
    return {name: cls.report_clusters for name, cls in registry().items() if cls.report_clusters}


def plot_clusters(inputs: RunInputs, method: str, title: str) -> bytes | None:
    """A method's clusters (``stats/<method>/clusters.parquet``): histogram of sizes, and size vs density."""
    table = inputs.clusters.get(method)
    if table is None or layout.SIZE not in table.column_names:
        return None
    sizes = table.column(layout.SIZE).to_numpy(zero_copy_only=False).astype(np.float64)
    has_density = "density" in table.column_names
    fig, axes = _new_figure(1, 2 if has_density else 1)
    axes[0].hist(sizes, bins=min(40, max(5, len(np.unique(sizes)))), color="tab:green")
    axes[0].set_xlabel("cluster size (rows)")
    axes[0].set_ylabel("clusters")
    axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_title(f"Cluster sizes (K = {table.num_rows})", fontsize="medium")
    if has_density:
        density = table.column("density").to_numpy(zero_copy_only=False).astype(np.float64)
        axes[1].scatter(sizes, density, s=10, alpha=0.6, color="tab:green")
        if sizes.min() > 0 and sizes.max() / sizes.min() > 50:
            axes[1].set_xscale("log")
        axes[1].set_xlabel("cluster size (rows)")
        axes[1].set_ylabel("density")
        axes[1].set_title("Size vs density", fontsize="medium")
    fig.suptitle(title)
    return _png_bytes(fig)


def quarantine_counts(inputs: RunInputs) -> list[tuple[str, str, int]]:
    """``(phase, reason, rows)`` sorted by rows (descending), then phase and reason."""
    if inputs.quarantine is None:
        return []
    pairs = zip(inputs.quarantine.column("phase").to_pylist(), inputs.quarantine.column("reason").to_pylist())
    counts: dict[tuple[str, str], int] = {}
    for phase, reason in pairs:
        key = (str(phase), str(reason))
        counts[key] = counts.get(key, 0) + 1
    return sorted(((p, r, n) for (p, r), n in counts.items()), key=lambda item: (-item[2], item[0], item[1]))


def plot_quarantine(inputs: RunInputs) -> bytes | None:
    """Horizontal bars: quarantined rows per phase and reason."""
    counts = quarantine_counts(inputs)
    if not counts:
        return None
    counts = counts[::-1]  # largest on top
    fig, (ax,) = _new_figure(height=max(2.0, 0.35 * len(counts) + 1.2))
    colours = {"ingest": "tab:orange", "extract": "tab:red"}
    bars = ax.barh([f"{phase}: {reason}" for phase, reason, _ in counts], [n for _, _, n in counts],
                   color=[colours.get(phase, "tab:gray") for phase, _, _ in counts])
    ax.bar_label(bars, padding=2, fontsize="small")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("rows")
    ax.set_title("Quarantined rows by reason")
    ax.margins(x=0.1)
    return _png_bytes(fig)


def phase_seconds(manifest: dict) -> list[tuple[str, float]]:
    """``(phase, seconds)`` of the phases that recorded a duration, in pipeline order."""
    phases = manifest.get("phases", {})
    ordered = [p for p in PHASES if p in phases] + sorted(p for p in phases if p not in PHASES)
    return [(p, float(phases[p]["seconds"])) for p in ordered if isinstance(phases[p].get("seconds"), (int, float))]


def plot_phase_times(inputs: RunInputs) -> bytes | None:
    """Bars: wall-clock seconds per phase."""
    times = phase_seconds(inputs.manifest)
    if not times:
        return None
    fig, (ax,) = _new_figure()
    bars = ax.bar([p for p, _ in times], [s for _, s in times], color="tab:purple")
    ax.bar_label(bars, labels=[_format_seconds(s) for _, s in times], padding=2, fontsize="small")
    ax.set_xlabel("phase")
    ax.set_ylabel("seconds")
    ax.set_title("Time per phase")
    ax.margins(y=0.15)
    return _png_bytes(fig)


def plot_dedup(inputs: RunInputs) -> bytes | None:
    """Left: groups and dropped rows per task; right: histogram of the dropped rows' similarity to the row they
    duplicate (semantic pass; exact duplicates are 1.0)."""
    d = inputs.dedup
    if d is None or not d["tasks"]:
        return None
    fig, (left, right) = _new_figure(1, 2)
    tasks = [t["task"] for t in d["tasks"]]
    x = np.arange(len(tasks))
    left.bar(x - 0.2, [t["groups"] for t in d["tasks"]], width=0.4, label="groups")
    left.bar(x + 0.2, [t["dropped_exact"] + t["dropped_semantic"] for t in d["tasks"]], width=0.4, label="dropped")
    left.set_xticks(x, tasks, rotation=45, ha="right", fontsize="small")
    left.set_title("Duplicate groups per task")
    left.legend(fontsize="small")
    sem = d["similarity"][d["pass"] == layout.PASS_SEMANTIC]
    if len(sem):
        right.hist(sem, bins=20, color="tab:orange")
    right.set_xlabel("similarity to the earlier-ranked row")
    right.set_ylabel("dropped rows")
    right.set_title(f"Near duplicates (threshold {1 - d['meta'].get('config', {}).get('eps', 0):.3f})")
    fig.tight_layout()
    return _png_bytes(fig)


def plot_dedup_group(inputs: RunInputs, group: int, thumbnail: int = 160) -> bytes | None:
    """One example group of :func:`read_dedup` as a strip: the images of each member (kept row first), titled
    with its row id and, for a dropped row, its similarity and pass. A text-only row, or one whose image cannot
    be read any more, gets an empty frame saying so. None when the group does not exist."""
    from datasel_ray.io.images import load_row_images
    from datasel_ray.io.storage import StorageError
    from datasel_ray.schema import RowError

    d = inputs.dedup
    if d is None or group >= len(d["examples"]):
        return None
    members = d["examples"][group]
    pictures: list[tuple[dict, list, str]] = []
    for member in members:
        row = d["example_rows"].get(member["row_id"])
        try:
            images = load_row_images(row) if row is not None else []
            note = "" if images else "text only"
        except (RowError, StorageError) as err:
            images, note = [], f"unreadable\n{getattr(err, 'reason', type(err).__name__)}"
        for image in images:
            image.thumbnail((thumbnail, thumbnail))
        pictures.append((member, images, note))
    panels = sum(max(1, len(images)) for _, images, _ in pictures)
    fig, axes = _new_figure(1, panels, height=2.2)
    k = 0
    for member, images, note in pictures:
        label = (f"row {member['row_id']}\nkept" if member["kept"]
                 else f"row {member['row_id']}\n{member.get('pass', '')} {member.get('similarity', 0):.3f}")
        for j, image in enumerate(images or [None]):
            ax = axes[k]
            k += 1
            ax.set_xticks([])
            ax.set_yticks([])
            if image is None:
                ax.set_xlim(0, 1)
                ax.set_ylim(0, 1)
                ax.set_aspect("equal")
                ax.text(0.5, 0.5, note, ha="center", va="center", fontsize="xx-small")
            else:
                ax.imshow(np.asarray(image.convert("RGB")))
            title = label if j == 0 else f"\nimage {j + 1}"
            ax.set_title(title, fontsize="x-small", color="tab:green" if member["kept"] else "black")
    return _png_bytes(fig)


def dedup_group_filename(group: int) -> str:
    return f"dedup_group_{group}.png"


def _render_dedup(inputs: RunInputs, group_images: dict[int, str] | None = None) -> str:
    d = inputs.dedup
    if d is None:
        return ""
    m = d["meta"]
    head = (f"<p>kept {_fmt_int(m.get('kept'))} of {_fmt_int(m.get('rows'))} rows; dropped "
            f"{_fmt_int(m.get('dropped_exact'))} exact and {_fmt_int(m.get('dropped_semantic'))} near duplicates "
            f"in {_fmt_int(m.get('groups'))} groups (feature {_esc(m.get('feature'))}, eps "
            f"{_esc(m.get('config', {}).get('eps'))}, ranking {_esc(m.get('config', {}).get('ranking'))})</p>")
    rows = "".join(f"<tr><td class='text'>{_esc(t['task'])}</td><td>{_fmt_int(t['rows'])}</td>"
                   f"<td>{_fmt_int(t['kept'])}</td><td>{_fmt_int(t['dropped_exact'])}</td>"
                   f"<td>{_fmt_int(t['dropped_semantic'])}</td><td>{_fmt_int(t['groups'])}</td></tr>" for t in d["tasks"])
    table = ("<table><tr><th class='text'>task</th><th>rows</th><th>kept</th><th>exact</th><th>semantic</th>"
             f"<th>groups</th></tr>{rows}</table>")
    group_images = group_images or {}

    def member(e: dict) -> str:
        how = "kept" if e["kept"] else f"dropped ({_esc(e.get('pass'))}, similarity {e.get('similarity', 0):.3f})"
        return (f"<li>{how} {_esc(e['row_id'])}: {_esc(', '.join(e.get('images', [])))} "
                f"<em>{_esc(e.get('text'))}</em></li>")

    examples = "".join(
        (f"<img src='{_esc(group_images[k])}' alt='duplicate group {k + 1}'>" if k in group_images else "")
        + "<ul>" + "".join(member(e) for e in group) + "</ul>" for k, group in enumerate(d["examples"]))
    return f"<h2>Near-duplicate removal</h2>{head}{table}" + (f"<h3>Largest groups</h3>{examples}" if examples else "")


def _format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass(frozen=True)
class PlotSpec:
    """One plot of the report: file name, section title, renderer, and the note shown when it is skipped."""

    filename: str
    title: str
    render: Callable[[RunInputs], bytes | None]
    missing_note: str


PLOTS = (  # the plots of every run; plot_specs() adds one cluster plot per method that names one
    PlotSpec("task_mix.png", "Task mix", plot_task_mix,
             "No task mix: no samples/ and no selections/ in this run."),
    PlotSpec("score_distributions.png", "Score distributions", plot_score_distributions,
             "No score distributions: no selections/<method>/scores.parquet with a score column."),
    PlotSpec("quarantine_reasons.png", "Quarantine", plot_quarantine,
             "No quarantined rows (or no quarantine/ tables)."),
    PlotSpec("dedup.png", "Near duplicates", plot_dedup,
             "No near-duplicate plots: dedup/ is absent (the dedup phase has not run)."),
    PlotSpec("phase_times.png", "Time per phase", plot_phase_times,
             "No phase timings in manifest.json."),
)


def plot_specs() -> tuple[PlotSpec, ...]:
    """The report's plots: :data:`PLOTS` with, after the score distributions, one cluster plot per registered
    method whose class names one (``<method>_clusters.png``)."""
    clusters = tuple(PlotSpec(f"{name}_clusters.png", title,
                              functools.partial(plot_clusters, method=name, title=title),
                              f"No cluster plots: stats/{name}/clusters.parquet is absent ({name} not aggregated).")
                     for name, title in _cluster_plot_methods().items())
    return PLOTS[:2] + clusters + PLOTS[2:]


# --- page -----------------------------------------------------------------------------------------------------


def header_counts(inputs: RunInputs) -> dict[str, int | None]:
    """Rows in, samples, quarantined and feature rows: from the manifest, else from the tables."""
    phases = inputs.manifest.get("phases", {})
    ingest = phases.get("ingest", {}).get("result", {})
    extract = phases.get("extract", {}).get("result", {})
    quarantined = ingest.get("quarantined")
    if quarantined is None and inputs.quarantine is not None:
        quarantined = inputs.quarantine.num_rows
    samples = ingest.get("samples", sum(inputs.pool_task_counts.values()) or None)
    return {
        "rows in": ingest.get("rows_in"),
        "samples": samples,
        "quarantined": quarantined,
        "features": extract.get("features"),
        "extract failures": extract.get("failed"),
    }


def method_rows(inputs: RunInputs) -> list[dict]:
    """Per-method summary rows for the page and ``summary.json``."""
    pool_rows = sum(inputs.pool_task_counts.values())
    rows = []
    for method in inputs.methods:
        selected = method.selected_rows
        rows.append({
            "method": method.name,
            "selected": selected,
            "budget_rows": method.summary.get("budget_rows"),
            "share_of_pool": round(selected / pool_rows, 4) if selected is not None and pool_rows else None,
            "task_counts": method.task_counts,
        })
    return rows


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1100px;
       color: #222; line-height: 1.4; padding: 0 16px; }
h1 { font-size: 1.6em; margin-bottom: 4px; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; margin-top: 32px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child, td.text, th.text { text-align: left; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; margin: 8px 0; }
dl.meta dt { font-weight: 600; } dl.meta dd { margin: 0; }
.versions { color: #555; font-size: 0.88em; }
.notes { background: #fff8e1; border-left: 4px solid #f0b400; padding: 8px 14px; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.muted { color: #888; }
"""


def _esc(value) -> str:
    return html.escape("—" if value is None else str(value))


def _fmt_int(value) -> str:
    return "—" if value is None else f"{int(value):,}"


def _fmt_percent(fraction) -> str:
    return "—" if fraction is None else f"{100 * fraction:.1f}%"


def _render_header(inputs: RunInputs) -> str:
    manifest = inputs.manifest
    model = manifest.get("model_id")
    if manifest.get("model_revision"):
        model = f"{model} @ {manifest['model_revision']}"
    meta = [("run id", manifest.get("run_id")), ("model", model), ("seed", manifest.get("seed")),
            ("created", manifest.get("created"))]
    meta += [(name, _fmt_int(value)) for name, value in header_counts(inputs).items()]
    items = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in meta)
    versions = " · ".join(f"{_esc(k)} {_esc(v)}" for k, v in sorted(manifest.get("versions", {}).items()))
    return (f"<h1>datasel report: {_esc(manifest.get('run_id', 'unknown run'))}</h1>"
            f"<dl class='meta'>{items}</dl><p class='versions'>{versions or 'versions not recorded'}</p>")


def _render_method_table(inputs: RunInputs) -> str:
    rows = method_rows(inputs)
    if not rows:
        return ""
    body = "".join(
        f"<tr><td>{_esc(r['method'])}</td><td>{_fmt_int(r['selected'])}</td><td>{_fmt_int(r['budget_rows'])}</td>"
        f"<td>{_fmt_percent(r['share_of_pool'])}</td></tr>"
        for r in rows)
    return ("<h2>Selections</h2><table><tr><th>method</th><th>selected rows</th><th>budget rows</th>"
            f"<th>share of pool</th></tr>{body}</table>")


def _render_task_table(inputs: RunInputs) -> str:
    """Rows per task: pool count, then each method's count and its share of the task's pool rows."""
    if not inputs.methods and not inputs.pool_task_counts:
        return ""
    tasks = _tasks_by_pool_size(inputs.pool_task_counts, inputs.methods)
    method_counts = [(m.name, m.task_counts) for m in inputs.methods]
    head = "<tr><th>task</th><th>pool</th>" + "".join(f"<th>{_esc(n)}</th>" for n, _ in method_counts) + "</tr>"
    body = []
    for task in tasks:
        pool = inputs.pool_task_counts.get(task)
        cells = [f"<td>{_esc(task)}</td><td>{_fmt_int(pool)}</td>"]
        for _, counts in method_counts:
            n = counts.get(task, 0)
            share = f" <span class='muted'>({100 * n / pool:.0f}%)</span>" if pool else ""
            cells.append(f"<td>{_fmt_int(n)}{share}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    caption = ("Selected rows per task; in brackets, the share of that task's pool rows." if method_counts
               else "Pool rows per task.")
    return f"<h2>Rows per task</h2><p class='muted'>{caption}</p><table>{head}{''.join(body)}</table>"


def _render_quarantine_table(inputs: RunInputs) -> str:
    counts = quarantine_counts(inputs)
    if not counts:
        return ""
    body = "".join(f"<tr><td>{_esc(p)}</td><td class='text'>{_esc(r)}</td><td>{_fmt_int(n)}</td></tr>"
                   for p, r, n in counts)
    return f"<table><tr><th>phase</th><th class='text'>reason</th><th>rows</th></tr>{body}</table>"


def render_html(inputs: RunInputs, plots: list[tuple[PlotSpec, str]], notes: list[str],
                group_images: dict[int, str] | None = None) -> str:
    """The report page. ``plots`` pairs each written plot with its file name relative to the page;
    ``group_images``: the strip of each dedup example group (``{group: file name}``)."""
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>datasel report {_esc(inputs.manifest.get('run_id', ''))}</title><style>{_CSS}</style></head><body>",
             _render_header(inputs)]
    if notes:
        parts.append("<div class='notes'><strong>Not shown</strong><ul>"
                     + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul></div>")
    parts += [_render_method_table(inputs), _render_task_table(inputs), _render_dedup(inputs, group_images)]
    for spec, filename in plots:
        parts.append(f"<h2>{_esc(spec.title)}</h2>")
        if spec.filename == "quarantine_reasons.png":
            parts.append(_render_quarantine_table(inputs))
        parts.append(f"<img src='{_esc(filename)}' alt='{_esc(spec.title)}'>")
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)


def _summary_json(inputs: RunInputs, notes: list[str]) -> dict:
    manifest = inputs.manifest
    return {
        "run_id": manifest.get("run_id"),
        "model_id": manifest.get("model_id"),
        "seed": manifest.get("seed"),
        "counts": header_counts(inputs),
        "pool_task_counts": inputs.pool_task_counts,
        "methods": method_rows(inputs),
        "quarantine": [{"phase": p, "reason": r, "rows": n} for p, r, n in quarantine_counts(inputs)],
        "phase_seconds": [{"phase": p, "seconds": s} for p, s in phase_seconds(manifest)],
        "dedup": None if inputs.dedup is None else {**{k: v for k, v in inputs.dedup["meta"].items()
                                                        if k != "step_seconds"}, "tasks": inputs.dedup["tasks"],
                                                     "example_groups": inputs.dedup["examples"]},
        "notes": notes,
    }


def write_report(run_dir: RunDir) -> dict:
    """Write ``report/index.html``, its PNG plots and ``report/summary.json``; return their paths and notes.

    Returns ``{"html": str, "plots": [str, ...], "summary": str, "notes": [str, ...], "dedup_groups": [str, ...]}``
    (``dedup_groups``: the image strip of each example group of the dedup phase); a plot whose inputs are
    absent is skipped and named in ``notes``.
    """
    inputs = read_run_inputs(run_dir)
    out = run_dir / "report"
    for stale in out.list(".png"):
        stale.delete()
    written: list[tuple[PlotSpec, Location]] = []
    notes: list[str] = [] if inputs.methods else [NO_SELECTIONS_NOTE]
    for spec in plot_specs():
        png = spec.render(inputs)
        if png is None:
            notes.append(spec.missing_note)
            continue
        target = out / spec.filename
        target.write_bytes(png)
        written.append((spec, target))
    group_images: dict[int, str] = {}
    for group in range(len(inputs.dedup["examples"]) if inputs.dedup else 0):
        png = plot_dedup_group(inputs, group)
        if png is not None:
            target = out / dedup_group_filename(group)
            target.write_bytes(png)
            group_images[group] = target.name
    page = out / "index.html"
    page.write_text(render_html(inputs, [(spec, loc.name) for spec, loc in written], notes, group_images))
    summary = out / "summary.json"
    summary.write_json(_summary_json(inputs, notes))
    return {"html": str(page), "plots": [str(loc) for _, loc in written], "summary": str(summary), "notes": notes,
            "dedup_groups": [str(out / name) for name in group_images.values()]}
