"""The scorer's request parser alone (no model, no Ray): every refusal names its field with the validator's own
field / reason / detail, and the pool shapes, several images per sample and base64 bytes are accepted."""

from __future__ import annotations

import base64
import json

import pytest
from shape_pools import make_shape_pools, png

from datasel_ray.config import RunConfig
from datasel_ray.io.images import IMAGE_TOO_LARGE
from datasel_ray.io.pool import RawRecord
from datasel_ray.io.tasks import TaskResolver
from datasel_ray.io.validation import Limits, RecordValidator
from datasel_ray.schema import FieldError, Reason
from datasel_ray.scoring.request import TOO_MANY_SAMPLES, SampleError, SampleParser, ScoringLimits

TASKS = ["coco", "gqa", "caption", "sharegpt", "chartqa", "docvqa", "nlvr2", "ov_chart", "other"]
CONVS = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    return make_shape_pools(tmp_path_factory.mktemp("shapes"))


@pytest.fixture()
def parser(pools):
    image_root, _ = pools
    cfg = RunConfig.model_validate({"model": {"image_size": 16}, "pool": {"path": "unused.json"}})
    return SampleParser(cfg, TASKS, [str(image_root)], ScoringLimits(max_samples=4, max_image_bytes=2000))


def refuse(parser, sample) -> SampleError:
    with pytest.raises(SampleError) as info:
        parser.validate(sample, 0)
    return info.value


BAD_SAMPLES = [
    # (name, sample, status, field, reason)
    ("not_an_object", [1], 422, "", Reason.WRONG_TYPE),
    ("missing_conversations", {"id": "a"}, 422, "conversations", Reason.MISSING_FIELD),
    ("conversations_wrong_type", {"conversations": "hi"}, 422, "conversations", Reason.WRONG_TYPE),
    ("no_assistant_turn", {"conversations": [{"from": "human", "value": "hi"}]}, 422, "conversations",
     Reason.NO_ASSISTANT_TURN),
    ("empty_turn", {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}]}, 422,
     "conversations[1].value", Reason.EMPTY_TEXT),
    ("unknown_role", {"conversations": [{"from": "robot", "value": "hi"}] + CONVS}, 422, "conversations[0].from",
     Reason.WRONG_TYPE),
    ("missing_value", {"conversations": [{"from": "gpt"}]}, 422, "conversations[0].value", Reason.MISSING_FIELD),
    ("task_wrong_type", {"task": 3, "conversations": CONVS}, 422, "task", Reason.WRONG_TYPE),
    ("unknown_task", {"task": "no-such-task", "conversations": CONVS}, 422, "task", Reason.UNKNOWN_TASK),
    ("unknown_source_label", {"data_source": "elsewhere", "conversations": CONVS}, 422, "task", Reason.UNKNOWN_TASK),
    ("undecodable_base64", {"task": "caption", "image_base64": "%%%not-base64%%%", "conversations": CONVS}, 422,
     "image_base64", Reason.IMAGE_CORRUPT),
    ("not_an_image", {"task": "caption", "image_base64": b64(b"hello"), "conversations": CONVS}, 422,
     "image_base64", Reason.IMAGE_CORRUPT),
    ("oversized_image", {"task": "caption", "image_base64": b64(png(1, (200, 200))), "conversations": CONVS}, 413,
     "image_base64", IMAGE_TOO_LARGE),
    ("base64_without_task", {"image_base64": b64(png(1)), "conversations": CONVS}, 422, "task",
     Reason.MISSING_FIELD),
    ("base64_and_path", {"image_base64": b64(png(1)), "image": "coco/a.png", "conversations": CONVS}, 422,
     "image_base64", Reason.WRONG_TYPE),
    ("path_outside_roots", {"image": "../../../etc/passwd", "conversations": CONVS}, 403, "image",
     Reason.IMAGE_PATH_ESCAPE),
    ("absolute_path_outside_roots", {"image": "/etc/hostname", "conversations": CONVS}, 403, "image",
     Reason.IMAGE_PATH_ESCAPE),
    ("missing_image_file", {"image": "coco/does-not-exist.png", "conversations": CONVS}, 422, "image",
     Reason.IMAGE_MISSING),
    ("second_image_missing", {"images": ["coco/a.png", "coco/nope.png"], "conversations": [
        {"from": "human", "value": "<image><image>?"}, {"from": "gpt", "value": "x"}]}, 422, "images[1]",
     Reason.IMAGE_MISSING),
    ("second_base64_corrupt", {"task": "caption", "image_base64": [b64(png(2)), b64(b"x")], "conversations": [
        {"from": "human", "value": "<image><image>?"}, {"from": "gpt", "value": "x"}]}, 422, "image_base64[1]",
     Reason.IMAGE_CORRUPT),
    ("bytes_struct_corrupt", {"task": "caption", "images": [{"bytes": b64(b"junk"), "path": "x.png"}],
                              "conversations": CONVS}, 422, "images[0]", Reason.IMAGE_CORRUPT),
    ("bytes_struct_not_base64", {"task": "caption", "images": [{"bytes": "@@", "path": None}],
                                 "conversations": CONVS}, 422, "images[0].bytes", Reason.IMAGE_CORRUPT),
    ("placeholder_mismatch", {"images": ["coco/a.png", "coco/b.png"], "conversations": CONVS}, 422,
     "conversations", Reason.PLACEHOLDER_MISMATCH),
    ("video", {"video": "v.mp4", "conversations": CONVS}, 422, "video", Reason.UNSUPPORTED_VIDEO),
    ("messages_video_part", {"messages": [{"role": "user", "content": [{"type": "video"}]},
                                          {"role": "assistant", "content": "x"}]}, 422, "messages[0].content[0]",
     Reason.UNSUPPORTED_VIDEO),
    ("messages_empty_user", {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]},
     422, "messages[0].content", Reason.EMPTY_TEXT),
    ("texts_missing_assistant", {"texts": [{"user": "q"}]}, 422, "texts[0].assistant", Reason.MISSING_FIELD),
]


