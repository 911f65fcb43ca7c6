"""Task recipes: image-prefix rules, LLaVA-665k index blocks and LLaVA-1.5 response-format prompt rules."""

from __future__ import annotations

import json

import pytest

from datasel_ray.config import PoolConfig, RunConfig
from datasel_ray.io import tasks
from datasel_ray.io.pool import BlockSpec, PoolFile
from datasel_ray.io.tasks import (LLAVA_665K_BLOCKS, LLAVA_665K_ROWS, TaskResolver, llava_665k_block_task,
                                  llava_665k_mismatch, llava_source_task, strip_dot_prefix)

SHORT = "Answer the question using a single word or phrase."


def _row(image, *questions):
    conv = []
    for i, q in enumerate(questions):
        conv += [{"from": "human", "value": ("<image>\n" if i == 0 and image else "") + q},
                 {"from": "gpt", "value": "answer"}]
    rec = {"id": "x", "conversations": conv}
    if image:
        rec["image"] = image
    return rec


# One hand-made row per source of LLaVA-1.5's mix, with the task each recipe gives it.
SOURCE_ROWS = [
    # (source, row, llava_665k rules task, prefix task)
    ("conversation", _row("coco/train2017/000000033471.jpg", "What are the colors of the bus in the image?",
                          "What feature can be seen on the back of the bus?"), "llava_instruct", "coco"),
    ("detail", _row("coco/train2017/000000052846.jpg", "What do you see happening in this image?"),
     "llava_instruct", "coco"),
    ("complex_reasoning", _row("coco/train2017/000000215677.jpg", "What challenges might these skiers face?"),
     "llava_instruct", "coco"),
    ("vqav2", _row("coco/train2017/000000458752.jpg", f"What is this photo taken looking through?\n{SHORT}",
                   f"What position is this man playing?\n{SHORT}"), "vqav2_okvqa", "coco"),
    ("okvqa", _row("coco/train2017/000000051606.jpg", f"What sport can you use this for?\n{SHORT}"),
     "vqav2_okvqa", "coco"),
    ("aokvqa", _row("coco/train2017/000000299207.jpg", "What is the man by the bags awaiting?\nA. skateboarder\n"
                    "B. train\nC. delivery\nD. cab\nAnswer with the option's letter from the given choices directly."),
     "aokvqa", "coco"),
    ("refcoco_box", _row("coco/train2017/000000580957.jpg", "Please provide the bounding box coordinate of the "
                         "region this sentence describes: man in red."), "refcoco", "coco"),
    ("refcoco_region", _row("coco/train2017/000000580957.jpg", "Please provide a short description for this "
                            "region: [0.37, 0.56, 0.57, 0.92]."), "refcoco", "coco"),
    ("vg", _row("vg/VG_100K/2356347.jpg", "Please provide a short description for this region: "
                "[0.25, 0.49, 0.36, 0.7]."), "vg", "vg"),
    ("gqa", _row("gqa/images/2354786.jpg", f"Is the sky dark?\n{SHORT}"), "gqa", "gqa"),
    ("ocr_vqa", _row("ocr_vqa/images/689852649.jpg", f"Who wrote this book?\n{SHORT}"), "ocr_vqa", "ocr_vqa"),
    ("textcaps", _row("textvqa/train_images/011e7e629fb9ae7b.jpg",
                      "Provide a one-sentence caption for the provided image."), "textcaps", "textvqa"),
    ("sharegpt", _row(None, "Write a haiku about autumn."), "sharegpt", "sharegpt"),
]


@pytest.mark.parametrize("source,row,expected,_", SOURCE_ROWS, ids=[r[0] for r in SOURCE_ROWS])
def test_llava_665k_rules_separate_the_sources_they_can(source, row, expected, _):
    resolver = TaskResolver(recipe="llava_665k")
    assert resolver.resolve(row, row.get("image")) == expected
    assert llava_source_task(row.get("image"), row["conversations"]) == expected


@pytest.mark.parametrize("source,row,_,expected", SOURCE_ROWS, ids=[r[0] for r in SOURCE_ROWS])
def test_prefix_recipe_is_unchanged(source, row, _, expected):
    assert TaskResolver().resolve(row, row.get("image")) == expected


def test_textvqa_image_without_the_caption_prompt_is_textvqa():
    row = _row("textvqa/train_images/011e7e629fb9ae7b.jpg", f"What brand is this?\n{SHORT}")
    assert TaskResolver(recipe="llava_665k").resolve(row, row["image"]) == "textvqa"


def test_explicit_field_then_user_map_win_over_the_recipe_rules():
    row = _row("coco/train2017/1.jpg", f"What is it?\n{SHORT}")
    resolver = TaskResolver({"coco/train2017/": "my_coco", "<text-only>": "chat"}, recipe="llava_665k")
    assert resolver.resolve(row, row["image"]) == "my_coco"
    assert resolver.resolve({**row, "task": " given "}, row["image"]) == "given"
    assert resolver.resolve(_row(None, "hi"), None) == "chat"


