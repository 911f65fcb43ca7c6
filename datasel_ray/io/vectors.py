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
    storage = pa.FixedSizeBinaryArray.from_buffers(typ.storage_type, len(a), [None, pa.py_buffer(a.tobytes())])
    return pa.ExtensionArray.from_storage(typ, storage)


def vector_numpy(column: pa.Array) -> np.ndarray:
    """A vector column (one chunk) as a numpy array [N, width] in its stored dtype (a copy)."""
    typ = column.type
    storage = column.storage
    dtype = np.dtype(typ.dtype_name)
    row_bytes = typ.width * dtype.itemsize
    if len(storage) == 0:
        return np.zeros((0, typ.width), dtype=dtype)
    buf = storage.buffers()[1]
    flat = np.frombuffer(buf, dtype=np.uint8, count=len(storage) * row_bytes, offset=storage.offset * row_bytes)
    return flat.view(dtype).reshape(len(storage), typ.width).copy()
