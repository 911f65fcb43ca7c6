"""Validation of pool records: a good record becomes a samples/ row, a bad one a quarantine/ row.

Every rejected record carries one reason code from :class:`datasel_ray.schema.Reason` and a message that
names the field and what was expected. Nothing is dropped silently.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

import numpy as np

from datasel_ray import schema
from datasel_ray.dedup.exact import normalise_text, row_digest
from datasel_ray.io.images import ImageError, decode_image, image_exists, read_image_bytes
from datasel_ray.io.pool import RawRecord
from datasel_ray.io.shapes import DEFAULT_SOURCE_FIELDS, ImageItem, NormalizedRecord, detect_shape, normalize_record
from datasel_ray.io.storage import Location
from datasel_ray.io.tasks import TaskResolver
from datasel_ray.roles import (
    ASSISTANT,
    IMAGE_PLACEHOLDER,
    KNOWN_ROLES,
    SYSTEM,
    canonical_role,
    normalize_placeholders,
)
from datasel_ray.schema import FieldError, Reason


@dataclass
class Limits:
    max_turns: int = 64
    max_chars: int = 32768
    check_images: bool = True


@dataclass
class ValidRecord:
    """A record that passed validation: its normalised form, canonical turns with one placeholder per image
    (``[{"from", "value"}]``), the number of assistant turns, its task and how the task was decided
    (:class:`~datasel_ray.schema.TaskFrom`), per image the resolved location ("" for embedded bytes, or
    when images were not resolved), and the row's exact-duplicate digest when its images' bytes were all read
    (embedded, or checked by decoding: the dedup phase then reads no image again)."""

    record: NormalizedRecord
    conversations: list[dict]
    n_turns: int
    task: str
    task_from: str
    uris: list[str]
    digest: bytes | None = None  # dedup.exact.row_digest when every image's bytes were read, else None

    @property
    def images(self) -> list[ImageItem]:
        return self.record.images


def resolve_image_path(root: Location, ref: str, where: str = "image") -> Location:
    """``ref`` (relative to ``root``, or absolute) as a Location under ``root``; FieldError(image_path_escape)
    when it resolves outside it."""
    base = root.path.rstrip("/") or "/"
    joined = ref if posixpath.isabs(ref) else posixpath.join(base, ref)
    resolved = posixpath.normpath(joined)
    if not (resolved == base or resolved.startswith(base.rstrip("/") + "/")):
        raise FieldError(where, Reason.IMAGE_PATH_ESCAPE, f"path '{ref}' resolves outside the image root '{root}'")
    return type(root)(root.fs, resolved, root.uri_prefix)


class RecordValidator:
    """Validates raw records of one pool against ``image_root`` and the limits.

    ``shape``: one of :data:`~datasel_ray.io.shapes.SHAPES`, or ``auto`` to detect it per record (the scorer;
    ingest detects it once per pool). ``source_fields``: where the pool's source label is read.
    """

    def __init__(self, image_root: str, resolver: TaskResolver, limits: Limits, shape: str = "auto",
                 source_fields=DEFAULT_SOURCE_FIELDS):
        self.image_root = Location.parse(image_root)
        self.resolver = resolver
        self.limits = limits
        self.shape = shape
        self.source_fields = tuple(source_fields)

    def validate(self, raw: RawRecord, row_id: int, source_file: str) -> tuple[dict | None, dict | None]:
        """Return ``(sample_row, None)`` for a good record or ``(None, quarantine_row)`` for a bad one."""
        try:
            sample = self._sample_row(raw, row_id, source_file)
            return sample, None
        except FieldError as err:
            return None, quarantine_row(row_id, source_file, raw.record_index, "ingest", err.reason, str(err),
                                        raw.text)

    def _sample_row(self, raw: RawRecord, row_id: int, source_file: str) -> dict:
        if raw.error:
            raise FieldError("record", Reason.INVALID_JSON, raw.error)
        valid = self.accept(raw.value, raw.record_index)
        images = valid.images
        return {
            schema.ROW_ID: row_id,
            schema.SAMPLE_ID: valid.record.sample_id,
            schema.TASK: valid.task,
            schema.TASK_FROM: valid.task_from,
            schema.N_TURNS: valid.n_turns,
            schema.IMAGE: images[0].ref if images else None,
            schema.IMAGES: [{"ref": im.ref, "uri": uri, "data": im.data} for im, uri in zip(images, valid.uris)],
            schema.N_IMAGES: len(images),
            schema.IMAGE_PATH: valid.uris[0] if images else "",
            schema.CONVERSATIONS: json.dumps(valid.conversations, ensure_ascii=False),
            schema.RAW: raw.text,
            schema.SOURCE_FILE: source_file,
            schema.SOURCE_INDEX: raw.record_index,
            schema.CONTENT_DIGEST: valid.digest,
        }

    def accept(self, value, record_index: int | None = None, check_images: bool | None = None,
               resolve_images: bool = True) -> ValidRecord:
        """Validate one parsed record; raises :class:`~datasel_ray.schema.FieldError` naming the field.

        ``resolve_images=False`` leaves the images unresolved and unread (the scorer reads them itself, under its
        own roots and limits); ``check_images`` defaults to ``limits.check_images`` (decode every image, else
        only check that path images exist)."""
        if not isinstance(value, dict):
            raise FieldError("record", Reason.WRONG_TYPE, f"expected a JSON object, got {type(value).__name__}")
        shape = detect_shape([value]) if self.shape == "auto" else self.shape
        record = normalize_record(value, shape, self.source_fields)
        self._check_turns(record)
        n_images = len(record.images)
        written = sum(t.value.count(IMAGE_PLACEHOLDER) for t in record.turns)
        if n_images and written and written != n_images:
            raise FieldError(record.turns_field, Reason.PLACEHOLDER_MISMATCH,
                             f"{written} '{IMAGE_PLACEHOLDER}' placeholder(s) for {n_images} image(s) in "
                             f"'{record.images_field}'; write one placeholder per image, or none")
        check = self.limits.check_images if check_images is None else check_images
        checked = [self._check_image(im, im.where, check) if resolve_images else ("", None) for im in record.images]
        uris = [uri for uri, _ in checked]
        first_ref = record.images[0].ref if record.images else None
        task, task_from = self.resolver.resolve_how(value, first_ref, record_index, has_image=bool(n_images),
                                                    source_label=record.source_label)
        if task is None:
            raise FieldError("task", Reason.UNKNOWN_TASK,
                             f"no '{self.resolver.task_field}' field, no source label "
                             f"({', '.join(self.source_fields) or 'pool.source_fields is empty'}) and no prefix rule "
                             f"matches image '{first_ref}' (set pool.default_task or pool.task_map)")
        turns = [{"from": canonical_role(t.role), "value": t.value} for t in record.turns]
        conversations = normalize_placeholders(turns, n_images)  # one placeholder per image, in image order
        images = [data for _, data in checked]
        digest = (row_digest(images, normalise_text(conversations))
                  if resolve_images and all(data is not None for data in images) else None)
        return ValidRecord(record, conversations, sum(1 for t in turns if t["from"] == ASSISTANT), task, task_from,
                           uris, digest)

    def _check_turns(self, record: NormalizedRecord) -> None:
        turns = record.turns
        if not turns:
            raise FieldError(record.turns_field, Reason.NO_ASSISTANT_TURN, "empty list, expected human/gpt turns")
        for t in turns:
            if t.role not in KNOWN_ROLES:
                raise FieldError(t.role_field, Reason.WRONG_TYPE, f"expected human, gpt or system, got {t.role!r}")
            if not t.value.replace(IMAGE_PLACEHOLDER, "").strip():
                raise FieldError(t.value_field, Reason.EMPTY_TEXT, "empty text")
        roles = [canonical_role(t.role) for t in turns]
        if ASSISTANT not in roles:
            raise FieldError(record.turns_field, Reason.NO_ASSISTANT_TURN, "no turn from 'gpt' (the assistant)")
        n_turns = sum(1 for r in roles if r != SYSTEM)
        if n_turns > self.limits.max_turns:
            raise FieldError(record.turns_field, Reason.TOO_LONG,
                             f"{n_turns} turns, more than pool.max_turns={self.limits.max_turns}")
        n_chars = sum(len(t.value) for t in turns)
        if n_chars > self.limits.max_chars:
            raise FieldError(record.turns_field, Reason.TOO_LONG,
                             f"{n_chars} characters, more than pool.max_chars={self.limits.max_chars}")

    def _check_image(self, image: ImageItem, where: str, check: bool) -> tuple[str, bytes | None]:
        """The resolved location of a path image ("" for embedded bytes) after the checks ``check`` asks for,
        and the image's bytes when they were read (embedded, or decoded by the check; else None)."""
        if image.data is not None:
            if check:
                try:
                    decode_image(image.data, where)
                except ImageError as err:
                    raise FieldError(f"{where}.bytes", Reason.IMAGE_BYTES_CORRUPT,
                                     f"the embedded image does not decode: {err.detail}") from None
            return "", image.data
        loc = resolve_image_path(self.image_root, image.ref, where)
        # a StorageError (not the row's fault) propagates: it stops the phase instead of quarantining the row
        if not check:
            if not image_exists(loc):
                raise FieldError(where, Reason.IMAGE_MISSING, f"file not found: {loc}")
            return str(loc), None
        try:
            data = read_image_bytes(loc)
            decode_image(data, str(loc))
        except ImageError as err:
            if err.reason == Reason.IMAGE_MISSING:
                raise FieldError(where, Reason.IMAGE_MISSING, f"file not found: {loc}") from None
            raise FieldError(where, Reason.IMAGE_CORRUPT, f"cannot decode '{image.ref}': {err.detail}") from None
        return str(loc), data


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
