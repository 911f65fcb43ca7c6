"""Budget helpers shared by the selection methods (pure numpy).

* :func:`resolve_budget` turns a budget given as a pool fraction (``< 1``) or a row count (``>= 1``) into rows,
  exactly like :meth:`datasel_ray.config.SelectConfig.budget_rows`.
* :func:`largest_remainder` rounds real-valued shares to integers that sum exactly to a total
  (Hamilton / largest-remainder method; ties broken by the lowest index).
* :func:`allocate_proportional` splits a total in proportion to weights, with optional per-entry caps: entries
  whose proportional share reaches their cap are fixed at the cap and the excess is redistributed over the
  others in proportion to their weights, iterating until no share exceeds its cap; the remaining shares are
  then rounded with :func:`largest_remainder`. Used by DataTailor's task budgets (App. B.2, Eq. 14), the
  ``random_per_task`` baseline and TIVE's task budgets.
"""

from __future__ import annotations

import numpy as np

__all__ = ["allocate_proportional", "largest_remainder", "resolve_budget"]


def resolve_budget(budget: float | int, n: int) -> int:
    """Return ``budget`` as a row count for a pool of ``n`` rows.

    ``budget < 1`` is a fraction of the pool (``round(budget * n)``, Python rounding); ``budget >= 1`` is a row
    count. The result is clipped to ``[0, n]``. ``SelectConfig.budget_rows`` calls this.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)):
        raise ValueError(f"budget must be a number (fraction < 1 or row count >= 1), got {budget!r}")
    if not np.isfinite(budget) or budget < 0:
        raise ValueError(f"budget must be a finite number >= 0, got {budget!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rows = round(float(budget) * n) if budget < 1 else int(budget)
    return max(0, min(int(rows), int(n)))


def largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Round non-negative real ``shares`` (float[T]) to int64[T] summing to ``total``.

    Each entry gets ``floor(share)``; the ``total - sum(floor)`` leftover units go to the entries with the largest
    fractional parts (ties: lowest index). ``shares`` must sum to ``total`` up to rounding error.
    """
    shares = np.asarray(shares, dtype=np.float64)
    base = np.floor(shares + 1e-9).astype(np.int64)
    base = np.minimum(base, np.ceil(shares).astype(np.int64))
    left = int(total) - int(base.sum())
    if left > 0:
        frac = shares - base
        order = np.lexsort((np.arange(len(shares)), -frac))
        base[order[:left]] += 1
    elif left < 0:  # only from float error: take back from the smallest fractional parts
        frac = shares - base
        order = np.lexsort((np.arange(len(shares)), frac))
        order = order[base[order] > 0]
        base[order[:-left]] -= 1
    return base


def allocate_proportional(weights: np.ndarray, total: int, caps: np.ndarray | None = None) -> np.ndarray:
    """Split ``total`` rows over T groups in proportion to ``weights``, respecting optional ``caps``.

    Args:
        weights: float[T], finite and >= 0. If every weight is 0 the split is uniform.
        total: int >= 0, the number of rows to hand out.
        caps: int[T] >= 0 or None. Group ``t`` never gets more than ``caps[t]``. When ``total > caps.sum()``
            the total is clipped to ``caps.sum()`` (every group gets its cap).

    Returns:
        int64[T] allocations summing exactly to ``min(total, caps.sum())``.

    Capping iterates: groups whose proportional share of the still-unassigned total reaches their cap are fixed
    at the cap; the rest is re-split over the uncapped groups by their weights, until none exceeds its cap.
    If only zero-weight groups still have room, the leftover goes to them in proportion to their free capacity.
    Rounding uses :func:`largest_remainder`, so the result is deterministic.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1:
        raise ValueError(f"weights must be a 1-D float array [T], got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and >= 0")
    if isinstance(total, bool) or int(total) != total or total < 0:
        raise ValueError(f"total must be an integer >= 0, got {total!r}")
    total = int(total)
    T = len(w)
    if caps is None:
        if T == 0:
            if total:
                raise ValueError("weights is empty but total > 0")
            return np.zeros(0, dtype=np.int64)
        if w.sum() <= 0:
            w = np.ones(T)
        return largest_remainder(total * w / w.sum(), total)
    c = np.asarray(caps)
    if c.shape != (T,):
        raise ValueError(f"caps must have shape ({T},) like weights, got {c.shape}")
    if np.any(c < 0) or not np.all(np.equal(np.round(c), c)):
        raise ValueError("caps must be integers >= 0")
    c = c.astype(np.int64)
    total = min(total, int(c.sum()))
    if w.sum() <= 0:
        w = np.ones(T)
    out = np.zeros(T, dtype=np.int64)
    fixed = c == 0
    remaining = total
    while True:
        active = ~fixed & (w > 0)
        if remaining == 0 or not active.any():
            break
        share = np.zeros(T)
        share[active] = remaining * w[active] / w[active].sum()
        over = active & (share >= c)
        if not over.any():
            out[active] = largest_remainder(share[active], remaining)
            remaining = 0
            break
        out[over] = c[over]
        remaining -= int(c[over].sum())
        fixed |= over
    if remaining > 0:  # only zero-weight groups have room left: fill by free capacity
        room = np.where(fixed, 0, c - out).astype(np.float64)
        out += largest_remainder(remaining * room / room.sum(), remaining)
    return out
