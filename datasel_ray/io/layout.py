"""Names of everything the aggregate and select phases write: the contract between aggregate, select, the
online scorer and the report (one definition per file and column name).

``stats/``
    ``meta.json``, ``tasks.parquet`` (per-task statistics), one folder per method (:data:`METHOD_STATS`):
    ``coincide/``: ``clusters.parquet`` (:data:`CLUSTERS`: cluster, size, density, transferability,
    probability, bucket, offset), ``centroids.npy`` (clustering-space unit centroids), ``projection.npz``
    (with ``reduce_dim``), ``assignments.parquet`` (row_id, cluster), ``members/<bucket>.parquet``
    (the cluster's rows grouped by (cluster, row_id): row_id, cluster, vector, kernel_sum);
    ``datatailor/``: ``clusters.parquet`` (cluster, task, size, association, pair_sum, v_sum, bucket,
    offset), ``means.npy``, ``rows.parquet`` (per-row scalars), ``members/<bucket>.parquet``;
    ``tive/``: ``tasks.parquet`` (task, size, task_value, mean_gradient_norm), ``task_mean_grad.npy``,
    ``rows.parquet`` (row_id, instance_value).
    ``_work/`` holds per-partition results of an unfinished phase (resume) and the intermediate files passed
    between a method's fit steps (:data:`WORK_REGROUP`, :data:`WORK_UNIT`, :data:`WORK_MEANS`, ...); removed
    when the phase ends.
``dedup/``
    ``dropped.parquet`` (:data:`DROPPED`: row_id, task, representative, duplicate_of, similarity, pass, cluster),
    ``pairs.parquet`` (row_a ranked before row_b, similarity, pass, cluster: every pair at or above 1 - eps),
    ``groups.parquet`` (representative, task, size, exact, semantic: groups of two rows or more),
    ``tasks.parquet`` (task, rows, kept, dropped_exact, dropped_semantic, groups), ``digests.parquet``
    (:data:`DIGESTS`: row_id, digest of every row sorted by digest: the online exact lookup), ``centroids.npy``,
    ``clusters.parquet`` (cluster, size, bucket, offset), ``members/<bucket>.parquet`` (row_id, cluster, vector
    as stored: the online near-duplicate lookup), ``meta.json`` and, with ``select.dedup``, ``kept/`` (the
    feature shards of the kept rows, what aggregate and select then read).
``selections/<method>/``
    ``scores.parquet``, ``selected_ids.npy``, ``summary.json``, ``subset/``; COINCIDE also ``quotas.parquet``.
"""

from __future__ import annotations

from datasel_ray.io.storage import Location

STATS = "stats"
DEDUP = "dedup"
DROPPED = "dropped.parquet"
PAIRS = "pairs.parquet"
GROUPS = "groups.parquet"
KEPT = "kept"
DIGESTS = "digests.parquet"
SELECTIONS = "selections"
WORK = "_work"
META = "meta.json"
TASKS = "tasks.parquet"
CLUSTERS = "clusters.parquet"
CENTROIDS = "centroids.npy"
PROJECTION = "projection.npz"
ASSIGNMENTS = "assignments.parquet"
MEMBERS = "members"
MEANS = "means.npy"
ROWS = "rows.parquet"
TASK_MEAN_GRAD = "task_mean_grad.npy"
SCORES = "scores.parquet"
SELECTED_IDS = "selected_ids.npy"
SUMMARY = "summary.json"
SUBSET = "subset"
QUOTAS = "quotas.parquet"

# intermediate files under stats/_work/<method>/ (passed between the fit steps of one aggregate phase)
WORK_REGROUP = "buckets"  # regrouped rows: <bucket>/<partition>.parquet (row_id, cluster, vector, ...)
WORK_BUCKET_PLAN = "buckets.npy"  # int64 [groups]: the regroup bucket of each cluster / group
WORK_GROUPS = "groups.npy"  # int64 [N]: the group of each row (DataTailor)
WORK_UNIT = "unit"  # COINCIDE with reduce_dim: <partition>.npy, the partition's clustering-space rows
WORK_MEANS = "means"  # COINCIDE with reduce_dim: <bucket>.npy, original-space means of the bucket's clusters
WORK_PRECLUSTERS = "preclusters"  # DataTailor: PRECLUSTER_CENTROIDS of each large task
PRECLUSTER_CENTROIDS = "centroids-{task:05d}.npy"  # float32 [m, d] pre-cluster centroids of task code ``task``
WORK_TASK_MEANS = "means.npy"  # TIVE: float64 [T, k] task-mean normalised gradients

# column names of the stats tables
CLUSTER = "cluster"
SIZE = "size"
BUCKET = "bucket"
OFFSET = "offset"
VECTOR = "vector"
KERNEL_SUM = "kernel_sum"
SELECTED = "selected"
SCORE = "score"
REPRESENTATIVE = "representative"
DUPLICATE_OF = "duplicate_of"
SIMILARITY = "similarity"
PASS = "pass"
PASS_EXACT = "exact"
PASS_SEMANTIC = "semantic"
COS_CENTROID = "cos_centroid"


def method_stats(run_dir, method: str) -> Location:
    """``stats/<method>/`` of a run directory (a :class:`~datasel_ray.io.rundir.RunDir` or Location)."""
    return run_dir / STATS / method


def selection_dir(run_dir, method: str) -> Location:
    return run_dir / SELECTIONS / method


def bucket_key(bucket: int) -> str:
    """The name of bucket ``bucket`` in file and work-step names (``00012``)."""
    return f"{int(bucket):05d}"


def members_file(stats: Location, bucket: int) -> Location:
    return stats / MEMBERS / f"{bucket_key(bucket)}.parquet"
