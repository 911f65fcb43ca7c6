"""Pool shapes: the ways instruction pools write a sample, all read into one :class:`NormalizedRecord`.

===========  ================================================================================================
shape        a record
===========  ================================================================================================
``llava``    ``conversations`` = [{from, value}] with ``<image>`` placeholders; ``image`` a path string, a list of
             them, or {bytes, path} structs (HF parquet: LLaVA-OneVision-Data, LLaVA-NeXT-Data); or ``images``
             a list of those (Mantis-style image lists).
``texts``    ``texts`` = [{user, assistant, source?}] (the_cauldron, FineVision), images in ``images`` / ``image``.
             Each entry is one human turn and one assistant turn; these pools write no placeholder, so one per
             image is put at the front of the first human turn.
``messages`` ``messages`` (or ``conversation``) = [{role, content}]: ``content`` a string with ``<image>``
             placeholders and the images in a side ``images`` list (LLaMA-Factory / ShareGPT multimodal,
             Mantis-Instruct), or a list of typed parts ``{type: text, text}`` / ``{type: image, image?}``
             (Nemotron-VLM, chat-template form), each image part standing where its image goes.
===========  ================================================================================================

An image is a path string (resolved under ``pool.image_root``), or a struct ``{bytes, path}``: ``bytes`` the
encoded image embedded in the row (decoded from the row, no image root needed), else ``path``. ``ref`` keeps what
the row wrote (the path, or the struct's path), for the task rules and the messages.

A row with a ``video`` / ``videos`` value, or a ``{type: video}`` part, is refused (``unsupported_video``).
The source label is the first non-empty string of ``source_fields`` at the row level; for ``texts`` rows without
one, the turns' ``source`` when they all agree.

:func:`detect_shape` picks the shape from the first records (``pool.schema: auto``); :func:`normalize_record`
raises :class:`~datasel_ray.schema.FieldError` naming the field for a record that does not fit it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from datasel_ray.roles import IMAGE_PLACEHOLDER
from datasel_ray.schema import FieldError, Reason

SHAPES = ("llava", "texts", "messages")
# the key that marks each shape, in the order detect_shape tries them
SHAPE_KEYS = (("conversations", "llava"), ("texts", "texts"), ("messages", "messages"), ("conversation", "messages"))
DEFAULT_SOURCE_FIELDS = ("data_source", "source")
VIDEO_FIELDS = ("video", "videos")


@dataclass(frozen=True)
class ImageItem:
    """One image of a sample: ``ref`` as the row wrote it ("" for bytes without a path), ``data`` the embedded
    encoded bytes or None (then ``ref`` is a path under the image root)."""

    ref: str
    data: bytes | None = None
    where: str = field(default="image", compare=False)  # the field that holds it (images[1], messages[0].content[0])


@dataclass(frozen=True)
class RawTurn:
    """One turn as read: ``role`` lower-cased as written, ``value`` its text with placeholders, ``role_field`` /
    ``value_field`` the paths that name them in messages (``messages[2].role``)."""

    role: str
    value: str
    role_field: str
    value_field: str


@dataclass
class NormalizedRecord:
    """A pool record in the project's one internal form (before the turn and image checks of validation)."""

    shape: str
    sample_id: str
    images: list[ImageItem]
    turns: list[RawTurn]
    turns_field: str  # "conversations", "messages", "texts" (for messages about the whole list)
    source_label: str | None = None
    images_field: str = "image"  # the record field the images came from (for messages)
    extra: dict = field(default_factory=dict)


def detect_shape(values: list) -> str:
    """The shape of the first records ``values`` (parsed JSON / parquet rows): the first of :data:`SHAPE_KEYS`
    that one of them carries; ``llava`` when none does (validation then reports the missing field)."""
    for value in values:
        if isinstance(value, dict):
            for key, shape in SHAPE_KEYS:
                if key in value:
                    return shape
    return "llava"


