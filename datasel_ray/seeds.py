"""One root seed per run; every phase, method and shard derives its own from it by name."""

from __future__ import annotations

import hashlib


def derive_seed(root: int, *names: object) -> int:
    """A stable 31-bit seed for ``names`` under ``root`` (same inputs → same seed, on every machine)."""
    text = "/".join([str(int(root)), *map(str, names)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF
