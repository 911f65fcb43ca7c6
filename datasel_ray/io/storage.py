"""Paths on any pyarrow filesystem: local paths and URIs such as ``s3://bucket/run`` or ``gs://...``.

Every phase reads and writes through :class:`Location`, so a run directory or a pool can live on object
storage. Writes are atomic: local files are written to a temporary name and renamed; object stores
publish an object only when its upload completes.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from datasel_ray.io import vectors  # noqa: F401  (registers the vector column type before any parquet read)


def _is_uri(path: str) -> bool:
    return "://" in path


@dataclass(frozen=True)
class Location:
    """A filesystem plus a path on it. ``str(loc)`` gives back the user-facing form."""

    fs: pafs.FileSystem
    path: str
    uri_prefix: str = ""

    @classmethod
    def parse(cls, path_or_uri: str | Path) -> "Location":
        text = str(path_or_uri)
        if not text:
            raise ValueError("path must not be empty")
        if _is_uri(text) and not text.startswith("file://"):
            fs, path = pafs.FileSystem.from_uri(text)
            scheme = text.split("://", 1)[0]
            return cls(fs, path.rstrip("/"), f"{scheme}://")
        if text.startswith("file://"):
            text = text[len("file://"):]
        return cls(pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text)))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def __str__(self) -> str:
        return f"{self.uri_prefix}{self.path}"

    def __truediv__(self, name: str) -> "Location":
        return Location(self.fs, posixpath.join(self.path, name), self.uri_prefix)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> "Location":
        return Location(self.fs, posixpath.dirname(self.path), self.uri_prefix)

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.File

    def size(self) -> int:
        return self.fs.get_file_info(self.path).size or 0

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def list(self, suffix: str = "", recursive: bool = False) -> list["Location"]:
        """Files directly under this directory (or below it), sorted by path; [] if it does not exist."""
        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive))
        paths = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))
        return [Location(self.fs, p, self.uri_prefix) for p in paths]

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def open_input(self):
        return self.fs.open_input_file(self.path)

    def write_bytes(self, data: bytes) -> None:
        """Write ``data`` atomically (readers see the old file or the whole new one)."""
        self.write_with(lambda f: f.write(data))

    def write_with(self, write: Callable[[Any], Any]) -> None:
        """``write(f)`` into a binary file object, atomically where local (a temporary file renamed into place):
        streams the content instead of building it in memory first."""
        self.parent.mkdir()
        if self.is_local:
            tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        else:
            with self.fs.open_output_stream(self.path) as f:
                write(f)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def write_json(self, obj) -> None:
        self.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

    def read_json(self):
        return json.loads(self.read_text())

    def write_parquet(self, table: pa.Table, row_group_rows: int | None = None) -> None:
        """Write a parquet file atomically; ``row_group_rows`` bounds the rows per row group (readers of a row
        range decode only the groups it touches, see :meth:`read_parquet_rows`). Vector columns are stored
        uncompressed (float noise does not compress; zstd would only cost time), the rest with zstd. Only
        string columns are dictionary-encoded: a dictionary of per-row numbers (ids, scores) is as large as the
        column and its hash table costs the writer ~100 bytes per row."""
        compression = {f.name: "none" if isinstance(f.type, vectors.VectorType) else "zstd" for f in table.schema}
        dictionary = [f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
                      or pa.types.is_dictionary(f.type)]
        self.write_with(lambda f: pq.write_table(table, f, compression=compression or "zstd", use_dictionary=dictionary,
                                                 row_group_size=row_group_rows))

    def read_parquet(self, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.path, columns=columns, filesystem=self.fs)

    def read_parquet_rows(self, offset: int, count: int, columns: list[str] | None = None) -> pa.Table:
        """Rows ``[offset, offset + count)`` of a parquet file, reading only the row groups they fall in."""
        with self.open_input() as handle:
            reader = pq.ParquetFile(handle)
            groups, first, start = [], None, 0
            for g in range(reader.metadata.num_row_groups):
                rows = reader.metadata.row_group(g).num_rows
                if start + rows > offset and start < offset + count:
                    groups.append(g)
                    first = start if first is None else first
                start += rows
            if not groups:
                return reader.schema_arrow.empty_table().select(columns or reader.schema_arrow.names)
            table = reader.read_row_groups(groups, columns=columns)
        return table.slice(offset - first, count)

    def write_npy(self, array) -> None:
        import numpy as np

        self.write_with(lambda f: np.save(f, array, allow_pickle=False))

    def read_npy(self, mmap: bool = False):
        """The array of a ``.npy`` file; ``mmap``: memory-mapped read-only where the file is local (rows are
        then read from disk only when indexed)."""
        import numpy as np

        if mmap and self.is_local:
            return np.load(self.path, mmap_mode="r", allow_pickle=False)
        return np.load(io.BytesIO(self.read_bytes()), allow_pickle=False)

    def delete(self) -> None:
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)


def read_parquet_dir(loc: Location, columns: list[str] | None = None) -> pa.Table | None:
    """Concatenate every ``*.parquet`` file under ``loc`` in path order; None when there is none."""
    files = loc.list(".parquet")
    if not files:
        return None
    tables = [f.read_parquet(columns) for f in files]
    return pa.concat_tables(tables, promote_options="default")