def test_other_image_folders_get_the_default_task():
    row = _row("sam/images/sa_1.jpg", f"What is it?\n{SHORT}")
    assert TaskResolver(recipe="llava_665k").resolve(row, row["image"]) == "other"
    assert TaskResolver(recipe="llava_665k", default_task=None).resolve(row, row["image"]) is None


def test_dot_slash_is_stripped_as_a_prefix_not_as_characters():
    assert strip_dot_prefix("././gqa/images/1.jpg") == "gqa/images/1.jpg"
    assert strip_dot_prefix("../gqa/images/1.jpg") == "../gqa/images/1.jpg"
    assert strip_dot_prefix(".vg/1.jpg") == ".vg/1.jpg"
    resolver = TaskResolver()
    assert resolver.resolve({}, "./gqa/images/1.jpg") == "gqa"
    assert resolver.resolve({}, "../gqa/images/1.jpg") == "other"  # lstrip("./") made this "gqa"
    assert resolver.resolve({}, "./.vg/1.jpg") == "other"


def test_unknown_recipe_names_the_field_and_the_choices():
    with pytest.raises(ValueError, match=r"Unknown pool.task_recipe 'llava'. Choose from: prefix, llava_665k"):
        TaskResolver(recipe="llava")
    with pytest.raises(ValueError, match="task_recipe"):
        PoolConfig(task_recipe="llava")


def test_block_task_follows_datatailors_index_ranges():
    starts = [0, 57669, 80909, 157712, 240495, 249493, 315653, 364100, 450517, 522657, 602657, 624610]
    names = ["llava_conversation", "llava_detail", "llava_complex_reasoning", "vqav2", "okvqa", "aokvqa",
             "refcoco", "vg", "gqa", "ocr_vqa", "textcaps", "sharegpt"]
    assert [b[0] for b in LLAVA_665K_BLOCKS] == starts and [b[1] for b in LLAVA_665K_BLOCKS] == names
    ends = starts[1:] + [665298]
    for start, end, name in zip(starts, ends, names):
        assert llava_665k_block_task(start) == name
        assert llava_665k_block_task(end - 1) == name
    with pytest.raises(ValueError, match=r"record_index must be in \[0, 665298\)"):
        llava_665k_block_task(665298)
    resolver = TaskResolver(recipe="llava_665k", index_blocks=True)
    assert resolver.resolve(_row("coco/x.jpg", f"q\n{SHORT}"), "coco/x.jpg", 240494) == "vqav2"
    assert resolver.resolve(_row("coco/x.jpg", f"q\n{SHORT}"), "coco/x.jpg", 240495) == "okvqa"
    with pytest.raises(ValueError, match="index_blocks needs pool.task_recipe='llava_665k'"):
        TaskResolver(index_blocks=True)


def _boundary_pool(tmp_path, patch=None):
    """A JSON file holding only the 24 block-boundary rows, planned as if it were the 665,298-row file."""
    ends = [b[0] for b in LLAVA_665K_BLOCKS[1:]] + [LLAVA_665K_ROWS]
    wanted = {}
    for (start, name, source), end in zip(LLAVA_665K_BLOCKS, ends):
        for i in (start, end - 1):
            image = None if source is None else f"{source}img{i}.jpg"
            wanted[i] = {**_row(image, "q"), "id": "000000033471" if i == 0 else f"id{i}"}
    if patch:
        patch(wanted)
    path = tmp_path / "llava_v1_5_mix665k.json"
    texts = [json.dumps(wanted[i]) for i in sorted(wanted)]
    data = "[" + ",".join(texts) + "]"
    path.write_text(data)
    blocks, pos, at = [], 1, 0
    for i, text in zip(sorted(wanted), texts):
        if i > at:
            blocks.append(BlockSpec(0, str(path), "json", at, i - at, 0, 0))  # filler: never read
        blocks.append(BlockSpec(0, str(path), "json", i, 1, pos, pos + len(text)))
        pos += len(text) + 1
        at = i + 1
    return [PoolFile(0, str(path), "json")], blocks


def test_the_release_file_is_recognised_by_rows_first_id_and_boundary_rows(tmp_path):
    files, blocks = _boundary_pool(tmp_path)
    assert sum(b.num_records for b in blocks) == LLAVA_665K_ROWS
    assert llava_665k_mismatch(files, blocks) is None


@pytest.mark.parametrize("patch,why", [
    (lambda w: w[0].update(id="123"), "record 0 has id '123', not '000000033471'"),
    (lambda w: w[240495].update(image="gqa/1.jpg"), "record 240495 has image 'gqa/1.jpg', expected coco/..."),
    (lambda w: w[665297].update(image="coco/1.jpg"), "record 665297 has image 'coco/1.jpg', expected none"),
    (lambda w: w[450516].pop("id"), "record 450516 has no id"),
])
def test_a_reordered_or_edited_file_is_not_taken_for_the_release(tmp_path, patch, why):
    files, blocks = _boundary_pool(tmp_path, patch)
    assert llava_665k_mismatch(files, blocks) == why


