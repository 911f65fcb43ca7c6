"""Pool files: discovery, splitting into read blocks, and reading a block's raw records.

Formats:

* ``json``   — one JSON array of records (LLaVA's ``llava_v1_5_mix665k.json``). A large array is split while
  streaming: :func:`scan_json_array` walks the file in 8 MiB chunks and records the byte span of every
  top-level element, so a block is read by its own task without parsing the whole file.
* ``jsonl``  — one record per line; a broken line becomes an ``invalid_json`` record, not a failed read.
* ``parquet``— the columns of one of the shapes of :mod:`datasel_ray.io.shapes` (``conversations`` / ``messages``
  / ``texts`` as lists of structs, or JSON strings; images as path strings or ``{bytes, path}`` structs).
  A block is a row range; reading it decodes only the row groups that range touches.

A record's identity is ``(file_index, record_index)``; see :func:`datasel_ray.schema.make_row_id`. Ingest records
each file's format in ``samples/pool_files.json`` (:func:`write_pool_files`), and the subset is written back in it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datasel_ray.io.storage import Location

POOL_FILES = "pool_files.json"  # in samples/: every pool file with the format ingest read it in
FORMAT_SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
_SCAN_CHUNK = 8 << 20
# A string runs to its closing quote, or to the end of the buffer when the chunk cut it (then it is carried).
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*(?:"|\\?\Z)|[\[\]{}]|[^\s\[\]{},"]+', re.DOTALL)


class PoolError(ValueError):
    """The pool cannot be read (missing path, unknown format, not a JSON array ...)."""


@dataclass(frozen=True)
class PoolFile:
    index: int
    uri: str
    format: str


@dataclass(frozen=True)
class BlockSpec:
    """A contiguous run of records in one pool file, read by one task."""

    file_index: int
    uri: str
    format: str
    first_record: int
    num_records: int
    start: int = 0  # byte offset (json/jsonl) or row offset (parquet)
    end: int = 0

    @property
    def name(self) -> str:
        return f"{self.file_index:05d}-{self.first_record:010d}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RawRecord:
    """One record as read: ``value`` is the parsed object, or None with ``error`` set when it is not JSON."""

    record_index: int
    text: str
    value: object = None
    error: str = ""


def detect_format(name: str) -> str:
    for suffix, fmt in FORMAT_SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    raise PoolError(f"Cannot tell the format of pool file '{name}': expected one of {', '.join(FORMAT_SUFFIXES)}")


def list_pool_files(path: str, fmt: str = "auto") -> list[PoolFile]:
    """Pool files under ``path`` (a file or a directory), sorted by path, with their formats."""
    if not path:
        raise PoolError("pool.path is empty: set it to a pool file or directory")
    loc = Location.parse(path)
    if loc.is_file():
        files = [loc]
    elif loc.is_dir():
        files = [f for f in loc.list() if any(f.name.endswith(s) for s in FORMAT_SUFFIXES)]
        if not files:
            raise PoolError(f"pool.path '{path}' holds no pool file ({', '.join(FORMAT_SUFFIXES)})")
    else:
        raise PoolError(f"pool.path '{path}' does not exist")
    return [PoolFile(i, str(f), detect_format(f.name) if fmt == "auto" else fmt) for i, f in enumerate(files)]


def write_pool_files(loc: Location, files: list[PoolFile]) -> None:
    """Record the pool files and the format each was read in (``samples/pool_files.json``), so that the subset
    is written back in the format ingest used, whatever the file is called."""
    loc.write_json({"files": [asdict(f) for f in files]})


def read_pool_files(loc: Location) -> dict[str, PoolFile]:
    """``{uri: PoolFile}`` as recorded by :func:`write_pool_files`; {} when ``loc`` does not exist."""
    if not loc.exists():
        return {}
    recorded = loc.read_json()
    return {f["uri"]: PoolFile(**f) for f in recorded.get("files", [])}


def scan_json_array(loc: Location) -> list[tuple[int, int]]:
    """Byte spans ``(start, end)`` of the top-level elements of the JSON array in ``loc``, streaming.

    Memory is bounded by the chunk size plus the longest single token. Raises PoolError when the file
    is not a JSON array.
    """
    spans: list[tuple[int, int]] = []
    depth = 0
    start = -1
    offset = 0
    carry = b""
    seen_open = False
    with loc.open_input() as f:
        while True:
            chunk = f.read(_SCAN_CHUNK)
            data = carry + chunk
            base = offset - len(carry)
            pos = 0
            for m in _JSON_TOKEN.finditer(data):
                tok = m.group()
                # A token that touches the end of the buffer may continue in the next chunk.
                if chunk and m.end() == len(data):
                    break
                pos = m.end()
                c = tok[:1]
                if not seen_open:
                    if c != b"[":
                        raise PoolError(f"{loc}: a .json pool must hold one JSON array of records")
                    seen_open = True
                    depth = 1
                    continue
                if c in (b"{", b"["):
                    if depth == 1:
                        start = base + m.start()
                    depth += 1
                elif c in (b"}", b"]"):
                    depth -= 1
                    if depth == 1:
                        spans.append((start, base + m.end()))
                    elif depth == 0:
                        return spans
                elif depth == 1:  # a scalar element of the top-level array
                    spans.append((base + m.start(), base + m.end()))
            else:
                pos = len(data)
            carry = data[pos:]
            offset += len(chunk)
            if not chunk:
                break
    if not seen_open:
        raise PoolError(f"{loc}: empty file, expected a JSON array of records")
    raise PoolError(f"{loc}: the JSON array is not closed (truncated file?)")


def scan_jsonl(loc: Location) -> list[tuple[int, int]]:
    """Byte spans of the non-empty lines of a JSONL file, streaming."""
    spans = []
    offset = 0
    line_start = 0
    with loc.open_input() as f:
        while True:
            chunk = f.read(_SCAN_CHUNK)
            if not chunk:
                break
            pos = 0
            while True:
                nl = chunk.find(b"\n", pos)
                if nl < 0:
                    break
                end = offset + nl
                if end > line_start:
                    spans.append((line_start, end))
                line_start = end + 1
                pos = nl + 1
            offset += len(chunk)
    if offset > line_start:
        spans.append((line_start, offset))
    return [s for s in spans if s[1] > s[0]]


def plan_blocks(files: list[PoolFile], records_per_block: int) -> list[BlockSpec]:
    """Split every pool file into blocks of at most ``records_per_block`` records."""
    blocks: list[BlockSpec] = []
    for pf in files:
        loc = Location.parse(pf.uri)
        if pf.format == "parquet":
            n = pq.ParquetFile(loc.open_input()).metadata.num_rows
            for first in range(0, n, records_per_block):
                cnt = min(records_per_block, n - first)
                blocks.append(BlockSpec(pf.index, pf.uri, pf.format, first, cnt, first, first + cnt))
            continue
        spans = scan_json_array(loc) if pf.format == "json" else scan_jsonl(loc)
        for first in range(0, len(spans), records_per_block):
            part = spans[first:first + records_per_block]
            blocks.append(BlockSpec(pf.index, pf.uri, pf.format, first, len(part), part[0][0], part[-1][1]))
    return blocks


def read_block(spec: BlockSpec) -> Iterator[RawRecord]:
    """Yield the records of one block in order."""
    loc = Location.parse(spec.uri)
    if spec.format == "parquet":
        yield from _read_parquet_block(loc, spec)
        return
    with loc.open_input() as f:
        f.seek(spec.start)
        data = f.read(spec.end - spec.start)
    if spec.format == "jsonl":
        texts = [t for t in data.split(b"\n") if t.strip()]
    else:
        texts = _split_array_elements(data)
    if len(texts) != spec.num_records:
        raise PoolError(f"{spec.uri}: expected {spec.num_records} records at bytes {spec.start}-{spec.end}, "
                        f"found {len(texts)} (the file changed since it was planned?)")
    for i, raw in enumerate(texts):
        text = raw.decode("utf-8", errors="replace").strip()
        try:
            yield RawRecord(spec.first_record + i, text, json.loads(text))
        except json.JSONDecodeError as err:
            yield RawRecord(spec.first_record + i, text, None, f"not valid JSON: {err.msg} at char {err.pos}")


def _split_array_elements(data: bytes) -> list[bytes]:
    """Split the bytes between the first and the last element of a JSON array into element texts."""
    out = []
    depth = 0
    start = None
    for m in _JSON_TOKEN.finditer(data):
        c = m.group()[:1]
        if c in (b"{", b"["):
            if depth == 0:
                start = m.start()
            depth += 1
        elif c in (b"}", b"]"):
            depth -= 1
            if depth == 0:
                out.append(data[start:m.end()])
        elif depth == 0:
            out.append(m.group())
    return out


def read_parquet_records(loc: Location, indices: np.ndarray) -> pa.Table:
    """Rows ``indices`` ((K,) int, any order, may repeat) of a parquet file, in that order, decoding only the
    row groups that hold them."""
    indices = np.asarray(indices, dtype=np.int64)
    with loc.open_input() as handle:
        reader = pq.ParquetFile(handle)
        sizes = [reader.metadata.row_group(g).num_rows for g in range(reader.metadata.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= starts[-1]):
            raise PoolError(f"{loc}: record indices must be in [0, {starts[-1]}), got {indices.min()}..{indices.max()}"
                            f" (the file changed since it was ingested?)")
        groups = np.unique(np.searchsorted(starts, indices, side="right") - 1)
        if len(groups) == 0:
            return reader.schema_arrow.empty_table()
        table = reader.read_row_groups(groups.tolist())
    offsets = np.concatenate([[0], np.cumsum([sizes[g] for g in groups])])
    group_of = np.searchsorted(starts, indices, side="right") - 1
    local = offsets[np.searchsorted(groups, group_of)] + (indices - starts[group_of])
    return table.take(pa.array(local))


# list columns some writers store as JSON text
_JSON_TEXT_COLUMNS = ("conversations", "messages", "conversation", "texts")


def raw_text(row: dict) -> str:
    """The JSON text of a parquet row for ``samples.raw`` / ``quarantine.raw``: embedded image bytes are written
    as ``"<N bytes>"`` (the subset of a parquet pool is copied from the pool file itself, bytes included)."""
    return json.dumps(row, ensure_ascii=False,
                      default=lambda v: f"<{len(v)} bytes>" if isinstance(v, (bytes, bytearray)) else str(v))


def _read_parquet_block(loc: Location, spec: BlockSpec) -> Iterator[RawRecord]:
    """The block's rows, reading only the row groups its row range touches (never the whole file)."""
    table = loc.read_parquet_rows(spec.start, spec.num_records)
    for i, row in enumerate(table.to_pylist()):
        for name in _JSON_TEXT_COLUMNS:
            if isinstance(row.get(name), str):
                try:
                    row[name] = json.loads(row[name])
                except json.JSONDecodeError:
                    pass  # left as a string: validation reports wrong_type for the field
        row = {k: v for k, v in row.items() if v is not None}  # a null cell is a missing field
        yield RawRecord(spec.first_record + i, raw_text(row), row)


SHAPE_PROBE_RECORDS = 16


def probe_records(blocks: list[BlockSpec], n: int = SHAPE_PROBE_RECORDS) -> list:
    """The parsed values of the first ``n`` records of the pool (its first block), for shape detection."""
    if not blocks:
        return []
    out = []
    for raw in read_block(blocks[0]):
        if raw.value is not None:
            out.append(raw.value)
        if len(out) >= n:
            break
    return out
