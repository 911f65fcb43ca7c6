"""Tests for the synthetic pool generator: determinism, task coverage, injections, bad rows, formats.

Answers are checked against an independent pixel oracle (connected components of palette colours), so a
clean row's answer must be recoverable from its image and a noisy row's answer must not match it.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datasel_ray.schema import Reason
from datasel_ray.synthetic import (
    BACKGROUNDS, BAD_KINDS, COLOURS, GRID, IMAGE_TASKS, OCR_ADJECTIVES, OCR_NOUNS, POSITIONS, SHAPES, SIZES,
    TASK_FOLDERS, TASKS, TEXT_TASK, SynthConfig, generate_pool, load_ground_truth, plan_rows, read_pool,
    stripe_colour,
)

N = 200


@pytest.fixture(scope="module")
def pools(tmp_path_factory) -> dict:
    """One pool per format, N rows, seed 0: {format: (info, records, ground_truth)}."""
    out = {}
    for fmt in ("json", "jsonl", "parquet"):
        info = generate_pool(tmp_path_factory.mktemp(fmt), SynthConfig(num_samples=N, seed=0, format=fmt))
        out[fmt] = (info, read_pool(info.pool_path), load_ground_truth(info.ground_truth_path))
    return out


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _answers(record: dict) -> list[str]:
    return [turn["value"] for turn in record["conversations"] if turn["from"] == "gpt"]


def _questions(record: dict) -> list[str]:
    return [turn["value"] for turn in record["conversations"] if turn["from"] == "human"]


# --------------------------------------------------------------------------- pixel oracle


def _blobs(image: Image.Image) -> list[dict]:
    """Every palette-coloured connected component: colour, kind, size, centre and grid position."""
    pixels = np.asarray(image.convert("RGB"))
    cell = image.size[0] // GRID
    blobs = []
    for name, rgb in COLOURS.items():
        mask = np.all(pixels == rgb, axis=-1)
        seen = np.zeros_like(mask)
        for y, x in zip(*np.nonzero(mask)):
            if seen[y, x]:
                continue
            stack, cells = [(y, x)], []
            seen[y, x] = True
            while stack:
                cy, cx = stack.pop()
                cells.append((cy, cx))
                for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
            ys, xs = np.array(cells).T
            width, height = np.ptp(xs) + 1, np.ptp(ys) + 1
            fill = len(cells) / (width * height)
            if fill > 0.93:
                kind = "square"
            elif fill > 0.65:
                kind = "circle"
            else:  # a triangle's bottom row spans its box; a diamond's is a point
                kind = "triangle" if np.sum(ys == ys.max()) >= width - 1 else "diamond"
            cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
            row, col = min(GRID - 1, int(cy // cell)), min(GRID - 1, int(cx // cell))
            blobs.append({"colour": name, "kind": kind, "size": "small" if width < 0.64 * cell else "large",
                          "x": cx, "y": cy, "row": row, "col": col, "position": POSITIONS[row][col]})
    return blobs


def _background(image: Image.Image) -> str:
    corner = image.convert("RGB").getpixel((0, 0))
    return next(name for name, rgb in BACKGROUNDS.items() if rgb == corner)


def _striped(image: Image.Image) -> bool:
    pixels = np.asarray(image.convert("RGB"))
    return bool(np.all(pixels == stripe_colour(_background(image)), axis=-1).any())


def _where(position: str) -> str:
    return "in the centre" if position == "centre" else (
        f"on the {position}" if position in ("left", "right") else f"at the {position}")


def _name(blob: dict) -> str:
    return f"{blob['size']} {blob['colour']} {blob['kind']}"


def _words(question: str) -> list[str]:
    return re.findall(r"[a-z-]+", question.lower())


def _asked_position(question: str) -> str:
    return re.search(r"(?:at|on|in) the ([a-z-]+)", question).group(1)


def _matching(blobs: list[dict], question: str, with_position: bool) -> list[dict]:
    """The blobs fitting the size / colour / kind (and, with_position, the grid position) the question names."""
    words = _words(question)
    wanted = {"size": [w for w in words if w in SIZES], "colour": [w for w in words if w in COLOURS],
              "kind": [w.removesuffix("s") for w in words if w.removesuffix("s") in SHAPES]}
    if with_position:
        wanted["position"] = [_asked_position(question)]
    return [b for b in blobs if all(b[key] == values[0] for key, values in wanted.items() if values)]


def _oracle(question: str, image: Image.Image) -> str:
    """The answer to one synthetic image question, computed from pixels only."""
    blobs = _blobs(image)
    if "background" in question:
        return _background(image)
    if question.startswith("How many shapes are in") or question.startswith("How many shapes can"):
        return str(len(blobs))
    if any(word in question for word in ("caption", "Describe", "shown", "description")):
        ordered = sorted(blobs, key=lambda b: (b["row"], b["col"]))
        names = [f"a {_name(b)} {_where(b['position'])}" for b in ordered]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        pattern = "striped " if _striped(image) else ""
        return f"{listed} on a {pattern}{_background(image)} background"
    if question.startswith(("Where is", "In which part", "Which grid cell")):
        (blob,) = _matching(blobs, question.split("?")[0], with_position=False)
        return blob["position"]
    if question.startswith(("What is at", "What is on", "What is in", "Which shape is")):
        (blob,) = [b for b in blobs if b["position"] == _asked_position(question)]
        return f"a {_name(blob)}"
    if "colour" in question:
        (blob,) = _matching(blobs, question, with_position=True)
        return blob["colour"]
    assert "How many" in question or "Count" in question or "number of" in question, question
    return str(len(_matching(blobs, question, with_position=False)))


def _text_oracle(question: str) -> str:
    numbers = [int(n) for n in re.findall(r"\d+", question)]
    word = re.search(r"'(\w+)'", question)
    if "backwards" in question or "Reverse" in question:
        return word.group(1)[::-1]
    if "capital" in question or "upper case" in question:
        return word.group(1).upper()
    if "Subtract" in question:
        return str(numbers[1] - numbers[0])
    if "minus" in question or "-" in question:
        return str(numbers[0] - numbers[1])
    if "times" in question or "Multiply" in question or "*" in question:
        return str(numbers[0] * numbers[1])
    return str(numbers[0] + numbers[1])


def _is_ocr_text(answer: str) -> bool:
    words = answer.split(" ")
    return (len(words) == 1 and words[0] in OCR_NOUNS) or (
        len(words) == 2 and words[0] in OCR_ADJECTIVES and words[1] in OCR_NOUNS)


def _expected_answers(record: dict, task: str, root: Path) -> list[str] | None:
    questions = [q.removeprefix("<image>\n") for q in _questions(record)]
    if task == TEXT_TASK:
        return [_text_oracle(q) for q in questions]
    if task == "ocr":
        return None
    with Image.open(root / record["image"]) as image:
        image.load()
        return [_oracle(q, image) for q in questions]


# --------------------------------------------------------------------------- tests


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    config = SynthConfig(num_samples=120, seed=3, format="jsonl")
    hashes = [_tree_hashes(generate_pool(tmp_path / name, config).image_root) for name in ("a", "b")]
    assert hashes[0] == hashes[1]
    assert len(hashes[0]) > 100
    other = _tree_hashes(generate_pool(tmp_path / "c", SynthConfig(num_samples=120, seed=4, format="jsonl")).image_root)
    assert other["pool.jsonl"] != hashes[0]["pool.jsonl"]


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet"])
def test_ground_truth_matches_pool(pools, fmt):
    info, records, truth = pools[fmt]
    assert info.num_rows == len(records) == len(truth) == N
    assert [t["index"] for t in truth] == list(range(N))
    ids = [t["id"] for t in truth]
    assert len(set(ids)) == N
    assert [r["id"] if isinstance(r, dict) else None for r in records] == [
        i if t["bad_kind"] != Reason.INVALID_JSON else None for i, t in zip(ids, truth)]
    assert info.num_bad == sum(t["bad_kind"] is not None for t in truth)
    assert set(truth[0]) == {"index", "id", "task", "dup_group", "noisy", "bad_kind"}
    for record in records:
        if isinstance(record, dict):
            assert not {"task", "dup_group", "noisy", "bad_kind"} & set(record)


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet"])
def test_every_task_and_bad_kind_present(pools, fmt):
    _, _, truth = pools[fmt]
    tasks = collections.Counter(t["task"] for t in truth if t["bad_kind"] is None)
    assert set(tasks) == set(TASKS)
    assert min(tasks.values()) >= 20
    kinds = collections.Counter(t["bad_kind"] for t in truth if t["bad_kind"])
    expected = set(BAD_KINDS) | ({Reason.INVALID_JSON} if fmt == "jsonl" else set())
    assert set(kinds) == expected
    assert all(kind in Reason.ALL for kind in kinds)
    assert sum(t["noisy"] for t in truth) >= 5
    assert len({t["dup_group"] for t in truth} - {-1}) >= 3


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet"])
def test_good_rows_are_well_formed(pools, fmt):
    info, records, truth = pools[fmt]
    for record, t in zip(records, truth):
        if t["bad_kind"]:
            continue
        conversations = record["conversations"]
        assert [turn["from"] for turn in conversations] == ["human", "gpt"] * (len(conversations) // 2)
        assert all(isinstance(turn["value"], str) and turn["value"].strip() for turn in conversations)
        assert len(conversations) >= (4 if t["task"] == "multi_turn" else 2)
        humans = _questions(record)
        if t["task"] == TEXT_TASK:
            assert "image" not in record
            assert not any("<image>" in q for q in humans)
        else:
            folder = record["image"].split("/")[0]
            assert TASK_FOLDERS[folder] == t["task"]
            assert humans[0].startswith("<image>\n")
            assert not any("<image>" in q for q in humans[1:])
            with Image.open(info.image_root / record["image"]) as image:
                image.load()
                assert image.size == (64, 64)


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet"])
def test_bad_rows_are_bad_in_the_stated_way(pools, fmt):
    info, records, truth = pools[fmt]
    root = info.image_root.resolve()
    for record, t in zip(records, truth):
        kind = t["bad_kind"]
        if kind is None:
            continue
        if kind == Reason.INVALID_JSON:
            assert isinstance(record, str)
            with pytest.raises(json.JSONDecodeError):
                json.loads(record)
            continue
        conversations = record.get("conversations")
        if kind == Reason.IMAGE_MISSING:
            assert not (root / record["image"]).exists()
        elif kind == Reason.IMAGE_CORRUPT:
            assert (root / record["image"]).is_file()
            with pytest.raises(Exception):
                with Image.open(root / record["image"]) as image:
                    image.load()
        elif kind == Reason.IMAGE_PATH_ESCAPE:
            assert not (root / record["image"]).resolve().is_relative_to(root)
        elif kind == Reason.NO_ASSISTANT_TURN:
            assert conversations and all(turn["from"] == "human" for turn in conversations)
        elif kind == Reason.EMPTY_TEXT:
            assert any(turn["value"].strip() == "" for turn in conversations)
        elif kind == Reason.WRONG_TYPE:
            assert (not isinstance(conversations, list)
                    or any(not isinstance(turn["value"], str) for turn in conversations)
                    or not isinstance(record.get("image", ""), str))
        elif kind == Reason.TOO_LONG:
            assert len(conversations) > 2 * 64 or sum(len(turn["value"]) for turn in conversations) > 32768
        elif kind == Reason.MISSING_FIELD:
            assert "conversations" not in record
        else:
            pytest.fail(f"unexpected bad kind {kind}")


def test_clean_answers_are_a_function_of_the_content_and_noisy_ones_are_not(pools):
    info, records, truth = pools["json"]
    checked = collections.Counter()
    for record, t in zip(records, truth):
        if t["bad_kind"] or t["dup_group"] != -1:
            continue
        expected = _expected_answers(record, t["task"], info.image_root)
        if expected is None:
            assert _is_ocr_text(_answers(record)[0]) != t["noisy"]
            continue
        if t["noisy"]:
            assert all(a != e for a, e in zip(_answers(record), expected)), record
        else:
            assert _answers(record) == expected, record
        checked[t["task"]] += 1
    assert set(checked) == set(TASKS) - {"ocr"}


def test_answers_match_the_pixel_oracle_on_a_larger_pool(tmp_path):
    """Every question form, size, kind, stripe pattern and grid cell is exercised a few hundred times."""
    info = generate_pool(tmp_path, SynthConfig(num_samples=700, seed=5, bad_rate=0, noise_rate=0))
    checked = collections.Counter()
    for record, t in zip(read_pool(info.pool_path), load_ground_truth(info.ground_truth_path)):
        if t["dup_group"] != -1:
            continue
        expected = _expected_answers(record, t["task"], info.image_root)
        if expected is None:
            assert _is_ocr_text(_answers(record)[0])
        else:
            assert _answers(record) == expected, record
        checked[t["task"]] += 1
    assert set(checked) == set(TASKS) and min(checked.values()) >= 80


def test_no_two_rows_outside_duplicate_groups_share_conversation_text():
    """Ordinary rows are genuinely distinct, so injected near-duplicates stand out (as in real pools)."""
    rows = plan_rows(SynthConfig(num_samples=2000, seed=1, noise_rate=0))
    keys = collections.Counter(row.sample.text_key() for row in rows if row.bad_kind is None and row.dup_group == -1)
    assert sum(keys.values()) > 1500
    assert max(keys.values()) == 1
    group_keys = {row.sample.text_key() for row in rows if row.dup_group != -1}
    assert not group_keys & set(keys)
    by_group = collections.defaultdict(set)
    for row in rows:
        if row.dup_group != -1:
            by_group[row.dup_group].add(json.dumps([t.answer for t in row.sample.turns]))
    assert by_group and all(len(answers) == 1 for answers in by_group.values())


def test_images_outside_duplicate_groups_are_distinct(pools):
    info, records, truth = pools["json"]
    hashes = collections.Counter(
        hashlib.sha256((info.image_root / r["image"]).read_bytes()).hexdigest()
        for r, t in zip(records, truth) if t["bad_kind"] is None and t["dup_group"] == -1 and "image" in r)
    assert max(hashes.values()) == 1


def test_ocr_vocabulary_is_not_confusable_with_other_answers():
    vocabulary = set(OCR_ADJECTIVES) | set(OCR_NOUNS)
    assert not {w[::-1] for w in vocabulary} & vocabulary
    others = set(COLOURS) | set(BACKGROUNDS) | set(SHAPES) | set(SIZES) | {p for row in POSITIONS for p in row}
    assert not others & vocabulary


def test_ocr_image_contains_ink(pools):
    info, records, truth = pools["json"]
    for record, t in zip(records, truth):
        if t["task"] == "ocr" and t["bad_kind"] is None and t["dup_group"] == -1:
            pixels = np.asarray(Image.open(info.image_root / record["image"]).convert("L"), dtype=int)
            assert pixels.max() - pixels.min() > 60


def test_duplicate_groups_share_answers_and_differ_slightly(pools):
    info, records, truth = pools["json"]
    groups = collections.defaultdict(list)
    for record, t in zip(records, truth):
        if t["dup_group"] != -1:
            assert t["bad_kind"] is None and not t["noisy"] and t["task"] in IMAGE_TASKS
            groups[t["dup_group"]].append((record, t["task"]))
    for members in groups.values():
        assert 3 <= len(members) <= 6
        assert len({task for _, task in members}) == 1
        assert len({json.dumps(_answers(r)) for r, _ in members}) == 1
        assert len({r["image"] for r, _ in members}) == len(members)
        assert len({json.dumps(_questions(r)) for r, _ in members}) >= 2
        images = [np.asarray(Image.open(info.image_root / r["image"]), dtype=float) for r, _ in members]
        for i in range(len(images)):
            for j in range(i + 1, len(images)):
                difference = np.abs(images[i] - images[j]).mean()
                assert 0 < difference < 40


def test_parquet_columns_and_task_field(tmp_path):
    info = generate_pool(tmp_path, SynthConfig(num_samples=40, format="parquet", include_task_field=True, bad_rate=0))
    table = pq.read_table(info.pool_path)
    assert table.column_names == ["id", "image", "conversations", "task"]
    assert all(str(field.type) == "string" for field in table.schema)
    truth = load_ground_truth(info.ground_truth_path)
    assert table.column("task").to_pylist() == [t["task"] for t in truth]
    for row, t in zip(table.to_pylist(), truth):
        assert isinstance(json.loads(row["conversations"]), list)
        assert (row["image"] is None) == (t["task"] == TEXT_TASK)


def test_json_and_jsonl_are_readable_with_stdlib(pools):
    info, _, truth = pools["json"]
    with open(info.pool_path) as handle:
        assert len(json.load(handle)) == len(truth)
    info, _, truth = pools["jsonl"]
    parsed = 0
    for line in info.pool_path.read_text().splitlines():
        try:
            json.loads(line)
            parsed += 1
        except json.JSONDecodeError:
            pass
    assert parsed == sum(t["bad_kind"] != Reason.INVALID_JSON for t in truth)


@pytest.mark.parametrize("num_samples", [0, 1, 9])
def test_tiny_pools_and_no_bad_rows(tmp_path, num_samples):
    info = generate_pool(tmp_path, SynthConfig(num_samples=num_samples, bad_rate=0))
    assert info.num_rows == num_samples and info.num_bad == 0
    assert len(read_pool(info.pool_path)) == num_samples


def test_invalid_config_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="format"):
        generate_pool(tmp_path, SynthConfig(format="csv"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="duplicate_group_size"):
        generate_pool(tmp_path, SynthConfig(duplicate_group_size=(4, 2)))


def test_rerun_into_same_dir_leaves_no_stale_pool_or_missing_image(tmp_path):
    generate_pool(tmp_path, SynthConfig(num_samples=150, seed=1, format="json", bad_rate=0))
    info = generate_pool(tmp_path, SynthConfig(num_samples=150, seed=2, format="jsonl"))
    assert sorted(p.name for p in tmp_path.glob("pool.*")) == ["pool.jsonl"]
    truth = load_ground_truth(info.ground_truth_path)
    records = read_pool(info.pool_path)
    missing = [r for r, t in zip(records, truth) if t["bad_kind"] == Reason.IMAGE_MISSING]
    assert missing and not any((tmp_path / r["image"]).exists() for r in missing)
