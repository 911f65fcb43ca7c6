"""Pool shapes: every shape of datasel_ray/io/shapes.py ingested in this process (no Ray) into the one internal
row, with the new quarantine reasons, the task-label rule, load_row_images and the subset in the input's shape."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from shape_pools import make_shape_pools, png, samples_by_index

from datasel_ray import schema
from datasel_ray.config import RunConfig
from datasel_ray.io.images import ImageError, load_row_images
from datasel_ray.io.rundir import RunDir
from datasel_ray.io.shapes import detect_shape, normalize_record
from datasel_ray.pipeline.ingest import run_ingest
from datasel_ray.roles import IMAGE_PLACEHOLDER, count_placeholders
from datasel_ray.schema import FieldError, Reason, TaskFrom


@pytest.fixture(scope="module")
def shape_pools(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return make_shape_pools(root)


def _run(tmp_path, pool_path, image_root, **pool):
    cfg = RunConfig.model_validate({"run_dir": str(tmp_path / "run"), "pool": {
        "path": str(pool_path), "image_root": str(image_root), "records_per_block": 3, "executor": "local", **pool}})
    rd = RunDir(cfg.run_dir)
    rd.init(cfg)
    return cfg, rd, run_ingest(cfg, rd, quiet=True)


@pytest.mark.parametrize("name", ["llava_json", "ov_parquet", "cauldron_parquet", "messages_jsonl"])
def test_every_shape_ingests_to_the_internal_row(tmp_path, shape_pools, name):
    image_root, pools = shape_pools
    pool = pools[name]
    _, rd, counts = _run(tmp_path, pool.path, image_root)
    assert counts["shape"] == {"shape": pool.shape, "from": "detected"}
    assert counts["rows_in"] == len(pool.expected) == counts["samples"] + counts["quarantined"]
    samples, quarantined = samples_by_index(rd)
    for index, want in enumerate(pool.expected):
        if want.reason:
            assert index not in samples, (name, index)
            bad = quarantined[index]
            assert bad[schema.REASON] == want.reason, (name, index, bad[schema.MESSAGE])
            assert bad[schema.MESSAGE].startswith(want.message), (name, index, bad[schema.MESSAGE])
            continue
        row = samples[index]
        assert (row[schema.TASK], row[schema.TASK_FROM]) == (want.task, want.task_from), (name, index)
        assert row[schema.N_IMAGES] == len(row[schema.IMAGES]) == want.n_images, (name, index)
        assert [im["data"] is not None for im in row[schema.IMAGES]] == want.embedded, (name, index)
        conversations = json.loads(row[schema.CONVERSATIONS])
        assert count_placeholders(conversations) == want.n_images
        first_human = next(t["value"] for t in conversations if t["from"] == "human")
        assert first_human == want.first_human, (name, index)
        assert {t["from"] for t in conversations} <= {"human", "gpt", "system"}
        images = load_row_images(row)
        assert len(images) == want.n_images and all(im.mode == "RGB" for im in images)
    by_reason = {}
    for want in pool.expected:
        if want.reason:
            by_reason[want.reason] = by_reason.get(want.reason, 0) + 1
    assert counts["by_reason"] == dict(sorted(by_reason.items()))
    decided = {}
    for want in pool.expected:
        if not want.reason:
            decided[want.task_from] = decided.get(want.task_from, 0) + 1
    assert counts["tasks_decided_by"] == dict(sorted(decided.items()))


def test_images_keep_their_reference_and_bytes_in_placeholder_order(tmp_path, shape_pools):
    image_root, pools = shape_pools
    _, rd, _ = _run(tmp_path / "m", pools["messages_jsonl"].path, image_root)
    samples, _ = samples_by_index(rd)
    parts_row = samples[2]  # typed parts carrying their own images: coco/b.png then coco/a.png
    assert [im["ref"] for im in parts_row[schema.IMAGES]] == ["coco/b.png", "coco/a.png"]
    assert [im["uri"] for im in parts_row[schema.IMAGES]] == [str(image_root / "coco/b.png"),
                                                               str(image_root / "coco/a.png")]
    assert parts_row[schema.IMAGE] == "coco/b.png" and parts_row[schema.IMAGE_PATH] == str(image_root / "coco/b.png")
    loaded = load_row_images(parts_row)
    expected = [Image.open(io.BytesIO(png(1))).convert("RGB"), Image.open(io.BytesIO(png(0))).convert("RGB")]
    for got, want in zip(loaded, expected):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    _, rd, _ = _run(tmp_path / "c", pools["cauldron_parquet"].path, image_root)
    samples, _ = samples_by_index(rd)
    row = samples[0]
    assert [im["data"] for im in row[schema.IMAGES]] == [png(20), png(21)]
    assert [im["uri"] for im in row[schema.IMAGES]] == ["", ""] and row[schema.IMAGE_PATH] == ""
    resized = load_row_images(row, image_size=8)
    assert [im.size for im in resized] == [(8, 8), (8, 8)]
    np.testing.assert_array_equal(np.asarray(load_row_images(row)[1]),
                                  np.asarray(Image.open(io.BytesIO(png(21))).convert("RGB")))
    # the raw text of an embedded-bytes row names the bytes, it does not hold them
    raw = json.loads(row[schema.RAW])
    assert raw["images"][0]["bytes"] == f"<{len(png(20))} bytes>"


def test_load_row_images_reads_the_old_single_image_column_and_text_only_rows(tmp_path):
    (tmp_path / "a.png").write_bytes(png(5))
    assert len(load_row_images({schema.IMAGE_PATH: str(tmp_path / "a.png")})) == 1
    assert load_row_images({schema.IMAGE_PATH: ""}) == []
    assert load_row_images({schema.IMAGES: [], schema.IMAGE_PATH: ""}) == []
    with pytest.raises(ImageError) as info:
        load_row_images({schema.IMAGES: [{"ref": "x.png", "uri": "", "data": b"nope"}]})
    assert info.value.reason == Reason.IMAGE_CORRUPT


def test_configured_shape_overrides_detection(tmp_path, shape_pools):
    image_root, pools = shape_pools
    _, rd, counts = _run(tmp_path, pools["llava_json"].path, image_root, schema="messages")
    assert counts["shape"] == {"shape": "messages", "from": "config"}
    assert counts["samples"] == 0
    # the video row is refused for its video before its (missing) messages
    assert counts["by_reason"] == {Reason.MISSING_FIELD: 6, Reason.UNSUPPORTED_VIDEO: 1}
    _, quarantined = samples_by_index(rd)
    assert quarantined[0][schema.MESSAGE] == "messages: required field is missing"


def test_source_fields_are_configurable(tmp_path, shape_pools):
    image_root, pools = shape_pools
    _, rd, _ = _run(tmp_path, pools["llava_json"].path, image_root, source_fields=[])
    samples, _ = samples_by_index(rd)
    assert (samples[3][schema.TASK], samples[3][schema.TASK_FROM]) == ("gqa", TaskFrom.RULE)
    # the explicit task field still comes first
    _, rd, _ = _run(tmp_path / "t", pools["ov_parquet"].path, image_root, task_field="data_source")
    samples, _ = samples_by_index(rd)
    assert (samples[0][schema.TASK], samples[0][schema.TASK_FROM]) == ("ov_chart", TaskFrom.FIELD)


def test_subset_is_written_in_the_input_shape(tmp_path, shape_pools):
    from datasel_ray.pipeline.select import write_subset

    image_root, pools = shape_pools
    pool = pools["ov_parquet"]
    _, rd, _ = _run(tmp_path / "ov", pool.path, image_root)
    ids = np.array(sorted(r[schema.ROW_ID] for r in samples_by_index(rd)[0].values()), dtype=np.int64)
    keep = ids[[0, 2, 3]]  # source rows 0, 3, 4 (row 2 is quarantined)
    (written,) = write_subset(rd, rd / "subset", keep)
    original = pq.read_table(pool.path)
    subset = pq.read_table(written)
    assert subset.schema == original.schema
    assert subset.to_pylist() == original.take([0, 3, 4]).to_pylist()  # embedded bytes included
    assert subset.column("image").to_pylist()[0]["bytes"] == png(10)

    pool = pools["llava_json"]
    _, rd, _ = _run(tmp_path / "llava", pool.path, image_root)
    ids = np.array(sorted(r[schema.ROW_ID] for r in samples_by_index(rd)[0].values()), dtype=np.int64)
    (written,) = write_subset(rd, rd / "subset", ids)
    source = json.loads(pool.path.read_text())
    text = Path(written).read_text(encoding="utf-8")
    assert json.loads(text) == [source[i] for i in (0, 1, 2, 3)]
    # each record's text as it stands in the pool file (indent and key order kept)
    for i in (0, 1, 2, 3):
        assert json.dumps(source[i], indent=1).replace("\n", "\n ") in text


def test_parquet_blocks_read_only_their_row_groups(tmp_path, shape_pools, monkeypatch):
    from datasel_ray.io import pool as pool_module
    from datasel_ray.io.pool import list_pool_files, plan_blocks, read_block

    _, pools = shape_pools
    path = pools["cauldron_parquet"].path
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    read_groups = []
    original = pq.ParquetFile.read_row_groups

    def spy(self, groups, *args, **kwargs):
        read_groups.append(list(groups))
        return original(self, groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    blocks = plan_blocks(list_pool_files(str(path)), records_per_block=2)
    assert [(b.first_record, b.num_records) for b in blocks] == [(0, 2), (2, 2), (4, 1)]
    records = [r for b in blocks for r in read_block(b)]
    assert read_groups == [[0], [1], [2]]
    assert [r.record_index for r in records] == [0, 1, 2, 3, 4]
    assert pool_module.detect_format(path.name) == "parquet"


# ---------------------------------------------------------------------------------------------- normalise
def test_detect_shape_from_the_first_records():
    assert detect_shape([{"conversations": []}]) == "llava"
    assert detect_shape([None, {"texts": []}]) == "texts"
    assert detect_shape([{"id": 1, "messages": []}]) == "messages"
    assert detect_shape([{"conversation": []}]) == "messages"  # Mantis-Instruct
    assert detect_shape([{"id": 1}]) == "llava"


@pytest.mark.parametrize("value,shape,field,reason", [
    ({"image": 3, "conversations": [{"from": "human", "value": "q"}]}, "llava", "image", Reason.WRONG_TYPE),
    ({"image": [{"path": None, "bytes": None}], "conversations": []}, "llava", "image[0]", Reason.MISSING_FIELD),
    ({"image": {"bytes": "abc"}, "conversations": []}, "llava", "image.bytes", Reason.WRONG_TYPE),
    ({"image": "a.png", "images": ["b.png"], "conversations": []}, "llava", "images", Reason.WRONG_TYPE),
    ({"images": "a.png", "conversations": []}, "llava", "images", Reason.WRONG_TYPE),
    ({"conversations": [{"from": "human", "value": 4}]}, "llava", "conversations[0].value", Reason.WRONG_TYPE),
    ({"texts": [{"user": "q"}]}, "texts", "texts[0].assistant", Reason.MISSING_FIELD),
    ({"messages": "hi"}, "messages", "messages", Reason.WRONG_TYPE),
    ({"messages": [{"content": "hi"}]}, "messages", "messages[0].role", Reason.MISSING_FIELD),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages", "messages[0].content[0]",
     Reason.WRONG_TYPE),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "image"}]}]},
     "messages", "messages", Reason.WRONG_TYPE),
    ({"videos": ["v.mp4"], "messages": []}, "messages", "videos", Reason.UNSUPPORTED_VIDEO),
    ({"id": [1], "messages": []}, "messages", "id", Reason.WRONG_TYPE),
])
def test_normalize_errors_name_the_field(value, shape, field, reason):
    with pytest.raises(FieldError) as info:
        normalize_record(value, shape)
    err = info.value
    assert (err.field, err.reason) == (field, reason)
    assert str(err) == f"{field}: {err.detail}"


def test_typed_parts_become_placeholders_in_order():
    record = normalize_record({"messages": [
        {"role": "User", "content": [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"},
                                     {"type": "image"}]},
        {"role": "assistant", "content": "c"}], "images": ["x.png", {"bytes": b"raw", "path": "y.png"}]}, "messages")
    assert [t.value for t in record.turns] == [f"a\n{IMAGE_PLACEHOLDER}\nb\n{IMAGE_PLACEHOLDER}", "c"]
    assert [t.role for t in record.turns] == ["user", "assistant"]
    assert [(im.ref, im.data, im.where) for im in record.images] == [("x.png", None, "images[0]"),
                                                                       ("y.png", b"raw", "images[1]")]


def test_roles_module_is_the_one_definition():
    from datasel_ray import roles, synthetic
    from datasel_ray.io import tasks, validation
    from datasel_ray.scoring import request  # noqa: F401  (imports the validator's definitions)

    assert synthetic.IMAGE_TOKEN is roles.IMAGE_PLACEHOLDER
    assert validation.IMAGE_PLACEHOLDER is roles.IMAGE_PLACEHOLDER
    assert tasks.HUMAN_ROLES is roles.HUMAN_ROLES
    assert [roles.canonical_role(r) for r in ("USER", "human", "Assistant", "gpt", "system", "robot")] == [
        "human", "human", "gpt", "gpt", "system", None]
    assert [roles.chat_role(r) for r in ("human", "gpt", "system")] == ["user", "assistant", "system"]
    two = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    assert roles.normalize_placeholders(two, 2)[0]["value"] == "<image>\n<image>\nq"
    assert roles.normalize_placeholders([{"from": "human", "value": "<image> q"}, two[1]], 0)[0]["value"] == "q"
    # one image written in a later turn moves to the first human turn (LLaVA's rule, as before)
    later = [two[0], {"from": "gpt", "value": "a"}, {"from": "human", "value": "<image>\nmore"}, two[1]]
    assert [t["value"] for t in roles.normalize_placeholders(later, 1)] == ["<image>\nq", "a", "more", "a"]


def test_run_ingest_records_the_shape_and_keeps_video_rows_out_of_the_failure_budget(tmp_path, ray_local):
    """The Ray path: a chat pool with 4 video rows in 10 ingests under a 10% failure budget (video rows are kept
    out by design, not failures); the manifest result says the shape and how the tasks were decided."""
    from datasel_ray.pipeline.ingest import run_ingest

    rows = []
    for i in range(10):
        row = {"id": f"v{i}", "source": "clips" if i < 4 else "chat",
               "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        if i < 4:
            row["video"] = f"clip{i}.mp4"
        rows.append(row)
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RunConfig.model_validate({"run_dir": str(tmp_path / "run"), "pool": {"path": str(path),
                                    "records_per_block": 3},
                                    "failures": {"min_rows": 1, "max_quarantine_fraction": 0.1}})
    rd = RunDir(cfg.run_dir)
    rd.init(cfg)
    counts = run_ingest(cfg, rd, quiet=True)
    assert (counts["samples"], counts["by_reason"]) == (6, {Reason.UNSUPPORTED_VIDEO: 4})
    assert counts["shape"] == {"shape": "messages", "from": "detected"}
    assert counts["tasks_decided_by"] == {TaskFrom.SOURCE_LABEL: 6}
    samples, quarantined = samples_by_index(rd)
    assert {r[schema.TASK] for r in samples.values()} == {"chat"}
    assert quarantined[0][schema.MESSAGE] == "video: video samples are not scored yet (images only)"


def test_object_storage_pools_of_every_kind(tmp_path, shape_pools, s3_bucket):
    """The same pools on S3 (moto): parquet rows with embedded bytes need no image root, JSONL rows read their
    images under an s3:// image root; load_row_images reads both."""
    from datasel_ray.io.storage import Location

    image_root, pools = shape_pools
    for name in ("coco/a.png", "coco/b.png", "gqa/c.png"):
        Location.parse(f"{s3_bucket}/images/{name}").write_bytes((image_root / name).read_bytes())
    for key in ("ov_parquet", "messages_jsonl"):
        pool = pools[key]
        Location.parse(f"{s3_bucket}/pools/{pool.path.name}").write_bytes(pool.path.read_bytes())
        _, rd, counts = _run(tmp_path / key, f"{s3_bucket}/pools/{pool.path.name}", f"{s3_bucket}/images")
        want_bad = sum(1 for e in pool.expected if e.reason)
        assert (counts["samples"], counts["quarantined"]) == (len(pool.expected) - want_bad, want_bad)
        samples, _ = samples_by_index(rd)
        row = samples[0]
        if key == "messages_jsonl":
            assert [im["uri"] for im in row[schema.IMAGES]] == [f"{s3_bucket}/images/coco/a.png",
                                                                 f"{s3_bucket}/images/coco/b.png"]
        images = load_row_images(row)
        assert len(images) == pool.expected[0].n_images
        np.testing.assert_array_equal(np.asarray(images[0]), np.asarray(Image.open(io.BytesIO(
            png(10) if key == "ov_parquet" else png(0))).convert("RGB")))


