"""Selection quality against the ground truth of a generated pool (see :mod:`datasel_ray.synthetic`).

* ``duplicate_rate``: share of selected rows that repeat a near-duplicate group already represented in the
  selection (0 = no redundant copy selected).
* ``noise_rate``: share of selected rows whose answer is unrelated to the input.
* ``task_coverage``: share of the pool's tasks with at least one selected row; ``task_counts`` per task.

A single random selection is a noisy baseline (at 20% of 2,000 rows its duplicate rate varies by about +-0.01
from seed to seed); :func:`random_expectation` gives the mean and spread over many seeded draws instead, globally
or with a method's own task mix.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from datasel_ray import schema


def selection_quality(selected_row_ids: np.ndarray, ground_truth: list[dict], pool_tasks: set[str]) -> dict:
    """Quality of a selection of ``selected_row_ids`` (int64 row ids of a one-file pool)."""
    rows = [ground_truth[schema.record_index(r)] for r in np.asarray(selected_row_ids, dtype=np.int64)]
    n = len(rows)
    seen: set[int] = set()
    repeats = 0
    for row in rows:
        group = row["dup_group"]
        if group >= 0:
            repeats += group in seen
            seen.add(group)
    tasks = Counter(row["task"] for row in rows)
    return {
        "selected": n,
        "duplicate_rate": repeats / n if n else 0.0,
        "noise_rate": sum(bool(r["noisy"]) for r in rows) / n if n else 0.0,
        "task_coverage": len(set(tasks) & pool_tasks) / len(pool_tasks) if pool_tasks else 0.0,
        "task_counts": dict(sorted(tasks.items())),
    }


def pool_quality(ground_truth: list[dict]) -> dict:
    """The same statistics for the whole pool's good rows (the baseline a selection is compared with)."""
    good = [i for i, r in enumerate(ground_truth) if not r.get("bad_kind")]
    tasks = {ground_truth[i]["task"] for i in good}
    return selection_quality(np.array(good, dtype=np.int64), ground_truth, tasks)


def random_expectation(row_ids: np.ndarray, budget: int, ground_truth: list[dict], pool_tasks: set[str],
                       draws: int = 100, seed: int = 0, task_counts: dict[str, int] | None = None) -> dict:
    """Mean and std of duplicate rate, noise rate and coverage over ``draws`` uniform random selections of
    ``budget`` rows from ``row_ids`` (int64), drawn from one seeded generator.

    ``task_counts`` (task -> rows, e.g. a method's selection): draw that many rows of each task instead, the
    random baseline with the method's task mix (duplicates may sit in some tasks only).
    """
    rng = np.random.default_rng(seed)
    ids = np.asarray(row_ids, dtype=np.int64)
    if task_counts is None:
        def draw() -> np.ndarray:
            return rng.choice(ids, size=min(budget, len(ids)), replace=False)
    else:
        tasks = np.array([ground_truth[schema.record_index(r)]["task"] for r in ids])
        by_task = {t: ids[tasks == t] for t in task_counts}

        def draw() -> np.ndarray:
            return np.concatenate([rng.choice(by_task[t], size=min(n, len(by_task[t])), replace=False)
                                   for t, n in sorted(task_counts.items())])
    stats = [selection_quality(draw(), ground_truth, pool_tasks) for _ in range(draws)]
    return {"draws": draws, "selected": int(np.mean([q["selected"] for q in stats])),
            **{key: {"mean": float(np.mean([q[key] for q in stats])), "std": float(np.std([q[key] for q in stats]))}
               for key in ("duplicate_rate", "noise_rate", "task_coverage")}}