@pytest.mark.parametrize("name,sample,status,field,reason", BAD_SAMPLES, ids=[c[0] for c in BAD_SAMPLES])
def test_refusals_name_the_field(parser, name, sample, status, field, reason):
    err = refuse(parser, sample)
    assert (err.status, err.field, err.reason) == (status, field, reason), str(err)
    assert str(err) == (f"{field}: {err.detail}" if field else err.detail)
    assert err.to_dict() == {"status": status, "field": field, "reason": reason, "message": str(err)}
    inner = err.within("samples[2]")
    assert inner.field == (f"samples[2].{field}" if field else "samples[2]")
    assert (inner.reason, inner.detail, inner.status) == (reason, err.detail, status)
    assert str(inner) == f"{inner.field}: {err.detail}"


def test_record_errors_come_from_the_validator_attributes(parser, monkeypatch):
    """The parser maps the validator's FieldError attributes; a detail holding ': ' is not split."""
    from datasel_ray.io import validation

    def refuse_all(self, value, record_index=None, check_images=None, resolve_images=True):
        raise FieldError("messages[3].content[1].text", Reason.WRONG_TYPE, "odd: a detail: with colons")

    monkeypatch.setattr(validation.RecordValidator, "accept", refuse_all)
    err = refuse(parser, {"conversations": CONVS})
    assert (err.field, err.reason, err.detail) == ("messages[3].content[1].text", Reason.WRONG_TYPE,
                                                    "odd: a detail: with colons")
    assert err.within("samples[0]").field == "samples[0].messages[3].content[1].text"


def test_payload_limits(parser):
    with pytest.raises(SampleError) as info:
        parser.parse_payload({"samples": [{}] * 5})
    assert (info.value.status, info.value.field, info.value.reason) == (413, "samples", TOO_MANY_SAMPLES)
    for body, field in (([1], "body"), ({"samples": "x"}, "samples"), ({"samples": []}, "samples")):
        with pytest.raises(SampleError) as info:
            parser.parse_payload(body)
        assert info.value.field == field
    items, is_list = parser.parse_payload({"samples": [{"a": 1}, {"b": 2}]})
    assert is_list and [p for _, p in items] == ["samples[0]", "samples[1]"]