def test_task_label_precedence():
    """task field > source label > user map > recipe rules > default; an image without a path has no folder."""
    from datasel_ray.io.tasks import TaskResolver

    resolver = TaskResolver({"coco/train/": "mine", "<text-only>": "chat"}, default_task="other")
    assert resolver.resolve_how({"task": "t"}, "coco/train/a.png", source_label="s") == ("t", TaskFrom.FIELD)
    assert resolver.resolve_how({}, "coco/train/a.png", source_label="s") == ("s", TaskFrom.SOURCE_LABEL)
    assert resolver.resolve_how({}, "coco/train/a.png") == ("mine", TaskFrom.MAP)
    assert resolver.resolve_how({}, "coco/val/a.png") == ("coco", TaskFrom.RULE)
    assert resolver.resolve_how({}, "elsewhere/a.png") == ("other", TaskFrom.DEFAULT)
    assert resolver.resolve_how({}, None) == ("chat", TaskFrom.MAP)
    assert resolver.resolve_how({}, "", has_image=True) == ("other", TaskFrom.DEFAULT)
    assert resolver.resolve({}, "coco/val/a.png") == "coco"  # the old entry point, same answer


def test_a_folder_of_pools_in_different_shapes(tmp_path, shape_pools):
    """Each pool file's shape is detected from its own first records; the result lists them when they differ."""
    import shutil

    image_root, pools = shape_pools
    folder = tmp_path / "pools"
    folder.mkdir()
    for key in ("llava_json", "cauldron_parquet", "messages_jsonl"):
        shutil.copy(pools[key].path, folder / pools[key].path.name)
    _, rd, counts = _run(tmp_path, folder, image_root)
    assert counts["shape"] == {"shape": "texts", "from": "detected", "files": {
        str(folder / "cauldron.parquet"): "texts", str(folder / "llava.json"): "llava",
        str(folder / "messages.jsonl"): "messages"}}
    expected = [e for key in ("cauldron_parquet", "llava_json", "messages_jsonl") for e in pools[key].expected]
    assert counts["samples"] == sum(1 for e in expected if not e.reason)
    assert counts["quarantined"] == sum(1 for e in expected if e.reason)


