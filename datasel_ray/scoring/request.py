"""Request validation of the online scorer: body shape, limits, image paths under the roots, base64 images.

:class:`SampleParser` turns request JSON into :class:`ValidatedSample` objects or raises :class:`SampleError`
(field, reason code, HTTP status); record validation reuses the ingest
:class:`~datasel_ray.io.validation.RecordValidator`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from datasel_ray import schema
from datasel_ray.config import RunConfig
from datasel_ray.io.images import IMAGE_TOO_LARGE, ImageError, decode_image, read_image_bytes
from datasel_ray.io.pool import RawRecord
from datasel_ray.io.storage import StorageError
from datasel_ray.io.tasks import TaskResolver
from datasel_ray.io.validation import (
    ASSISTANT_ROLES,
    HUMAN_ROLES,
    Limits,
    RecordValidator,
    normalize_placeholders,
)
from datasel_ray.schema import Reason

__all__ = ["IMAGE_TOO_LARGE", "STORAGE_ERROR", "TOO_MANY_SAMPLES", "SampleError", "SampleParser", "ScoringLimits",
           "ValidatedSample"]

log = logging.getLogger(__name__)

TOO_MANY_SAMPLES = "too_many_samples"
STORAGE_ERROR = "storage_error"  # the image store failed (not the request's fault): 503


# ---------------------------------------------------------------------------------------------- input errors
class SampleError(ValueError):
    """A request or sample the scorer refuses. ``field`` is a dotted path such as ``samples[2].image``."""

    def __init__(self, field_name: str, reason: str, message: str, status: int = 422):
        super().__init__(f"{field_name}: {message}" if field_name else message)
        self.field = field_name
        self.reason = reason
        self.status = status

    def to_dict(self) -> dict:
        """JSON body of the error response."""
        return {"status": self.status, "field": self.field, "reason": self.reason, "message": str(self)}

    def within(self, prefix: str) -> SampleError:
        """The same error with ``prefix`` prepended to its field (``samples[3]`` + ``image``)."""
        joined = f"{prefix}.{self.field}" if prefix and self.field else (prefix or self.field)
        message = str(self).split(": ", 1)[1] if self.field else str(self)
        return SampleError(joined, self.reason, message, self.status)


@dataclass
class ScoringLimits:
    """Request limits. Images are checked in bytes (encoded) and in pixels (before decoding the raster)."""

    max_samples: int = 64
    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096


@dataclass
class ValidatedSample:
    """One accepted sample, tokenised and ready for the model pass.

    ``image_ref``: the resolved image path, ``"base64"``, or ``""`` (text-only); ``prepared``: the
    :class:`~datasel_ray.models.vlm.PreparedSample` from the model's processor.
    """

    index: int
    sample_id: str
    task: str
    task_source: str
    n_turns: int
    conversations: list[dict]
    image_ref: str
    prepared: Any = None


# ---------------------------------------------------------------------------------------------- validation
class SampleParser:
    """Turns request JSON into :class:`ValidatedSample` objects, or raises :class:`SampleError`.

    Image paths are accepted only under ``image_roots`` (each root gets an ingest
    :class:`~datasel_ray.io.validation.RecordValidator`; a relative path resolves under the first root that
    holds the file). ``image_base64`` images are decoded in memory and need an explicit ``task`` (they carry
    no path for the task rules).
    """

    def __init__(self, cfg: RunConfig, tasks: list[str], image_roots: list[str], limits: ScoringLimits):
        pool = cfg.pool
        self.resolver = TaskResolver.for_pool(pool)
        record_limits = Limits(pool.max_turns, pool.max_chars, check_images=False)
        self.validators = [RecordValidator(root, self.resolver, record_limits) for root in image_roots]
        self.text_validator = RecordValidator(image_roots[0] if image_roots else "/", self.resolver, record_limits)
        self.image_roots = image_roots
        self.tasks = tasks
        self.limits = limits
        self.image_size = cfg.model.image_size

    def parse_payload(self, payload: Any) -> tuple[list[tuple[dict, str]], bool]:
        """Split a request body into ``[(sample_dict, field_prefix)]``; the flag is True for a ``samples`` list."""
        if not isinstance(payload, dict):
            raise SampleError("body", Reason.WRONG_TYPE,
                              f"expected a JSON object (one sample, or {{\"samples\": [...]}}), got "
                              f"{type(payload).__name__}")
        if "samples" not in payload:
            return [(payload, "")], False
        samples = payload["samples"]
        if not isinstance(samples, list):
            raise SampleError("samples", Reason.WRONG_TYPE, f"expected a list of samples, got {type(samples).__name__}")
        if not samples:
            raise SampleError("samples", Reason.MISSING_FIELD, "empty list: send at least one sample")
        if len(samples) > self.limits.max_samples:
            raise SampleError("samples", TOO_MANY_SAMPLES, f"{len(samples)} samples in one request, more than "
                              f"the limit of {self.limits.max_samples}", status=413)
        return [(s, f"samples[{i}]") for i, s in enumerate(samples)], True

    def validate(self, value: Any, index: int) -> tuple[ValidatedSample, Any]:
        """Validate one sample object; returns it with its decoded image (PIL, or None when text-only).

        Fields in errors are relative to the sample; the caller adds the ``samples[i]`` prefix. An image store
        that fails for a cause other than a missing file (a StorageError: endpoint, credentials, permissions) is
        the server's problem, not the request's: SampleError with status 503 and reason ``storage_error``."""
        try:
            return self._validate(value, index)
        except StorageError as err:
            log.warning("image store error while validating a request: %s", err)
            raise SampleError("image", STORAGE_ERROR, str(err), status=503) from None

    def _validate(self, value: Any, index: int) -> tuple[ValidatedSample, Any]:
        if not isinstance(value, dict):
            raise SampleError("", Reason.WRONG_TYPE, f"expected a sample object, got {type(value).__name__}")
        self._check_optional_types(value)
        b64 = value.get("image_base64")
        if b64 is not None and value.get("image") is not None:
            raise SampleError("image_base64", Reason.WRONG_TYPE, "give either 'image' (a path) or 'image_base64', not both")
        if b64 is not None:
            return self._validate_base64(value, index, b64)
        row = self._validate_record(value, index)
        image_ref = row[schema.IMAGE_PATH]
        image = self._read_path_image(image_ref) if image_ref else None
        return self._accepted(value, index, row, image_ref, image)

    def _check_optional_types(self, value: dict) -> None:
        for name in ("task", "image", "image_base64"):
            if value.get(name) is not None and not isinstance(value[name], str):
                raise SampleError(name, Reason.WRONG_TYPE, f"expected a string, got {type(value[name]).__name__}")

    def _validate_record(self, value: dict, index: int, validators=None) -> dict:
        raw = RawRecord(record_index=index, text=json.dumps(value, default=str)[:2000], value=value)
        rejections = []
        for validator in validators or (self.validators if value.get("image") else [self.text_validator]):
            row, bad = validator.validate(raw, index, "request")
            if row is not None:
                return row
            rejections.append(bad)
        # a path outside every root is an escape only when no root accepted it; else report the nearer problem
        bad = next((r for r in rejections if r[schema.REASON] != Reason.IMAGE_PATH_ESCAPE), rejections[0])
        field_name, _, message = bad[schema.MESSAGE].partition(": ")  # ingest messages are "field: text"
        field_name = re.sub(r"\.(\d+)", r"[\1]", field_name)  # pydantic paths: conversations.0.value
        if field_name == "image" and bad[schema.REASON] == Reason.IMAGE_PATH_ESCAPE:
            message = f"path '{value.get('image')}' is outside the configured image roots"
        return self._raise(field_name, bad[schema.REASON], message)

    @staticmethod
    def _raise(field_name: str, reason: str, message: str):
        """A path outside the image roots is refused (403); every other record problem is unprocessable (422)."""
        raise SampleError(field_name, reason, message, status=403 if reason == Reason.IMAGE_PATH_ESCAPE else 422)

    def _validate_base64(self, value: dict, index: int, b64: str) -> tuple[ValidatedSample, Any]:
        if not (isinstance(value.get("task"), str) and value["task"].strip()):
            raise SampleError("task", Reason.MISSING_FIELD, "required with image_base64 (a base64 image has no "
                              "path for the task rules)")
        text_only = {k: v for k, v in value.items() if k not in ("image", "image_base64")}
        row = self._validate_record(text_only, index, [self.text_validator])
        max_chars = 4 * (self.limits.max_image_bytes // 3 + 1)
        if len(b64) > max_chars:
            raise SampleError("image_base64", IMAGE_TOO_LARGE, f"{len(b64)} base64 characters, more than the limit "
                              f"of {self.limits.max_image_bytes} bytes", status=413)
        try:
            data = base64.b64decode(b64.split(",", 1)[1] if b64.startswith("data:") else b64, validate=True)
        except (binascii.Error, ValueError) as err:
            raise SampleError("image_base64", Reason.IMAGE_CORRUPT, f"not valid base64: {err}") from None
        image = self._decode_image(data, "image_base64")
        return self._accepted(value, index, row, "base64", image)

    def _read_path_image(self, path: str):
        """Read (byte limit checked before reading) and decode the image at a resolved path."""
        try:
            data = read_image_bytes(path, max_bytes=self.limits.max_image_bytes)
        except ImageError as err:
            raise _image_error("image", err) from None
        return self._decode_image(data, "image")

    def _decode_image(self, data: bytes, field_name: str):
        """Decode to RGB, resized as the batch path does (:func:`datasel_ray.io.images.decode_image`); bytes and
        pixels (from the header) checked before the raster is decoded."""
        if len(data) > self.limits.max_image_bytes:
            raise SampleError(field_name, IMAGE_TOO_LARGE, f"{len(data)} bytes, more than the limit of "
                              f"{self.limits.max_image_bytes}", status=413)
        try:
            return decode_image(data, field_name, self.image_size, self.limits.max_image_pixels)
        except ImageError as err:
            raise _image_error(field_name, err) from None

    def _accepted(self, value: dict, index: int, row: dict, image_ref: str, image) -> tuple[ValidatedSample, Any]:
        task = row[schema.TASK]
        explicit = value.get(self.resolver.task_field)
        given = isinstance(explicit, str) and bool(explicit.strip())
        if task not in self.tasks:
            how = "is" if given else f"was inferred from image '{value.get('image') or ''}' as"
            raise SampleError(self.resolver.task_field, Reason.UNKNOWN_TASK,
                              f"the task {how} '{task}', which is not a task of this run; known tasks: "
                              f"{', '.join(self.tasks)}")
        conversations = json.loads(row[schema.CONVERSATIONS])
        if image_ref == "base64":  # validated as text-only above; the image placeholder goes back in
            conversations = normalize_placeholders(
                [{"from": _canonical(t["from"].lower()), "value": t["value"]} for t in value["conversations"]],
                has_image=True)
        sample = ValidatedSample(index=index, sample_id="" if value.get("id") is None else str(value["id"]),
                                 task=task, task_source="given" if given else "inferred",
                                 n_turns=int(row[schema.N_TURNS]), conversations=conversations, image_ref=image_ref)
        return sample, image


def _image_error(field_name: str, err: ImageError) -> SampleError:
    """The request error of an image that is the sample's fault: 413 over a limit, else 422."""
    if err.reason == IMAGE_TOO_LARGE:
        return SampleError(field_name, IMAGE_TOO_LARGE, err.detail, status=413)
    if err.reason == Reason.IMAGE_MISSING:
        return SampleError(field_name, Reason.IMAGE_MISSING, f"file not found: {err.uri}")
    return SampleError(field_name, Reason.IMAGE_CORRUPT, f"cannot decode image: {err.detail}")


def _canonical(role: str) -> str:
    return "gpt" if role in ASSISTANT_ROLES else "human" if role in HUMAN_ROLES else "system"
