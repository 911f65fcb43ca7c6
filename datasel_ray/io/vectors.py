"""The column type of fixed-width numeric vectors in parquet files (feature, bucket and member files).

A vector column is an Arrow extension type over ``fixed_size_binary(width x itemsize)``: one binary value per
row holding the row's vector. Parquet stores it as one fixed-length byte array per row, so reading and writing
cost a memory copy; a fixed-size list of float16 is stored as one 2-byte value per element and decodes element
by element (tens of times slower at 20k-dim COINCIDE vectors). The type is registered on import of this module,
which :mod:`datasel_ray.io.storage` imports, so every reader decodes it.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

__all__ = ["VectorType", "vector_array", "vector_numpy"]


class VectorType(pa.ExtensionType):
    """``dtype`` (numpy name) x ``width`` vectors, one per row."""

    def __init__(self, dtype: str, width: int):
        self.dtype_name = np.dtype(dtype).name
        self.width = int(width)
        super().__init__(pa.binary(self.width * np.dtype(dtype).itemsize), "datasel.vector")

    def __arrow_ext_serialize__(self) -> bytes:
        return json.dumps({"dtype": self.dtype_name, "width": self.width}).encode()

    @classmethod
    def __arrow_ext_deserialize__(cls, storage_type, serialized: bytes) -> "VectorType":
        meta = json.loads(serialized)
        return cls(meta["dtype"], meta["width"])

    def __reduce__(self):
        return VectorType, (self.dtype_name, self.width)


pa.register_extension_type(VectorType("float16", 1))


def vector_array(values: np.ndarray) -> pa.ExtensionArray:
    """A 2-D numeric array [N, width] as a vector column (its dtype is kept)."""
    a = np.ascontiguousarray(values)
    if a.ndim != 2:
        raise ValueError(f"a vector column needs a 2-D array [N, width], got shape {a.shape}")
    typ = VectorType(a.dtype.name, a.shape[1])
    # zero-copy: the buffer keeps ``a`` alive
    storage = pa.FixedSizeBinaryArray.from_buffers(typ.storage_type, len(a), [None, pa.py_buffer(a.view(np.uint8))])
    return pa.ExtensionArray.from_storage(typ, storage)


def vector_numpy(column: pa.Array | pa.ChunkedArray, order: np.ndarray | None = None) -> np.ndarray:
    """A vector column as a numpy array [N, width] in its stored dtype: one copy, whatever the chunking.
    ``order`` (int[N], a permutation): row ``i`` of the result is row ``order[i]`` of the column, written
    straight from the column's buffers (no second copy for a sort)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    typ = column.type
    dtype = np.dtype(typ.dtype_name)
    row_bytes = typ.width * dtype.itemsize
    n = sum(len(c) for c in chunks)
    out = np.empty((n, typ.width), dtype=dtype)
    dest = None
    if order is not None:
        dest = np.empty(n, dtype=np.int64)
        dest[np.asarray(order, dtype=np.int64)] = np.arange(n)
    start = 0
    for chunk in chunks:
        storage = chunk.storage
        if len(storage):
            flat = np.frombuffer(storage.buffers()[1], dtype=np.uint8, count=len(storage) * row_bytes,
                                 offset=storage.offset * row_bytes)
            rows = flat.view(dtype).reshape(len(storage), typ.width)
            if dest is None:
                out[start:start + len(storage)] = rows
            else:
                out[dest[start:start + len(storage)]] = rows
        start += len(storage)
    return out
