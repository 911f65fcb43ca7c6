"""Column names, reason codes and the feature schema version shared by every phase.

Row ids are int64: ``(file_index << 40) | record_index`` where ``file_index`` is the position of the
source file in the sorted list of pool files and ``record_index`` the position of the record in that
file. They are stable across re-ingests of the same pool and sort in pool order.
"""

from __future__ import annotations

FEATURE_SCHEMA_VERSION = 2  # 2: vectors as datasel.vector columns (io/vectors.py) instead of fixed-size lists

ROW_ID = "row_id"
TASK = "task"
N_TURNS = "n_turns"
IMAGE = "image"  # the first image's reference as written in the pool, or null for text-only samples
IMAGES = "images"  # list<struct<ref, uri, data>> in placeholder order: ref as written (path, or the struct's path),
#                  uri resolved under the image root ("" for embedded bytes), data the embedded bytes (null for a uri)
N_IMAGES = "n_images"  # int32, len(images)
TASK_FROM = "task_from"  # how the row's task was decided: one of TaskFrom.ALL
CONVERSATIONS = "conversations"  # JSON string of the validated [{"from", "value"}, ...] list
RAW = "raw"  # the original record, JSON text, exactly as read
SOURCE_FILE = "source_file"
SOURCE_INDEX = "source_index"
SAMPLE_ID = "sample_id"  # the pool's own ``id`` field (string), "" when absent
CONTENT_DIGEST = "content_digest"  # binary[16] dedup.exact.row_digest of the row (its images' bytes and normalised
#                                  turns), computed by ingest when it read every image (null otherwise)

# quarantine/
REASON = "reason"
MESSAGE = "message"
PHASE = "phase"

# features/
COINCIDE_VECTOR = "coincide_vector"  # fp16 [2 * n_layers * hidden], unit norm (0 when both halves are empty)
INFORMATIVENESS = "informativeness"  # float32, entropy of sigma / sum(sigma)
TAU = "tau"  # float32, sigma_1 / sum(sigma)
LAST_TOKEN = "last_token"  # fp16 [hidden], pre-norm output of the last decoder block at the last non-pad token
N_IMAGE_TOKENS = "n_image_tokens"
N_TEXT_TOKENS = "n_text_tokens"
N_ANSWER_TOKENS = "n_answer_tokens"
ANSWER_LOSS = "answer_loss"  # float32 mean cross-entropy over answer tokens (nan when no answer token survives)
GRAD_PROJ = "grad_proj"  # float32 [proj_dim], projected LoRA gradient
GRAD_NORM = "grad_norm"  # float32, L2 norm of the full unprojected LoRA gradient
TRUNCATED = "truncated"  # bool, sample was cut to the model context

ROW_ID_FILE_SHIFT = 40


def make_row_id(file_index: int, record_index: int) -> int:
    """Return the stable int64 row id of record ``record_index`` in pool file ``file_index``."""
    if not 0 <= record_index < (1 << ROW_ID_FILE_SHIFT):
        raise ValueError(f"record_index must be in [0, 2**40), got {record_index}")
    if not 0 <= file_index < (1 << 22):
        raise ValueError(f"file_index must be in [0, 2**22), got {file_index}")
    return (file_index << ROW_ID_FILE_SHIFT) | record_index


def record_index(row_id: int) -> int:
    """The record index within its pool file of ``row_id`` (inverse of :func:`make_row_id`'s low bits)."""
    return int(row_id) & ((1 << ROW_ID_FILE_SHIFT) - 1)


