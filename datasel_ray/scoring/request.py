"""Request validation of the online scorer: body shape, limits, image paths under the roots, base64 images.

:class:`SampleParser` turns request JSON into :class:`ValidatedSample` objects or raises :class:`SampleError`
(field, reason code, HTTP status); record validation is the ingest
:class:`~datasel_ray.io.validation.RecordValidator`, whose :class:`~datasel_ray.schema.FieldError` carries the
field, reason and detail to the response (nothing is parsed back out of message text).
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass, field
from typing import Any

from datasel_ray.config import RunConfig
from datasel_ray.io.images import IMAGE_TOO_LARGE, ImageError, decode_image, image_exists, read_image_bytes
from datasel_ray.io.shapes import ImageItem
from datasel_ray.io.storage import Location, StorageError
from datasel_ray.io.tasks import TaskResolver
from datasel_ray.io.validation import Limits, RecordValidator, ValidRecord, resolve_image_path
from datasel_ray.schema import FieldError, Reason, TaskFrom

__all__ = ["IMAGE_TOO_LARGE", "STORAGE_ERROR", "TOO_MANY_SAMPLES", "SampleError", "SampleParser", "ScoringLimits",
           "ValidatedSample"]

log = logging.getLogger(__name__)

TOO_MANY_SAMPLES = "too_many_samples"
STORAGE_ERROR = "storage_error"  # the image store failed (not the request's fault): 503
BASE64 = "base64"  # ValidatedSample.image_refs entry of an image sent as bytes


# ---------------------------------------------------------------------------------------------- input errors
class SampleError(ValueError):
    """A request or sample the scorer refuses. ``field`` is a dotted path such as ``samples[2].image``;
    ``detail`` what is wrong (without the field); ``str(err)`` is ``"field: detail"``."""

    def __init__(self, field_name: str, reason: str, message: str, status: int = 422):
        super().__init__(f"{field_name}: {message}" if field_name else message)
        self.field = field_name
        self.reason = reason
        self.detail = message
        self.status = status

    @classmethod
    def of(cls, err: FieldError) -> SampleError:
        """The request error of a record refused by the ingest validator, from its attributes: a path outside
        the image roots is refused (403), every other record problem is unprocessable (422)."""
        return cls(err.field, err.reason, err.detail, status=403 if err.reason == Reason.IMAGE_PATH_ESCAPE else 422)

    def to_dict(self) -> dict:
        """JSON body of the error response."""
        return {"status": self.status, "field": self.field, "reason": self.reason, "message": str(self)}

    def within(self, prefix: str) -> SampleError:
        """The same error with ``prefix`` prepended to its field (``samples[3]`` + ``image``)."""
        joined = f"{prefix}.{self.field}" if prefix and self.field else (prefix or self.field)
        return SampleError(joined, self.reason, self.detail, self.status)


@dataclass
class ScoringLimits:
    """Request limits. Images are checked in bytes (encoded) and in pixels (before decoding the raster)."""

    max_samples: int = 64
    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096


@dataclass
class ValidatedSample:
    """One accepted sample, tokenised and ready for the model pass.

    ``image_refs``: per image (placeholder order) its resolved path, or ``"base64"`` for bytes sent in the
    request; ``image_bytes``: per image its encoded bytes (read from the path, or as sent); ``prepared``: the :class:`~datasel_ray.models.vlm.PreparedSample` from the model's processor.
    """

    index: int
    sample_id: str
    task: str
    task_source: str
    n_turns: int
    conversations: list[dict]
    image_refs: list[str] = field(default_factory=list)
    image_bytes: list[bytes] = field(default_factory=list)
    prepared: Any = None

    @property
    def image_ref(self) -> str:
        """The first image's reference, ``""`` for a text-only sample."""
        return self.image_refs[0] if self.image_refs else ""


