"""The easy-VQA pool: LLaVA rows, injected near-duplicate groups and label noise, ground truth that matches them."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from datasel_ray.evaluation import pool_quality, selection_quality
from datasel_ray.pools import easy_vqa
from datasel_ray.synthetic import load_ground_truth

pytest.importorskip("easy_vqa")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    config = easy_vqa.EasyVQAPoolConfig(num_samples=300, seed=5, duplicate_rate=0.1, noise_rate=0.05,
                                        heldout_samples=20)
    return config, easy_vqa.generate_pool(tmp_path_factory.mktemp("easyvqa"), config)


def test_paraphrase_keeps_the_slot_and_cycles():
    assert easy_vqa.paraphrase("what color is the circle?", 1) == "what is the color of the circle?"
    assert easy_vqa.paraphrase("is no red shape present?", 1) == "is there not a red shape?"
    assert easy_vqa.paraphrase("what shape is present?", 1) == "which shape is shown?"
    assert easy_vqa.paraphrase("what is the teal shape?", 4) == "what is the teal shape?"
    with pytest.raises(ValueError, match="no paraphrase family matches"):
        easy_vqa.paraphrase("how many shapes?", 1)


def test_rows_and_ground_truth_match_the_injections(pool):
    config, info = pool
    records = json.loads(info.pool_path.read_text())
    truth = load_ground_truth(info.ground_truth_path)
    assert len(records) == len(truth) == info.num_rows == 300 and info.num_bad == 0
    assert [t["index"] for t in truth] == list(range(300))
    assert [r["id"] for r in records] == [t["id"] for t in truth]

    groups = defaultdict(list)
    for record, t in zip(records, truth):
        assert record["image"].startswith(easy_vqa.TASK_FOLDERS[t["task"]] + "/")
        assert record["conversations"][0]["value"].startswith("<image>\n")
        if t["dup_group"] >= 0:
            groups[t["dup_group"]].append((record, t))
    assert sum(len(g) for g in groups.values()) == 30
    assert all(3 <= len(g) <= 6 for g in groups.values())
    for members in groups.values():
        answers = {r["conversations"][1]["value"] for r, _ in members}
        assert len(answers) == 1 and not any(t["noisy"] for _, t in members)
        assert len({t["image_id"] for _, t in members}) == 1
        assert len({r["conversations"][0]["value"] for r, _ in members}) == min(len(members), 4)
        pixels = [np.asarray(Image.open(info.image_root / r["image"]), dtype=np.int16) for r, _ in members]
        for other in pixels[1:]:
            diff = np.abs(other - pixels[0])
            assert 0 < diff.mean() < 8 and diff.max() <= 40

    noisy = [(r, t) for r, t in zip(records, truth) if t["noisy"]]
    assert len(noisy) == 15
    for record, t in noisy:
        given = record["conversations"][1]["value"]
        assert given != t["answer"] and easy_vqa.question_task(given) == t["task"]
    clean = [(r, t) for r, t in zip(records, truth) if not t["noisy"]]
    assert all(r["conversations"][1]["value"] == t["answer"] for r, t in clean)


def test_evaluation_reads_the_ground_truth(pool):
    _, info = pool
    truth = load_ground_truth(info.ground_truth_path)
    quality = pool_quality(truth)
    groups = Counter(t["dup_group"] for t in truth if t["dup_group"] >= 0)
    assert quality["selected"] == 300
    assert quality["duplicate_rate"] == pytest.approx((30 - len(groups)) / 300)
    assert quality["noise_rate"] == pytest.approx(15 / 300)
    assert quality["task_coverage"] == 1.0
    one_group = [t["index"] for t in truth if t["dup_group"] == 0]
    picked = selection_quality(np.array(one_group, dtype=np.int64), truth, {"color", "shape", "yes_no"})
    assert picked["duplicate_rate"] == pytest.approx((len(one_group) - 1) / len(one_group))


def test_same_seed_same_bytes_and_heldout_is_the_test_split(pool, tmp_path):
    config, info = pool
    again = easy_vqa.generate_pool(tmp_path, config)
    assert again.pool_path.read_bytes() == info.pool_path.read_bytes()
    assert again.ground_truth_path.read_bytes() == info.ground_truth_path.read_bytes()
    assert (tmp_path / "color").iterdir() and sorted(p.name for p in (tmp_path / "yes_no").iterdir()) == sorted(
        p.name for p in (info.image_root / "yes_no").iterdir())
    heldout = [json.loads(line) for line in (info.image_root / easy_vqa.HELDOUT_FILE).read_text().splitlines()]
    assert len(heldout) == 20
    test_questions = {(q, a) for q, a, _ in easy_vqa.questions("test")}
    assert all((h["conversations"][0]["value"].removeprefix("<image>\n"), h["conversations"][1]["value"])
               in test_questions for h in heldout)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="duplicate_group_size"):
        easy_vqa.EasyVQAPoolConfig(duplicate_group_size=(1, 3)).validate()
    with pytest.raises(ValueError, match="tasks: unknown"):
        easy_vqa.EasyVQAPoolConfig(tasks=("count",)).validate()
    with pytest.raises(ValueError, match="needs .* distinct train questions"):
        easy_vqa.plan_rows(easy_vqa.EasyVQAPoolConfig(num_samples=20_000, tasks=("color",)))