class Reason:
    """Quarantine reason codes. Every quarantined row carries exactly one of these."""

    INVALID_JSON = "invalid_json"  # the record could not be parsed as JSON
    WRONG_TYPE = "wrong_type"  # a field has the wrong type (e.g. conversations is a string)
    MISSING_FIELD = "missing_field"  # a required field (conversations) is absent
    NO_ASSISTANT_TURN = "no_assistant_turn"  # no turn from "gpt"/"assistant"
    EMPTY_TEXT = "empty_text"  # a turn whose text is empty or whitespace only
    TOO_LONG = "too_long"  # more turns or characters than the configured limits
    IMAGE_MISSING = "image_missing"  # the image file does not exist
    IMAGE_CORRUPT = "image_corrupt"  # the image file cannot be decoded
    IMAGE_PATH_ESCAPE = "image_path_escape"  # the image path resolves outside the image root
    UNKNOWN_TASK = "unknown_task"  # task could not be inferred and no default is configured
    DUPLICATE_ID = "duplicate_id"  # the record's ``id`` was already used by an earlier row of the pool
    EXTRACT_FAILED = "extract_failed"  # the model pass failed for this sample
    PLACEHOLDER_MISMATCH = "placeholder_mismatch"  # the <image> placeholders are not one per image
    IMAGE_BYTES_CORRUPT = "image_bytes_corrupt"  # an image embedded in the row (bytes) does not decode
    UNSUPPORTED_VIDEO = "unsupported_video"  # the row carries a video (not scored yet)

    ALL = (
        INVALID_JSON, WRONG_TYPE, MISSING_FIELD, NO_ASSISTANT_TURN, EMPTY_TEXT, TOO_LONG,
        IMAGE_MISSING, IMAGE_CORRUPT, IMAGE_PATH_ESCAPE, UNKNOWN_TASK, DUPLICATE_ID, EXTRACT_FAILED,
        PLACEHOLDER_MISMATCH, IMAGE_BYTES_CORRUPT, UNSUPPORTED_VIDEO,
    )


class TaskFrom:
    """How a row's task was decided (``task_from`` column; counted in the ingest result of the manifest)."""

    FIELD = "task_field"  # the record's task field (pool.task_field)
    SOURCE_LABEL = "source_label"  # the pool's own source label (pool.source_fields: data_source, source)
    MAP = "task_map"  # a user prefix rule (pool.task_map)
    INDEX_BLOCK = "index_block"  # the llava_v1_5_mix665k.json source blocks
    RULE = "rule"  # the recipe's folder / prompt rules, or the text-only task
    DEFAULT = "default"  # pool.default_task

    ALL = (FIELD, SOURCE_LABEL, MAP, INDEX_BLOCK, RULE, DEFAULT)


class RowError(Exception):
    """A failure that is the row's own fault, with its reason code (a :class:`Reason`, or the scorer's
    ``image_too_large``): the batch phases quarantine the row and go on, the scorer answers 4xx. A failure that
    is not the row's fault (storage, packages, memory) is never a RowError."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # crosses Ray process boundaries intact
        return type(self), (self.reason, str(self))


class FieldError(RowError):
    """A row refused for one of its fields: ``field`` (a path such as ``conversations[2].value`` or
    ``images[1]``), ``reason`` (a :class:`Reason` code) and ``detail`` (what is wrong, without the field).
    ``str(err)`` is ``"field: detail"``, the quarantine message; the scorer answers with the three attributes."""

    def __init__(self, field: str, reason: str, detail: str):
        super().__init__(reason, f"{field}: {detail}" if field else detail)
        self.field = field
        self.detail = detail

    def __reduce__(self):
        return type(self), (self.field, self.reason, self.detail)


def is_machine_fault(err: BaseException) -> bool:
    """True for errors that say nothing about the row being processed: out of host or device memory (torch's
    ``OutOfMemoryError``), a missing package. The model stages re-raise them instead of quarantining the row, so
    the task is retried and, failing again, stops the phase with the cause."""
    return (isinstance(err, (MemoryError, ImportError)) or type(err).__name__ == "OutOfMemoryError"
            or "out of memory" in str(err).lower())


IMAGE_PATH = "image_path"  # absolute image path/URI resolved under the image root at ingest ("" when text-only)
ERROR_REASON = "error_reason"  # set by extraction stages on a failed row ("" when fine)
ERROR_MESSAGE = "error_message"