class _LlavaTurn(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    role: StrictStr = Field(alias="from")
    value: StrictStr


class _LlavaRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: StrictStr | int | None = None
    conversations: list[_LlavaTurn]


class _TextsTurn(BaseModel):
    model_config = ConfigDict(extra="allow")
    user: StrictStr
    assistant: StrictStr
    source: StrictStr | None = None


class _TextsRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: StrictStr | int | None = None
    texts: list[_TextsTurn]


def pydantic_path(loc) -> str:
    """``("conversations", 0, "value")`` -> ``conversations[0].value``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _parse(model: type[BaseModel], value: dict) -> BaseModel:
    try:
        return model.model_validate(value)
    except ValidationError as err:
        first = err.errors()[0]
        where = pydantic_path(first["loc"])
        if first["type"] == "missing":
            raise FieldError(where, Reason.MISSING_FIELD, "required field is missing") from None
        got = first.get("input")
        raise FieldError(where, Reason.WRONG_TYPE, f"{first['msg']} (got {type(got).__name__} {_short(got)})") from None


def _short(value, limit: int = 60) -> str:
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _sample_id(value: dict) -> str:
    sid = value.get("id")
    if sid is not None and (isinstance(sid, bool) or not isinstance(sid, (str, int))):
        raise FieldError("id", Reason.WRONG_TYPE, f"expected a string or an integer, got {type(sid).__name__} "
                                                  f"{_short(sid)}")
    return "" if sid is None else str(sid)


def image_item(item, where: str) -> ImageItem:
    """One image as a row writes it: a path string, or ``{bytes, path}`` (``bytes`` null -> the path)."""
    if isinstance(item, str):
        if not item.strip():
            raise FieldError(where, Reason.WRONG_TYPE, "empty image path")
        return ImageItem(item, None, where)
    if isinstance(item, dict):
        data, path = item.get("bytes"), item.get("path")
        if path is not None and not isinstance(path, str):
            raise FieldError(f"{where}.path", Reason.WRONG_TYPE, f"expected a string, got {type(path).__name__}")
        if data is not None:
            if not isinstance(data, (bytes, bytearray)):
                raise FieldError(f"{where}.bytes", Reason.WRONG_TYPE,
                                 f"expected the encoded image bytes, got {type(data).__name__}")
            return ImageItem(path or "", bytes(data), where)
        if path:
            return ImageItem(path, None, where)
        raise FieldError(where, Reason.MISSING_FIELD, "an image struct needs 'bytes' or 'path'")
    raise FieldError(where, Reason.WRONG_TYPE, f"expected a path string or a {{bytes, path}} struct, got "
                                               f"{type(item).__name__} {_short(item)}")


def row_images(value: dict) -> tuple[list[ImageItem], str]:
    """The images of a record from ``image`` (one image or a list) or ``images`` (a list), with that field's
    name. An empty ``image`` string, null, or an empty list is no image (text-only)."""
    if value.get("image") is not None and value.get("images") is not None:
        raise FieldError("images", Reason.WRONG_TYPE, "give either 'image' or 'images', not both")
    name = "images" if value.get("images") is not None else "image"
    given = value.get(name)
    if given is None or given == "":
        return [], name
    if isinstance(given, (list, tuple)):
        return [image_item(item, f"{name}[{i}]") for i, item in enumerate(given)], name
    if name == "images":
        raise FieldError(name, Reason.WRONG_TYPE, f"expected a list of images, got {type(given).__name__}")
    return [image_item(given, name)], name


def _check_video(value: dict) -> None:
    for name in VIDEO_FIELDS:
        video = value.get(name)
        if video not in (None, "", [], ()):
            raise FieldError(name, Reason.UNSUPPORTED_VIDEO, "video samples are not scored yet (images only)")


def source_label(value: dict, source_fields) -> str | None:
    """The first non-empty string among ``source_fields`` of the record, stripped; None when there is none."""
    for name in source_fields:
        label = value.get(name)
        if isinstance(label, str) and label.strip():
            return label.strip()
    return None


def normalize_record(value: dict, shape: str, source_fields=DEFAULT_SOURCE_FIELDS) -> NormalizedRecord:
    """``value`` (a parsed record, a dict) in ``shape`` -> :class:`NormalizedRecord`; raises FieldError."""
    if shape not in SHAPES:
        raise ValueError(f"unknown pool shape {shape!r}; expected one of {', '.join(SHAPES)}")
    _check_video(value)
    if shape == "llava":
        record = _parse(_LlavaRecord, value)
        images, images_field = row_images(value)
        turns = [RawTurn(t.role.lower(), t.value, f"conversations[{i}].from", f"conversations[{i}].value")
                 for i, t in enumerate(record.conversations)]
        return NormalizedRecord(shape, _sample_id(value), images, turns, "conversations",
                                source_label(value, source_fields), images_field)
    if shape == "texts":
        record = _parse(_TextsRecord, value)
        images, images_field = row_images(value)
        turns = []
        for i, t in enumerate(record.texts):
            turns.append(RawTurn("user", t.user, f"texts[{i}]", f"texts[{i}].user"))
            turns.append(RawTurn("assistant", t.assistant, f"texts[{i}]", f"texts[{i}].assistant"))
        label = source_label(value, source_fields)
        sources = {t.source.strip() for t in record.texts if t.source and t.source.strip()}
        if label is None and len(sources) == 1 and all(t.source for t in record.texts):
            label = sources.pop()
        return NormalizedRecord(shape, _sample_id(value), images, turns, "texts", label, images_field)
    return _normalize_messages(value, source_fields)


def _normalize_messages(value: dict, source_fields) -> NormalizedRecord:
    name = "messages" if "messages" in value else "conversation" if "conversation" in value else "messages"
    messages = value.get(name)
    if messages is None:
        raise FieldError(name, Reason.MISSING_FIELD, "required field is missing")
    if not isinstance(messages, list):
        raise FieldError(name, Reason.WRONG_TYPE, f"expected a list of {{role, content}} messages, got "
                                                  f"{type(messages).__name__} {_short(messages)}")
    side_images, images_field = row_images(value)
    part_images: list[ImageItem] = []
    n_bare_parts = 0
    turns = []
    for i, message in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise FieldError(where, Reason.WRONG_TYPE, f"expected a {{role, content}} object, got "
                                                       f"{type(message).__name__}")
        role = message.get("role", message.get("from"))
        if role is None:
            raise FieldError(f"{where}.role", Reason.MISSING_FIELD, "required field is missing")
        if not isinstance(role, str):
            raise FieldError(f"{where}.role", Reason.WRONG_TYPE, f"expected a string, got {type(role).__name__}")
        content = message.get("content", message.get("value"))
        if content is None:
            raise FieldError(f"{where}.content", Reason.MISSING_FIELD, "required field is missing")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            pieces = []
            for j, part in enumerate(content):
                part_where = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    text_value = part.get("text")
                    if not isinstance(text_value, str):
                        raise FieldError(f"{part_where}.text", Reason.WRONG_TYPE,
                                         f"expected a string, got {type(text_value).__name__}")
                    pieces.append(text_value)
                elif kind == "image":
                    pieces.append(IMAGE_PLACEHOLDER)
                    carried = next((part[k] for k in ("image", "path", "url") if part.get(k) is not None), None)
                    if carried is None:
                        n_bare_parts += 1
                    else:
                        part_images.append(image_item(carried, part_where))
                elif kind == "video":
                    raise FieldError(part_where, Reason.UNSUPPORTED_VIDEO,
                                     "video samples are not scored yet (images only)")
                else:
                    raise FieldError(part_where, Reason.WRONG_TYPE,
                                     f"expected a {{type: text|image}} part, got {_short(part)}")
            text = "\n".join(pieces)
        else:
            raise FieldError(f"{where}.content", Reason.WRONG_TYPE, f"expected a string or a list of typed parts, "
                                                                   f"got {type(content).__name__}")
        turns.append(RawTurn(role.lower(), text, f"{where}.role", f"{where}.content"))
    if part_images and (side_images or n_bare_parts):
        raise FieldError(images_field if side_images else name, Reason.WRONG_TYPE,
                         "image parts carry their own images and the row lists images too (or some parts carry one "
                         "and some do not): give the images one way")
    images = part_images or side_images
    return NormalizedRecord("messages", _sample_id(value), images, turns, name, source_label(value, source_fields),
                            name if part_images else images_field)
