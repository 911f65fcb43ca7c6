"""The one image read and decode of the project: ingest validation, extraction and the scorer all use it.

Reading (:func:`read_image_bytes`) and decoding (:func:`decode_image`) are separate, and only these are a row's
fault (:class:`ImageError`, a :class:`~datasel_ray.schema.RowError`):

- ``image_missing``: no file at the path (not found, or a directory);
- ``image_corrupt``: the bytes do not decode with PIL (truncated files included: pixels are loaded eagerly);
- ``image_too_large``: over a byte or pixel limit, only when the caller gives one (the scorer; not a quarantine
  reason).

Any other error while reading (permissions, network, endpoint, credentials, timeouts, a missing package, out of
memory) is not the row's fault: it raises :class:`~datasel_ray.io.storage.StorageError`, which stops a phase
instead of quarantining every row behind it. A MemoryError while decoding propagates as it is.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from datasel_ray.io.storage import Location, StorageError
from datasel_ray.schema import Reason, RowError

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = ["IMAGE_TOO_LARGE", "ImageError", "decode_image", "image_exists", "load_image", "load_row_images",
           "read_image_bytes", "row_image_bytes", "row_image_sources"]

IMAGE_TOO_LARGE = "image_too_large"


class ImageError(RowError):
    """An image that is the row's fault. ``reason``: ``image_missing``, ``image_corrupt`` or ``image_too_large``;
    ``uri``: the image; ``detail``: the cause alone (PIL's message, ``"640x480 pixels, more than ..."``), for
    callers that word their own message. ``str(err)`` is a full message naming the image."""

    def __init__(self, reason: str, message: str, uri: str = "", detail: str = ""):
        super().__init__(reason, message)
        self.uri = uri
        self.detail = detail

    def __reduce__(self):
        return type(self), (self.reason, str(self), self.uri, self.detail)


def _missing(uri: str) -> ImageError:
    return ImageError(Reason.IMAGE_MISSING, f"image not found: {uri}", uri, "file not found")


def _corrupt(uri: str, err: BaseException) -> ImageError:
    from PIL import UnidentifiedImageError

    # PIL names an in-memory buffer by its repr (a memory address): drop it, the message names the image
    detail = "cannot identify image file" if isinstance(err, UnidentifiedImageError) else str(err)
    return ImageError(Reason.IMAGE_CORRUPT, f"cannot decode image {uri}: {detail}", uri, detail)


def _too_large(uri: str, detail: str) -> ImageError:
    return ImageError(IMAGE_TOO_LARGE, f"image {uri}: {detail}", uri, detail)


def _location(source: str | Location) -> Location:
    if isinstance(source, Location):
        return source
    try:
        return Location.parse(source)
    except Exception as err:  # an unknown scheme or an unreachable region lookup: the store's setup, not the row
        raise StorageError.wrap(str(source), err) from err


def _not_a_file(loc: Location) -> bool:
    """After a read error: True when the store says there is no file at ``loc`` (absent, or a directory)."""
    try:
        return loc.fs.get_file_info(loc.path).type != pafs.FileType.File
    except Exception:  # the store cannot answer either: the read error stands
        return False


def read_image_bytes(source: str | Location, max_bytes: int | None = None) -> bytes:
    """The bytes of the image at ``source`` (a local path, a URI or a Location).

    Raises ImageError(image_missing) when there is no file there, ImageError(image_too_large) when it holds more
    than ``max_bytes`` (checked before reading), and StorageError for every other failure.
    """
    loc = _location(source)
    uri = str(loc)
    try:
        with loc.fs.open_input_file(loc.path) as handle:
            if max_bytes is not None and (size := handle.size()) > max_bytes:
                raise _too_large(uri, f"{size} bytes, more than the limit of {max_bytes}")
            return handle.read()
    except ImageError:
        raise
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
        raise _missing(uri) from err
    except Exception as err:  # MemoryError and timeouts included: none of them is the row's fault
        if isinstance(err, OSError) and _not_a_file(loc):  # a directory reads as a plain OSError
            raise _missing(uri) from err
        raise StorageError.wrap(uri, err) from err


def image_exists(source: str | Location) -> bool:
    """True when ``source`` is a file; StorageError when the store cannot say (without reading the image)."""
    loc = _location(source)
    try:
        return loc.is_file()
    except Exception as err:
        raise StorageError.wrap(str(loc), err, doing="look up") from err


def decode_image(data: bytes, source: str = "<bytes>", image_size: int | None = None,
                 max_pixels: int | None = None) -> PILImage.Image:
    """Decode ``data`` in memory to an RGB PIL image (mode ``RGB``, all pixels loaded), resized to
    ``image_size`` x ``image_size`` with BICUBIC when given. ``source`` names the image in messages.

    ``max_pixels``: width * height limit checked from the header before the raster is decoded; PIL's own
    decompression-bomb refusal counts as over it. Raises ImageError(image_corrupt) for anything PIL refuses,
    ImageError(image_too_large) over ``max_pixels``; a MemoryError propagates.
    """
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
    except MemoryError:
        raise
    except Image.DecompressionBombError as err:
        raise (_too_large(source, str(err)) if max_pixels is not None else _corrupt(source, err)) from err
    except Exception as err:  # PIL raises many types for undecodable data
        raise _corrupt(source, err) from err
    if max_pixels is not None and width * height > max_pixels:
        raise _too_large(source, f"{width}x{height} pixels, more than the limit of {max_pixels}")
    try:
        image.load()
        image = image.convert("RGB")
    except MemoryError:
        raise
    except Exception as err:  # truncated files fail here, not at open
        raise _corrupt(source, err) from err
    if image_size is not None:
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return image


def load_image(source: str | Location, image_size: int | None = None, max_pixels: int | None = None,
               max_bytes: int | None = None) -> PILImage.Image:
    """:func:`read_image_bytes` then :func:`decode_image`: an RGB PIL image of ``source``, optionally resized to
    a square; raises ImageError for the row's faults and StorageError for the store's."""
    loc = _location(source)
    return decode_image(read_image_bytes(loc, max_bytes), str(loc), image_size, max_pixels)


def row_image_sources(row: dict) -> list[tuple[str, bytes | None]]:
    """``(uri, data)`` per image of a samples-table row, in placeholder order: ``data`` the embedded bytes (then
    ``uri`` is the reference as written, for messages) or None (then ``uri`` is the resolved path/URI).

    Reads ``row["images"]`` (list of ``{ref, uri, data}``, :data:`datasel_ray.schema.IMAGES`); a row without that
    column (samples written before it existed, or a caller's own dict) falls back to ``row["image_path"]``.
    """
    from datasel_ray import schema

    images = row.get(schema.IMAGES)
    if images is None:
        path = row.get(schema.IMAGE_PATH)
        return [(str(path), None)] if path else []
    out = []
    for i, image in enumerate(images):
        data = image.get("data")
        if data is not None:
            out.append((image.get("ref") or f"images[{i}] (embedded)", bytes(data)))
        else:
            out.append((str(image["uri"]), None))
    return out


def row_image_bytes(row: dict) -> list[bytes]:
    """The encoded bytes of every image of a samples-table row, in placeholder order ([] for a text-only row):
    embedded bytes as they are, the others read (:func:`read_image_bytes`). For content digests (dedup)."""
    return [read_image_bytes(uri) if data is None else data for uri, data in row_image_sources(row)]


def load_row_images(row: dict, image_size: int | None = None) -> list[PILImage.Image]:
    """The decoded RGB images of one samples-table row, in placeholder order; [] for a text-only row.

    ``row``: a dict with the samples columns (``images`` and/or ``image_path``); each image is read from its
    path/URI (:func:`read_image_bytes`) or decoded from the bytes embedded in the row, resized to ``image_size``
    squared when given (as :func:`decode_image`). Raises ImageError (the row's fault) or StorageError (the
    store's). Extraction, warm-up and the scorer get a sample's images through this function.
    """
    out = []
    for uri, data in row_image_sources(row):
        if data is None:
            out.append(load_image(uri, image_size))
        else:
            out.append(decode_image(data, uri, image_size))
    return out
