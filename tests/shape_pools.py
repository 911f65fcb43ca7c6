"""A small pool of every shape ingest reads (datasel_ray/io/shapes.py), made on the spot: generated images, image
bytes embedded in parquet rows, several images per row, text-only rows, and one bad row of each new kind.

:func:`make_shape_pools` writes them under a folder and returns, per pool, its path and the expected outcome of
each record (``Expected``): the quarantine reason, or the task, how it was decided, the image count and the
conversation text with its placeholders.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from datasel_ray import schema
from datasel_ray.schema import Reason, TaskFrom


def png(seed: int, size: tuple[int, int] = (12, 10)) -> bytes:
    """A random RGB PNG (width, height) = ``size``."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Expected:
    """One record's expected ingest outcome: ``reason`` for a quarantined row (and a fragment of its message),
    else ``task``, ``task_from``, ``n_images`` and, when given, the first human turn's text."""

    reason: str | None = None
    message: str = ""
    task: str = ""
    task_from: str = ""
    n_images: int = 0
    first_human: str | None = None
    embedded: list[bool] = field(default_factory=list)


@dataclass
class ShapePool:
    name: str
    path: Path
    shape: str
    expected: list[Expected]


def _conv(*pairs) -> list[dict]:
    out = []
    for q, a in pairs:
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return out


