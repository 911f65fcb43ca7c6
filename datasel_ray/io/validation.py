"""Validation of pool records: a good record becomes a samples/ row, a bad one a quarantine/ row.

Every rejected record carries one reason code from :class:`datasel_ray.schema.Reason` and a message that
names the field and what was expected. Nothing is dropped silently.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from datasel_ray import schema
from datasel_ray.io.images import ImageError, image_exists, load_image
from datasel_ray.io.pool import RawRecord
from datasel_ray.io.storage import Location
from datasel_ray.io.tasks import TaskResolver
from datasel_ray.schema import Reason

HUMAN_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant"}
SYSTEM_ROLES = {"system"}
IMAGE_PLACEHOLDER = "<image>"


class Turn(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    role: StrictStr = Field(alias="from")
    value: StrictStr


class Record(BaseModel):
    """One LLaVA-format record. Extra fields are kept in the raw text and ignored here."""

    model_config = ConfigDict(extra="allow")
    id: StrictStr | int | None = None
    image: StrictStr | None = None
    conversations: list[Turn]


@dataclass
class Rejection:
    reason: str
    message: str


@dataclass
class Limits:
    max_turns: int = 64
    max_chars: int = 32768
    check_images: bool = True


class RecordValidator:
    """Validates raw records of one pool file against ``image_root`` and the limits."""

    def __init__(self, image_root: str, resolver: TaskResolver, limits: Limits):
        self.image_root = Location.parse(image_root)
        self.resolver = resolver
        self.limits = limits

    def validate(self, raw: RawRecord, row_id: int, source_file: str) -> tuple[dict | None, dict | None]:
        """Return ``(sample_row, None)`` for a good record or ``(None, quarantine_row)`` for a bad one."""
        try:
            sample = self._validate(raw, row_id, source_file)
            return sample, None
        except _Reject as rej:
            return None, quarantine_row(row_id, source_file, raw.record_index, "ingest", rej.reason, rej.message,
                                        raw.text)

    def _validate(self, raw: RawRecord, row_id: int, source_file: str) -> dict:
        if raw.error:
            raise _Reject(Reason.INVALID_JSON, f"record: {raw.error}")
        if not isinstance(raw.value, dict):
            raise _Reject(Reason.WRONG_TYPE, f"record: expected a JSON object, got {type(raw.value).__name__}")
        record = _parse_record(raw.value)
        turns = [(t.role.lower(), t.value) for t in record.conversations]
        self._check_turns(turns)
        image_path = self._check_image(record.image) if record.image else ""
        task = self.resolver.resolve(raw.value, record.image, raw.record_index)
        if task is None:
            raise _Reject(Reason.UNKNOWN_TASK, f"task: no '{self.resolver.task_field}' field and no prefix rule "
                                               f"matches image '{record.image}' (set pool.default_task or pool.task_map)")
        conversations = normalize_placeholders([{"from": _canonical_role(r), "value": v} for r, v in turns],
                                               has_image=bool(record.image))
        return {
            schema.ROW_ID: row_id,
            schema.SAMPLE_ID: "" if record.id is None else str(record.id),
            schema.TASK: task,
            schema.N_TURNS: sum(1 for r, _ in turns if r in ASSISTANT_ROLES),
            schema.IMAGE: record.image,
            schema.IMAGE_PATH: image_path,
            schema.CONVERSATIONS: json.dumps(conversations, ensure_ascii=False),
            schema.RAW: raw.text,
            schema.SOURCE_FILE: source_file,
            schema.SOURCE_INDEX: raw.record_index,
        }

    def _check_turns(self, turns: list[tuple[str, str]]) -> None:
        if not turns:
            raise _Reject(Reason.NO_ASSISTANT_TURN, "conversations: empty list, expected human/gpt turns")
        for i, (role, value) in enumerate(turns):
            if role not in HUMAN_ROLES | ASSISTANT_ROLES | SYSTEM_ROLES:
                raise _Reject(Reason.WRONG_TYPE, f"conversations[{i}].from: expected human, gpt or system, got {role!r}")
            if not value.replace(IMAGE_PLACEHOLDER, "").strip():
                raise _Reject(Reason.EMPTY_TEXT, f"conversations[{i}].value: empty text")
        if not any(r in ASSISTANT_ROLES for r, _ in turns):
            raise _Reject(Reason.NO_ASSISTANT_TURN, "conversations: no turn from 'gpt' (the assistant)")
        n_turns = sum(1 for r, _ in turns if r not in SYSTEM_ROLES)
        if n_turns > self.limits.max_turns:
            raise _Reject(Reason.TOO_LONG, f"conversations: {n_turns} turns, more than pool.max_turns={self.limits.max_turns}")
        n_chars = sum(len(v) for _, v in turns)
        if n_chars > self.limits.max_chars:
            raise _Reject(Reason.TOO_LONG, f"conversations: {n_chars} characters, more than pool.max_chars={self.limits.max_chars}")

    def _check_image(self, image: str) -> str:
        root = self.image_root.path.rstrip("/") or "/"
        joined = image if posixpath.isabs(image) else posixpath.join(root, image)
        resolved = posixpath.normpath(joined)
        if not (resolved == root or resolved.startswith(root.rstrip("/") + "/")):
            raise _Reject(Reason.IMAGE_PATH_ESCAPE, f"image: path '{image}' resolves outside the image root '{self.image_root}'")
        loc = type(self.image_root)(self.image_root.fs, resolved, self.image_root.uri_prefix)
        # a StorageError (not the row's fault) propagates: it stops the phase instead of quarantining the row
        if not self.limits.check_images:
            if not image_exists(loc):
                raise _Reject(Reason.IMAGE_MISSING, f"image: file not found: {loc}")
            return str(loc)
        try:
            load_image(loc)
        except ImageError as err:
            if err.reason == Reason.IMAGE_MISSING:
                raise _Reject(Reason.IMAGE_MISSING, f"image: file not found: {loc}") from None
            raise _Reject(Reason.IMAGE_CORRUPT, f"image: cannot decode '{image}': {err.detail}") from None
        return str(loc)


class _Reject(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def _parse_record(value: dict) -> Record:
    try:
        return Record.model_validate(value)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        if first["type"] == "missing":
            raise _Reject(Reason.MISSING_FIELD, f"{field}: required field is missing") from None
        got = first.get("input")
        raise _Reject(Reason.WRONG_TYPE, f"{field}: {first['msg']} (got {type(got).__name__} {_short(got)})") from None


def normalize_placeholders(conversations: list[dict], has_image: bool) -> list[dict]:
    """Exactly one ``<image>`` (in the first human turn) when there is an image, none otherwise (LLaVA convention)."""
    out = [{**t, "value": t["value"].replace(IMAGE_PLACEHOLDER, "").strip() if IMAGE_PLACEHOLDER in t["value"]
            else t["value"]} for t in conversations]
    if has_image:
        first_human = next((i for i, t in enumerate(out) if t["from"] == "human"), 0)
        original = conversations[first_human]["value"]
        if original.count(IMAGE_PLACEHOLDER) == 1 and all(
                IMAGE_PLACEHOLDER not in t["value"] for j, t in enumerate(conversations) if j != first_human):
            out[first_human] = dict(conversations[first_human])
        else:
            out[first_human]["value"] = f"{IMAGE_PLACEHOLDER}\n{out[first_human]['value']}"
    return out


def _canonical_role(role: str) -> str:
    if role in ASSISTANT_ROLES:
        return "gpt"
    if role in HUMAN_ROLES:
        return "human"
    return "system"


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def first_seen_duplicates(row_ids: np.ndarray, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose pool ``id`` an earlier row already used, with that first row.

    ``row_ids``: (N,) int64, the stable row ids (pool order: file, then record index); ``sample_ids``: (N,) str,
    the pool's ``id`` as a string, ``""`` for a row without one (never a duplicate). Returns ``(dup, first)``,
    two (D,) int64 arrays of positions into the inputs: ``dup[k]`` is a row whose id the row at ``first[k]`` (the
    smallest row id carrying it) already used, ascending by the row id of ``dup``. The answer depends only on the
    row ids, not on the order of the inputs, so it is the same however the ingest tasks were scheduled.
    """
    row_ids = np.asarray(row_ids)
    sample_ids = np.asarray(sample_ids, dtype=object)
    if row_ids.ndim != 1 or row_ids.shape != sample_ids.shape:
        raise ValueError(f"row_ids and sample_ids must be 1-D arrays of the same length, got shapes "
                         f"{row_ids.shape} and {sample_ids.shape}")
    order = np.argsort(row_ids, kind="stable")
    ids = sample_ids[order]
    with_id = order[ids != ""]
    if len(with_id) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    _, first_index, inverse = np.unique(sample_ids[with_id].astype(str), return_index=True, return_inverse=True)
    first = with_id[first_index][inverse.reshape(-1)]
    is_dup = first != with_id
    return with_id[is_dup].astype(np.int64), first[is_dup].astype(np.int64)


def duplicate_id_message(sample_id: str, first_source: str, first_index: int) -> str:
    """The quarantine message of a row whose ``id`` was first used by record ``first_index`` of ``first_source``."""
    return (f"id: {sample_id!r} was already used by record {first_index} of {first_source}; ids must be unique "
            f"in the pool, only the first valid row with an id is kept")


def quarantine_row(row_id: int, source_file: str, source_index: int, phase: str, reason: str, message: str,
                   raw: str) -> dict:
    """One quarantine/ row: the original record text plus where it came from and why it was rejected."""
    if reason not in Reason.ALL:
        raise ValueError(f"unknown quarantine reason {reason!r}")
    return {
        schema.ROW_ID: row_id,
        schema.SOURCE_FILE: source_file,
        schema.SOURCE_INDEX: source_index,
        schema.PHASE: phase,
        schema.REASON: reason,
        schema.MESSAGE: message,
        schema.RAW: raw,
    }