def test_several_images_per_sample_in_every_form(parser):
    two = [{"from": "human", "value": "<image> vs <image>?"}, {"from": "gpt", "value": "Same."}]
    sample, images = parser.validate({"images": ["coco/a.png", {"bytes": b64(png(7)), "path": "gqa/x.png"}],
                                      "conversations": two}, 0)
    assert [im.size for im in images] == [(16, 16), (16, 16)]
    assert sample.image_refs[1] == "base64" and sample.image_refs[0].endswith("coco/a.png")
    assert sample.conversations[0]["value"] == "<image> vs <image>?"
    assert (sample.task, sample.task_source) == ("coco", "inferred")

    sample, images = parser.validate({"task": "caption", "image_base64": [b64(png(8)), b64(png(9))],
                                      "conversations": [{"from": "human", "value": "Compare."},
                                                        {"from": "gpt", "value": "Same."}]}, 0)
    assert len(images) == 2 and sample.image_refs == ["base64", "base64"]
    assert sample.conversations[0]["value"] == "<image>\n<image>\nCompare."
    assert (sample.task, sample.task_source) == ("caption", "given")

    sample, images = parser.validate({"messages": [
        {"role": "user", "content": [{"type": "image", "image": {"bytes": b64(png(3)), "path": None}},
                                     {"type": "text", "text": "and"}, {"type": "image", "image": "gqa/c.png"}]},
        {"role": "assistant", "content": "ok"}], "source": "docvqa"}, 0)
    assert len(images) == 2 and sample.image_refs[0] == "base64" and sample.image_refs[1].endswith("gqa/c.png")
    assert sample.conversations == [{"from": "human", "value": "<image>\nand\n<image>"},
                                    {"from": "gpt", "value": "ok"}]
    assert (sample.task, sample.task_source) == ("docvqa", "inferred")

    sample, images = parser.validate({"messages": [{"role": "user", "content": "hello"},
                                                   {"role": "assistant", "content": "hi"}]}, 0)
    assert images == [] and sample.image_refs == [] and sample.task == "sharegpt"


def test_pool_rows_sent_as_they_are_get_the_ingest_task(parser, pools):
    """A pool row of any shape sent to the parser gets the task ingest gives it (JSON pools as written; an
    embedded image as base64 bytes, as JSON carries it)."""
    image_root, shape_pools = pools
    cfg = RunConfig.model_validate({"pool": {"path": "unused.json"}})
    validator = RecordValidator(str(image_root), TaskResolver.for_pool(cfg.pool), Limits(), shape="auto")
    checked = 0
    for name in ("llava_json", "messages_jsonl"):
        pool = shape_pools[name]
        text = pool.path.read_text()
        records = json.loads(text) if name.endswith("json") else [json.loads(line) for line in text.splitlines()]
        for index, (record, want) in enumerate(zip(records, pool.expected)):
            if want.reason:
                err = refuse(parser, record)
                assert err.reason == want.reason and str(err).startswith(want.message.split(":")[0]), (name, index)
                continue
            sample, images = parser.validate(record, index)
            row, _ = validator.validate(RawRecord(index, json.dumps(record), record), index, "pool")
            assert (sample.task, len(images)) == (row["task"], row["n_images"]) == (want.task, want.n_images)
            assert sample.conversations == json.loads(row["conversations"])
            checked += 1
    # an HF parquet row with its image struct, the bytes sent as base64
    row = {"id": "o0", "image": {"bytes": b64(png(10)), "path": "ov/0.png"}, "data_source": "ov_chart",
           "conversations": [{"from": "human", "value": "<image>\nRead the chart."}, {"from": "gpt", "value": "Up."}]}
    sample, images = parser.validate(row, 0)
    assert (sample.task, sample.image_refs, len(images)) == ("ov_chart", ["base64"], 1)
    assert checked == 8