def make_shape_pools(root: Path) -> tuple[Path, dict[str, ShapePool]]:
    """Pools of every shape under ``root``; returns ``(image_root, {name: ShapePool})``."""
    images = root / "images"
    (images / "coco").mkdir(parents=True)
    (images / "gqa").mkdir()
    for i, name in enumerate(["coco/a.png", "coco/b.png", "gqa/c.png"]):
        (images / name).write_bytes(png(i))
    pools = {}

    # LLaVA JSON: image a string or a list; text-only; a source label; video; placeholder mismatch
    llava = [
        {"id": "l0", "image": "coco/a.png", "conversations": _conv(("<image>\nWhat colour?", "Red."))},
        {"id": "l1", "image": ["coco/a.png", "gqa/c.png"],
         "conversations": _conv(("Left <image> and right <image>: which is brighter?", "The left."))},
        {"id": "l2", "conversations": _conv(("Say hi.", "Hi."))},
        {"id": "l3", "image": "gqa/c.png", "data_source": "chartqa", "conversations": _conv(("Value?", "3"))},
        {"id": "l4", "video": "clips/v.mp4", "conversations": _conv(("<video>\nWhat happens?", "A dog runs."))},
        {"id": "l5", "image": ["coco/a.png", "coco/b.png"], "conversations": _conv(("<image>\nCompare.", "Same."))},
        {"id": "l6", "image": ["coco/a.png", "coco/missing.png"],
         "conversations": _conv(("<image><image>Compare.", "Same."))},
    ]
    path = root / "llava.json"
    path.write_text(json.dumps(llava, indent=1))
    pools["llava_json"] = ShapePool("llava_json", path, "llava", [
        Expected(task="coco", task_from=TaskFrom.RULE, n_images=1, first_human="<image>\nWhat colour?",
                 embedded=[False]),
        Expected(task="coco", task_from=TaskFrom.RULE, n_images=2,
                 first_human="Left <image> and right <image>: which is brighter?", embedded=[False, False]),
        Expected(task="sharegpt", task_from=TaskFrom.RULE, n_images=0, first_human="Say hi."),
        Expected(task="chartqa", task_from=TaskFrom.SOURCE_LABEL, n_images=1, first_human="<image>\nValue?",
                 embedded=[False]),
        Expected(Reason.UNSUPPORTED_VIDEO, "video: "),
        Expected(Reason.PLACEHOLDER_MISMATCH, "conversations: 1 '<image>' placeholder(s) for 2 image(s)"),
        Expected(Reason.IMAGE_MISSING, "image[1]: file not found"),
    ])

    # HF parquet, LLaVA-OneVision style: image = {bytes, path} struct, conversations, data_source
    image_struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    ov_rows = [
        {"id": "o0", "image": {"bytes": png(10), "path": "ov/0.png"}, "data_source": "ov_chart",
         "conversations": _conv(("<image>\nRead the chart.", "Up."))},
        {"id": "o1", "image": None, "data_source": "ov_text", "conversations": _conv(("Hello?", "Hi."))},
        {"id": "o2", "image": {"bytes": b"\x89PNG not really", "path": "ov/2.png"}, "data_source": "ov_chart",
         "conversations": _conv(("<image>\nRead.", "Down."))},
        {"id": "o3", "image": {"bytes": png(11), "path": None}, "data_source": None,
         "conversations": _conv(("What is shown?", "Noise."))},
        {"id": "o4", "image": {"bytes": png(12), "path": "coco/ov4.png"}, "data_source": None,
         "conversations": _conv(("<image>\nDescribe.", "Noise."))},
    ]
    table = pa.Table.from_pylist(ov_rows, schema=pa.schema([
        ("id", pa.string()), ("image", image_struct), ("data_source", pa.string()),
        ("conversations", pa.list_(turn))]))
    path = root / "ov.parquet"
    pq.write_table(table, path, row_group_size=2)
    pools["ov_parquet"] = ShapePool("ov_parquet", path, "llava", [
        Expected(task="ov_chart", task_from=TaskFrom.SOURCE_LABEL, n_images=1, embedded=[True],
                 first_human="<image>\nRead the chart."),
        Expected(task="ov_text", task_from=TaskFrom.SOURCE_LABEL, n_images=0, first_human="Hello?"),
        Expected(Reason.IMAGE_BYTES_CORRUPT, "image.bytes: the embedded image does not decode"),
        Expected(task="other", task_from=TaskFrom.DEFAULT, n_images=1, embedded=[True],
                 first_human="<image>\nWhat is shown?"),
        Expected(task="coco", task_from=TaskFrom.RULE, n_images=1, embedded=[True], first_human="<image>\nDescribe."),
    ])

    # the_cauldron / FineVision: images = list of {bytes, path}, texts = [{user, assistant, source}]
    text_turn = pa.struct([("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())])
    cauldron_rows = [
        {"images": [{"bytes": png(20), "path": None}, {"bytes": png(21), "path": None}],
         "texts": [{"user": "Which differs?", "assistant": "The second.", "source": "nlvr2"},
                   {"user": "Why?", "assistant": "Colour.", "source": "nlvr2"}]},
        {"images": [{"bytes": png(22), "path": None}],
         "texts": [{"user": "Caption it.", "assistant": "Noise.", "source": None}]},
        {"images": [], "texts": [{"user": "2+2?", "assistant": "4", "source": "math"}]},
        {"images": [{"bytes": png(23), "path": None}, {"bytes": b"GIF89a-broken", "path": None}],
         "texts": [{"user": "Compare.", "assistant": "Same.", "source": "nlvr2"}]},
        {"images": [{"bytes": png(24), "path": None}],
         "texts": [{"user": "<image> and <image>", "assistant": "One image.", "source": "nlvr2"}]},
    ]
    table = pa.Table.from_pylist(cauldron_rows, schema=pa.schema([
        ("images", pa.list_(image_struct)), ("texts", pa.list_(text_turn))]))
    path = root / "cauldron.parquet"
    pq.write_table(table, path, row_group_size=2)
    pools["cauldron_parquet"] = ShapePool("cauldron_parquet", path, "texts", [
        Expected(task="nlvr2", task_from=TaskFrom.SOURCE_LABEL, n_images=2, embedded=[True, True],
                 first_human="<image>\n<image>\nWhich differs?"),
        Expected(task="other", task_from=TaskFrom.DEFAULT, n_images=1, embedded=[True],
                 first_human="<image>\nCaption it."),
        Expected(task="math", task_from=TaskFrom.SOURCE_LABEL, n_images=0, first_human="2+2?"),
        Expected(Reason.IMAGE_BYTES_CORRUPT, "images[1].bytes: the embedded image does not decode"),
        Expected(Reason.PLACEHOLDER_MISMATCH, "texts: 2 '<image>' placeholder(s) for 1 image(s) in 'images'"),
    ])

    # messages JSONL: string content with placeholders + images list, typed parts, parts carrying their image
    messages = [
        {"id": "m0", "images": ["coco/a.png", "coco/b.png"], "messages": [
            {"role": "user", "content": "<image><image>Are these the same?"},
            {"role": "assistant", "content": "No."}]},
        {"id": "m1", "images": ["gqa/c.png"], "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Noise."}]}]},
        {"id": "m2", "source": "docvqa", "messages": [
            {"role": "user", "content": [{"type": "text", "text": "First"}, {"type": "image", "image": "coco/b.png"},
                                         {"type": "text", "text": "then"},
                                         {"type": "image", "image": "coco/a.png"}]},
            {"role": "assistant", "content": "Both noise."}]},
        {"id": "m3", "messages": [{"role": "user", "content": "Tell a joke."},
                                  {"role": "assistant", "content": "No."}]},
        {"id": "m4", "images": ["coco/a.png", "coco/b.png"], "messages": [
            {"role": "user", "content": "<image> only one placeholder"}, {"role": "assistant", "content": "Hm."}]},
        {"id": "m5", "messages": [{"role": "user", "content": [{"type": "video", "video": "v.mp4"},
                                                               {"type": "text", "text": "What?"}]},
                                  {"role": "assistant", "content": "A dog."}]},
        {"id": "m6", "images": ["../outside.png"], "messages": [
            {"role": "user", "content": "<image> hi"}, {"role": "assistant", "content": "Hm."}]},
    ]
    path = root / "messages.jsonl"
    path.write_text("".join(json.dumps(m) + "\n" for m in messages))
    pools["messages_jsonl"] = ShapePool("messages_jsonl", path, "messages", [
        Expected(task="coco", task_from=TaskFrom.RULE, n_images=2, embedded=[False, False],
                 first_human="<image><image>Are these the same?"),
        Expected(task="gqa", task_from=TaskFrom.RULE, n_images=1, embedded=[False],
                 first_human="<image>\nWhat is it?"),
        Expected(task="docvqa", task_from=TaskFrom.SOURCE_LABEL, n_images=2, embedded=[False, False],
                 first_human="First\n<image>\nthen\n<image>"),
        Expected(task="sharegpt", task_from=TaskFrom.RULE, n_images=0, first_human="Tell a joke."),
        Expected(Reason.PLACEHOLDER_MISMATCH, "messages: 1 '<image>' placeholder(s) for 2 image(s) in 'images'"),
        Expected(Reason.UNSUPPORTED_VIDEO, "messages[0].content[0]: video samples are not scored yet"),
        Expected(Reason.IMAGE_PATH_ESCAPE, "images[0]: path '../outside.png' resolves outside the image root"),
    ])
    return images, pools


def samples_by_index(run_dir) -> tuple[dict[int, dict], dict[int, dict]]:
    """``({source_index: samples row}, {source_index: quarantine row})`` of a one-file pool's run."""
    from datasel_ray.pipeline.feature_store import load_table

    samples = load_table(run_dir, "samples").to_pylist()
    quarantine = load_table(run_dir, "quarantine/ingest").to_pylist()
    return ({r[schema.SOURCE_INDEX]: r for r in samples}, {r[schema.SOURCE_INDEX]: r for r in quarantine})