def test_other_pool_shapes_are_not_the_release(tmp_path):
    files, blocks = _boundary_pool(tmp_path)
    assert llava_665k_mismatch(files, blocks[:-1]) == "the pool has 665,297 rows, not 665,298"
    assert llava_665k_mismatch(files + [PoolFile(1, "b.jsonl", "jsonl")], blocks) == \
        "the pool is 2 file(s) (json, jsonl), not one JSON file"


def test_ingest_with_the_llava_665k_recipe_labels_every_source(tmp_path):
    from datasel_ray.io.rundir import RunDir
    from datasel_ray.pipeline.feature_store import load_table
    from datasel_ray.pipeline.ingest import run_ingest

    records = [dict(row, id=f"r{i}") for i, (_, row, _, _) in enumerate(SOURCE_ROWS)]
    for rec in records:
        if "image" in rec:
            (tmp_path / rec["image"]).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rec["image"]).write_bytes(b"")
    (tmp_path / "pool.json").write_text(json.dumps(records))
    cfg = RunConfig.model_validate({"run_dir": str(tmp_path / "run"), "pool": {
        "path": str(tmp_path / "pool.json"), "task_recipe": "llava_665k", "check_images": False,
        "records_per_block": 5, "executor": "local"}})
    rd = RunDir(cfg.run_dir)
    rd.init(cfg)
    counts = run_ingest(cfg, rd, quiet=True)
    assert counts["tasks"] == {"recipe": "llava_665k", "from": "rules",
                               "why": f"the pool has {len(records)} rows, not 665,298"}
    samples = load_table(rd, "samples").sort_by("source_index")
    assert samples.column("task").to_pylist() == [expected for _, _, expected, _ in SOURCE_ROWS]


def test_ingest_stage_uses_the_index_blocks(tmp_path):
    from datasel_ray.pipeline.feature_store import load_table
    from datasel_ray.io.rundir import RunDir
    from datasel_ray.pipeline.ingest import IngestBlockStage

    rows = [_row("coco/train2017/1.jpg", f"q\n{SHORT}") for _ in range(3)]
    (tmp_path / "coco" / "train2017").mkdir(parents=True)
    (tmp_path / "coco" / "train2017" / "1.jpg").write_bytes(b"")
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(rows))
    spec = BlockSpec(0, str(path), "json", 240494, 3, 1, len(path.read_text()) - 1)
    stage = IngestBlockStage({"path": str(path), "task_recipe": "llava_665k", "check_images": False},
                             str(tmp_path), str(tmp_path / "run"), index_blocks=True)
    assert stage.process(spec) == (3, 0)
    tasks_of = load_table(RunDir(str(tmp_path / "run")), "samples").column("task").to_pylist()
    assert tasks_of == ["vqav2", "okvqa", "okvqa"]


def test_module_exports_the_recipes_the_config_accepts():
    assert tasks.TASK_RECIPES == tuple(PoolConfig.model_fields["task_recipe"].annotation.__args__)


def test_task_source_picks_the_index_blocks_only_for_the_release_under_its_recipe(tmp_path):
    from datasel_ray.pipeline.ingest import task_source

    files, blocks = _boundary_pool(tmp_path)
    assert task_source(PoolConfig(task_recipe="llava_665k"), files, blocks) == {"recipe": "llava_665k",
                                                                               "from": "index_blocks"}
    assert task_source(PoolConfig(), files, blocks) == {"recipe": "prefix", "from": "rules"}


def test_cli_task_recipe_choices_are_the_config_choices():
    from datasel_ray.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["ingest", "--run-dir", "r", "--pool", "p.json", "--task-recipe", "llava_665k"])
    assert args.task_recipe == "llava_665k"
    with pytest.raises(SystemExit):
        parser.parse_args(["ingest", "--run-dir", "r", "--task-recipe", "llava"])


def test_the_rules_reach_every_task_they_declare():
    rows = [row for _, row, _, _ in SOURCE_ROWS] + [_row("textvqa/train_images/1.jpg", f"What brand?\n{SHORT}")]
    reached = {llava_source_task(r.get("image"), r["conversations"]) for r in rows}
    assert reached == set(tasks.LLAVA_SOURCE_TASKS) | {"sharegpt"}


def test_user_map_wins_over_the_index_blocks():
    resolver = TaskResolver({"coco/": "mine", "<text-only>": "chat"}, recipe="llava_665k", index_blocks=True)
    assert resolver.resolve(_row("coco/x.jpg", "q"), "coco/x.jpg", 240494) == "mine"
    assert resolver.resolve(_row("vg/x.jpg", "q"), "vg/x.jpg", 400000) == "vg"
    assert resolver.resolve(_row("vg/x.jpg", "q"), "vg/x.jpg", 240494) == "vqav2"
    assert resolver.resolve(_row(None, "q"), None, 650000) == "chat"
    assert TaskResolver(recipe="llava_665k", index_blocks=True).resolve(_row(None, "q"), None, 0) == \
        "llava_conversation"