# ---------------------------------------------------------------------------------------------- validation
class SampleParser:
    """Turns request JSON into :class:`ValidatedSample` objects, or raises :class:`SampleError`. Needs no model.

    A sample is a pool record in any shape ingest reads (:mod:`datasel_ray.io.shapes`: LLaVA ``conversations``,
    ``texts``, chat ``messages``), validated by the ingest :class:`~datasel_ray.io.validation.RecordValidator`;
    its errors reach the response through their ``field`` / ``reason`` / ``detail`` attributes. Images, one or
    several per sample: paths (``image``: a string or a list; ``images``: a list; typed ``{type: image, image}``
    parts), accepted only under ``image_roots`` (a relative path resolves under the first root that holds the
    file), or bytes sent as base64 (``image_base64``: a string or a list; ``{"bytes": <base64>, "path"?}`` in
    place of a path). Bytes without a path need a ``task`` or a source label (there is no path for the task
    rules).
    """

    def __init__(self, cfg: RunConfig, tasks: list[str], image_roots: list[str], limits: ScoringLimits):
        pool = cfg.pool
        self.resolver = TaskResolver.for_pool(pool)
        record_limits = Limits(pool.max_turns, pool.max_chars, check_images=False)
        self.validator = RecordValidator(image_roots[0] if image_roots else "/", self.resolver, record_limits,
                                         shape="auto", source_fields=pool.source_fields)
        self.image_roots = image_roots
        self.roots = [Location.parse(r) for r in image_roots]
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

    def validate(self, value: Any, index: int) -> tuple[ValidatedSample, list]:
        """Validate one sample object; returns it with its decoded images (PIL, placeholder order; [] when
        text-only).

        Fields in errors are relative to the sample; the caller adds the ``samples[i]`` prefix. An image store
        that fails for a cause other than a missing file (a StorageError: endpoint, credentials, permissions) is
        the server's problem, not the request's: SampleError with status 503 and reason ``storage_error``."""
        try:
            return self._validate(value, index)
        except StorageError as err:
            log.warning("image store error while validating a request: %s", err)
            raise SampleError("image", STORAGE_ERROR, str(err), status=503) from None
        except FieldError as err:
            raise SampleError.of(err) from None

    def _validate(self, value: Any, index: int) -> tuple[ValidatedSample, list]:
        if not isinstance(value, dict):
            raise SampleError("", Reason.WRONG_TYPE, f"expected a sample object, got {type(value).__name__}")
        task_value = value.get(self.resolver.task_field)
        if task_value is not None and not isinstance(task_value, str):
            raise SampleError(self.resolver.task_field, Reason.WRONG_TYPE,
                              f"expected a string, got {type(task_value).__name__}")
        record, renamed = self._with_bytes(value)
        valid = self.validator.accept(record, index, resolve_images=False)
        images = valid.images
        wheres = [renamed.get(image.where, image.where) for image in images]
        refs = [BASE64 if image.data is not None else self._resolve_path(image, where)
                for image, where in zip(images, wheres)]
        if valid.task_from == TaskFrom.DEFAULT and any(im.data is not None and not im.ref for im in images):
            raise SampleError(self.resolver.task_field, Reason.MISSING_FIELD,
                              "required with an image sent as bytes without a path (it has no path for the task "
                              "rules) unless the sample carries a source label")
        self._check_task(valid)
        encoded = [image.data if image.data is not None else self._read_path_bytes(ref, where)
                   for image, ref, where in zip(images, refs, wheres)]
        decoded = [self._decode_image(data, where) for data, where in zip(encoded, wheres)]
        given = valid.task_from == TaskFrom.FIELD
        sample = ValidatedSample(index=index, sample_id=valid.record.sample_id, task=valid.task,
                                 task_source="given" if given else "inferred", n_turns=valid.n_turns,
                                 conversations=valid.conversations, image_refs=refs, image_bytes=encoded)
        return sample, decoded

    def _check_task(self, valid: ValidRecord) -> None:
        if valid.task in self.tasks:
            return
        if valid.task_from == TaskFrom.FIELD:
            how = "is"
        elif valid.task_from == TaskFrom.SOURCE_LABEL:
            how = "is the sample's source label"
        else:
            ref = valid.images[0].ref if valid.images else ""
            how = f"was inferred from image '{ref}' as"
        raise SampleError(self.resolver.task_field, Reason.UNKNOWN_TASK,
                          f"the task {how} '{valid.task}', which is not a task of this run; known tasks: "
                          f"{', '.join(self.tasks)}")

    # ---- images
    def _with_bytes(self, value: dict) -> tuple[dict, dict[str, str]]:
        """The sample with every base64 image decoded to bytes (``{"bytes": b, "path": p}``), as a pool row holds
        embedded images, and the field renames for messages (``image_base64`` is validated as ``image``)."""
        record = dict(value)
        renamed: dict[str, str] = {}
        b64 = record.pop("image_base64", None)
        if b64 is not None:
            if record.get("image") is not None or record.get("images") is not None:
                raise SampleError("image_base64", Reason.WRONG_TYPE,
                                  "give either 'image' / 'images' (paths) or 'image_base64', not both")
            if isinstance(b64, str):
                record["image"] = {"bytes": self._b64decode(b64, "image_base64"), "path": None}
                renamed.update({"image": "image_base64", "image.bytes": "image_base64"})
            elif isinstance(b64, list):
                record["image"] = [{"bytes": self._b64decode(item, f"image_base64[{i}]"), "path": None}
                                   for i, item in enumerate(b64)]
                renamed.update({f"image[{i}]": f"image_base64[{i}]" for i in range(len(b64))})
            else:
                raise SampleError("image_base64", Reason.WRONG_TYPE,
                                  f"expected a base64 string or a list of them, got {type(b64).__name__}")
        for name in ("image", "images"):
            given = record.get(name)
            if isinstance(given, dict):
                record[name] = self._struct_bytes(given, name)
            elif isinstance(given, list):
                record[name] = [self._struct_bytes(item, f"{name}[{i}]") if isinstance(item, dict) else item
                                for i, item in enumerate(given)]
        for name in ("messages", "conversation"):
            if isinstance(record.get(name), list):
                record[name] = [self._message_bytes(m, f"{name}[{i}]") for i, m in enumerate(record[name])]
        return record, renamed

    def _message_bytes(self, message, where: str):
        if not isinstance(message, dict) or not isinstance(message.get("content"), list):
            return message
        parts = []
        for j, part in enumerate(message["content"]):
            if isinstance(part, dict) and part.get("type") == "image" and isinstance(part.get("image"), dict):
                part = {**part, "image": self._struct_bytes(part["image"], f"{where}.content[{j}]")}
            parts.append(part)
        return {**message, "content": parts}

    def _struct_bytes(self, item: dict, where: str) -> dict:
        data = item.get("bytes")
        if isinstance(data, str):
            return {**item, "bytes": self._b64decode(data, f"{where}.bytes")}
        return item

    def _b64decode(self, text, where: str) -> bytes:
        if not isinstance(text, str):
            raise SampleError(where, Reason.WRONG_TYPE, f"expected a base64 string, got {type(text).__name__}")
        max_chars = 4 * (self.limits.max_image_bytes // 3 + 1)
        if len(text) > max_chars:
            raise SampleError(where, IMAGE_TOO_LARGE, f"{len(text)} base64 characters, more than the limit "
                              f"of {self.limits.max_image_bytes} bytes", status=413)
        try:
            return base64.b64decode(text.split(",", 1)[1] if text.startswith("data:") else text, validate=True)
        except (binascii.Error, ValueError) as err:
            raise SampleError(where, Reason.IMAGE_CORRUPT, f"not valid base64: {err}") from None

    def _resolve_path(self, image: ImageItem, where: str) -> str:
        """The image's location under the first root that holds it; 403 when it is under none of them."""
        inside = []
        for root in self.roots:
            try:
                loc = resolve_image_path(root, image.ref, where)
            except FieldError:
                continue
            if image_exists(loc):
                return str(loc)
            inside.append(loc)
        if not inside:
            raise SampleError(where, Reason.IMAGE_PATH_ESCAPE,
                              f"path '{image.ref}' is outside the configured image roots", status=403)
        raise SampleError(where, Reason.IMAGE_MISSING, f"file not found: {inside[0]}")

    def _read_path_bytes(self, path: str, where: str) -> bytes:
        """The encoded bytes of the image at a resolved path (byte limit checked before reading)."""
        try:
            return read_image_bytes(path, max_bytes=self.limits.max_image_bytes)
        except ImageError as err:
            raise _image_error(where, err) from None

    def _decode_image(self, data: bytes, where: str):
        """Decode to RGB, resized as the batch path does (:func:`datasel_ray.io.images.decode_image`); bytes and
        pixels (from the header) checked before the raster is decoded."""
        if len(data) > self.limits.max_image_bytes:
            raise SampleError(where, IMAGE_TOO_LARGE, f"{len(data)} bytes, more than the limit of "
                              f"{self.limits.max_image_bytes}", status=413)
        try:
            return decode_image(data, where, self.image_size, self.limits.max_image_pixels)
        except ImageError as err:
            raise _image_error(where, err) from None


def _image_error(field_name: str, err: ImageError) -> SampleError:
    """The request error of an image that is the sample's fault: 413 over a limit, else 422."""
    if err.reason == IMAGE_TOO_LARGE:
        return SampleError(field_name, IMAGE_TOO_LARGE, err.detail, status=413)
    if err.reason == Reason.IMAGE_MISSING:
        return SampleError(field_name, Reason.IMAGE_MISSING, f"file not found: {err.uri}")
    return SampleError(field_name, Reason.IMAGE_CORRUPT, f"cannot decode image: {err.detail}")