@pytest.mark.parametrize("name", ["llava_json", "ov_parquet", "messages_jsonl"])
def test_ingest_stores_each_rows_exact_digest_and_dedup_reads_no_image(tmp_path, name):
    """Ingest read every image to decode it: it stores the row's exact-duplicate digest, which is the one the
    dedup phase would compute from the images; the exact pass then reads no image (they are gone) and gets the
    same digests. Without the decode check (``check_images: false``) nothing is stored."""
    import shutil

    from datasel_ray.dedup.exact import normalise_text, row_digest
    from datasel_ray.io.images import row_image_bytes
    from datasel_ray.pipeline.dedup import DigestTask, _digests

    image_root, pools = make_shape_pools(tmp_path / "shapes")
    _, rd, _ = _run(tmp_path, pools[name].path, image_root)
    files = tuple(str(f) for f in (rd / "samples").list(".parquet"))
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    assert rows and all(r[schema.CONTENT_DIGEST] is not None for r in rows)
    for r in rows:
        assert r[schema.CONTENT_DIGEST] == row_digest(row_image_bytes(r), normalise_text(
            json.loads(r[schema.CONVERSATIONS]))), r[schema.SOURCE_INDEX]
    shutil.rmtree(image_root)
    got = _digests(DigestTask(files, io_threads=2))
    stored = {r[schema.ROW_ID]: r[schema.CONTENT_DIGEST] for r in rows}
    assert dict(zip(got[schema.ROW_ID].tolist(), got["digest"].tolist())) == stored

    image_root, pools = make_shape_pools(tmp_path / "shapes-again")
    _, rd, _ = _run(tmp_path / "unchecked", pools[name].path, image_root, check_images=False)
    unchecked = [r for f in (rd / "samples").list(".parquet") for r in pq.read_table(str(f)).to_pylist()]
    for r in unchecked:  # embedded bytes are known without a read; a path image was only looked up
        read = all(im["data"] is not None for im in r[schema.IMAGES])
        want = row_digest(row_image_bytes(r), normalise_text(json.loads(r[schema.CONVERSATIONS]))) if read else None
        assert r[schema.CONTENT_DIGEST] == want, r[schema.SOURCE_INDEX]
