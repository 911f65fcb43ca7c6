"""Exact duplicates: one digest per row from its images' bytes and the normalised text of its turns.

Two rows are exact duplicates when their digests are equal: the same images' bytes in the same order (or both
text-only) and
the same turns after :func:`normalise_text`. In each group of equal digests the first row in pool order (lowest
row id) is kept and the others are dropped (similarity 1.0). Pure Python / numpy; no I/O.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from datasel_ray.roles import IMAGE_PLACEHOLDER

__all__ = ["DIGEST_BYTES", "exact_groups", "normalise_text", "row_digest"]

DIGEST_BYTES = 16
_SPACE = re.compile(r"\s+")


def normalise_text(turns: list[dict]) -> str:
    """The turns as one string that ignores what a copy usually changes: case, runs of whitespace and where the
    ``<image>`` placeholder sits. ``turns``: the validated ``[{"from", "value"}, ...]`` list; each turn becomes
    ``"<role>:<text>"`` (role ``human``/``gpt`` as written, lower-cased), joined by ``\\x1e``."""
    parts = []
    for turn in turns:
        text = str(turn.get("value", "")).replace(IMAGE_PLACEHOLDER, " ")
        parts.append(f"{str(turn.get('from', '')).lower()}:{_SPACE.sub(' ', text).strip().lower()}")
    return "\x1e".join(parts)


def row_digest(images: list[bytes], text: str) -> bytes:
    """``DIGEST_BYTES``-byte BLAKE2b digest of a row's images (their bytes in placeholder order; ``[]``: a
    text-only row) and its normalised text; the count and every part are length-prefixed so that no two
    (images, text) pairs share an input."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    h.update(len(images).to_bytes(8, "little"))
    for data in images:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    data = text.encode("utf-8")
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)
    return h.digest()


def exact_groups(digests: np.ndarray, row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Groups of equal digests, first row (lowest row id) kept.

    digests: ``S16[N]`` (``DIGEST_BYTES``-byte strings); row_ids: int64[N] (any order, unique).
    Returns ``(dropped bool[N], representative int64[N])``: ``representative[i]`` is the row id of the kept row of
    row i's group (its own id when kept).
    """
    digests = np.asarray(digests)
    row_ids = np.asarray(row_ids, dtype=np.int64)
    if digests.shape != row_ids.shape or digests.ndim != 1:
        raise ValueError(f"digests and row_ids must be 1-D of the same length, got {digests.shape} and "
                         f"{row_ids.shape}")
    n = len(row_ids)
    representative = row_ids.copy()
    dropped = np.zeros(n, dtype=bool)
    if n == 0:
        return dropped, representative
    order = np.lexsort((row_ids, digests))
    sorted_digests = digests[order]
    starts = np.r_[True, sorted_digests[1:] != sorted_digests[:-1]]
    group_first = order[np.flatnonzero(starts)][np.cumsum(starts) - 1]
    representative[order] = row_ids[group_first]
    dropped[order] = ~starts
    return dropped, representative
